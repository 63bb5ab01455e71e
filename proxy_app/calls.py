"""The ``Call``: one finished proxied request and its response, as stored, exported and counted.

``COLUMNS`` is the one field order shared by the table, the CSV mirror, the JSON APIs and the export. The first 23
names are those of the CSV-logging proxies people already use, in their order. This module does no I/O.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from datetime import datetime

# Why: outcome is a closed set so the dashboard, the metrics and the alerts can rely on it.
OUTCOMES = ("completed", "upstream_error", "incomplete", "client_gone", "unreachable", "rejected")


@dataclass
class Call:
    """One proxied call. Unknown numbers are None (stored NULL, an empty CSV cell), never 0."""

    timestamp: datetime  # arrival, UTC
    request_id: str
    ip_source: str
    user_agent: str
    http_method: str
    endpoint: str  # path without query
    session_id: str
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    model_parameters: str | None  # compact JSON
    stream_mode: bool
    request_size_bytes: int
    response_size_bytes: int
    queue_time_ms: float
    processing_time_ms: float | None  # sent upstream -> last byte received
    total_time_ms: float  # arrival -> last byte sent
    http_status: int
    error_message: str | None
    system_load_cpu: float | None
    system_load_memory: float | None
    concurrent_requests: int
    outcome: str
    ttft_ms: float | None
    tokens_per_second: float | None
    load_duration_ms: float | None
    prompt_eval_duration_ms: float | None
    eval_duration_ms: float | None
    done_reason: str | None
    api: str  # native or openai
    prompt: str | None
    response_preview: str | None

    def as_dict(self) -> dict:
        """Return the fields in COLUMNS order, values unchanged (a shallow copy: every value is a scalar)."""
        return dict(zip(COLUMNS, values_of(self), strict=True))


COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(Call))
values_of = operator.attrgetter(*COLUMNS)  # a Call's (or a stored row's) values in COLUMNS order, in one C call


def format_timestamp(moment: datetime) -> str:
    """Render a UTC datetime as ISO 8601 with milliseconds and a Z, the form used in CSV and JSON."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
