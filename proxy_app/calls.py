"""The ``Call``: one finished proxied request and its response, as stored, exported and counted.

``COLUMNS`` is the one field order shared by the table, the CSV mirror, the JSON APIs and the export. The first 23
names are those of the CSV-logging proxies people already use, in their order. This module does no I/O.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, fields
from datetime import datetime

# Why: outcome is a closed set so the dashboard, the metrics and the alerts can rely on it.
OUTCOMES = ("completed", "upstream_error", "incomplete", "client_gone", "unreachable", "rejected")

# Why: the client or the upstream chooses most of this text, and each call is kept three times (database, CSV mirror,
# export). One bound per field, applied when a Call is built, keeps a hostile call from growing the store by
# megabytes, keeps every indexed value far below PostgreSQL's index entry limit (about 2.7 kB), and makes the
# database, the CSV and the export hold the same text. Sizes in characters.
TEXT_CHARS = {
    "request_id": 64,  # ours: 32 hex digits
    "ip_source": 64,  # an IPv6 address with a zone fits
    "user_agent": 512,
    "http_method": 16,
    "endpoint": 512,  # the path, without the query
    "session_id": 200,
    "model": 200,
    "model_parameters": 4096,  # compact JSON; a cut one is no longer valid JSON
    "error_message": 1024,
    "outcome": 16,
    "done_reason": 64,
    "api": 16,  # native, openai or anthropic
    "prompt": 1000,
    "response_preview": 200,
    "remote_model": 200,  # a cloud model's name upstream, bounded like model
    "remote_host": 256,  # a URL with scheme, host name and port
    "key_name": 64,  # an API key's name, chosen by the admin who created it
    "instance": 128,  # a host name fits (at most 253 in DNS, far shorter in practice)
    "upstream": 256,  # a URL with scheme, host name and port, like remote_host
}
# Why: a warm call's load_duration is Ollama's check that the model is still resident, a few to some tens of ms;
# loading even a small model from a fast disk takes several hundred ms. Above this a call paid a load.
COLD_START_MS = 250.0
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    api: str  # native, openai or anthropic
    prompt: str | None
    response_preview: str | None
    cached_input_tokens: int | None  # the part of input_tokens the upstream read from its prompt cache
    remote_model: str | None  # a cloud model's name on the remote host, as its answer says
    remote_host: str | None
    cold_start: bool | None = None  # the call paid a model load (``is_cold_start``); None when no load_duration
    key_name: str = ""  # the name of the API key the call carried; "" for an anonymous call
    instance: str = ""  # the proxy instance that relayed the call (INSTANCE)
    upstream: str = ""  # the upstream URL the call went to (UPSTREAM)

    # Not a field, so never a column: the client's W3C trace headers (traceparent, tracestate) when it sent them,
    # set by the relay for the tracing sink (ops/otel.py). None on every Call that has none.
    trace_context = None

    def __post_init__(self) -> None:
        """Make every text field storable (see ``storable_text``): the one place the bounds are applied."""
        for name, limit in _TEXT_BOUNDS:
            value = getattr(self, name)
            if type(value) is str and (len(value) > limit or not value.isascii() or "\x00" in value):
                setattr(self, name, storable_text(value, limit))

    def as_dict(self) -> dict:
        """Return the fields in COLUMNS order, values unchanged (a shallow copy: every value is a scalar)."""
        return dict(zip(COLUMNS, values_of(self), strict=True))


COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(Call))
values_of = operator.attrgetter(*COLUMNS)  # a Call's (or a stored row's) values in COLUMNS order, in one C call
_TEXT_BOUNDS = tuple(TEXT_CHARS.items())


def storable_text(text: str, limit: int) -> str:
    """Return text cut to ``limit`` characters, without NUL and with each lone surrogate as U+FFFD.

    Every UTF-8 database and file takes the result: PostgreSQL text cannot hold NUL, and no UTF-8 codec encodes a
    lone surrogate (Python's json decodes ``"\\ud800"`` to one; Go's decoder, like Ollama, reads U+FFFD there).
    """
    text = text[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def is_cold_start(load_duration_ms: float | None) -> bool | None:
    """True when a call's ``load_duration`` says it loaded its model (over COLD_START_MS); None when unknown."""
    return None if load_duration_ms is None else load_duration_ms > COLD_START_MS


def format_timestamp(moment: datetime) -> str:
    """Render a UTC datetime as ISO 8601 with milliseconds and a Z, the form used in CSV and JSON."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
