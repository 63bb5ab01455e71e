"""``CallInFlight``: what the relay knows of one call while it runs, filled in as the call goes.

``forward`` starts it from the request, the relay adds timings and sizes, and ``settle`` turns it into the stored
``Call`` (calls.py). Moments are ``time.perf_counter()`` readings; durations are milliseconds. It does no I/O
beyond drawing each process's request-id prefix.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import datetime

from proxy_app.apikeys import Policy
from proxy_app.ollama.intake import Intake


class _RequestIds:
    """Request ids of 32 hex digits: a random 64-bit prefix drawn once per process (again in a forked child), then
    the process's count of calls. They are unique, not secret (whoever may read one row may read them all): uuid4
    would draw 16 bytes from the kernel for every call, a system call that gives up the interpreter lock."""

    def __init__(self) -> None:
        self.draw()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.draw)

    def draw(self) -> None:
        self.prefix, self.count = os.urandom(8).hex(), itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.count):016x}"  # next() on a count is atomic: one C call under the GIL


new_request_id = _RequestIds().next


@dataclass(slots=True)
class CallInFlight:
    """One call from its arrival to its end; unset moments and unknown numbers are None."""

    arrived: float  # perf_counter at arrival
    timestamp: datetime  # arrival, UTC
    request_id: str
    ip_source: str
    user_agent: str
    http_method: str
    endpoint: str  # path without query
    session_id: str  # the client's X-Session-ID, or ""
    request_size_bytes: int  # as declared, until the body is read
    trace_context: dict[str, str] | None = None  # the client's traceparent and tracestate headers, if it sent them
    concurrent_requests: int = 0  # calls in flight in this process, this one included
    queue_time_ms: float = 0.0
    intake: Intake | None = None  # what the request asked for, once its body was read (or the call refused)
    sent: float | None = None  # perf_counter when the request went upstream, or was answered by us
    http_status: int = 0
    first_byte_ms: float | None = None  # arrival -> the upstream's first body piece
    ttft_ms: float | None = None  # arrival -> the first piece with content
    sent_bytes: int = 0  # body bytes sent to the client
    ended: float = 0.0  # perf_counter at the end
    key: Policy | None = None  # the API key it presented, when valid
    key_admitted: bool = False  # its key's limits admitted it: its stream and tokens are settled at the end
    abandoned: bool = False  # settled as refused by the server before its body ran: the body settles nothing

    @property
    def key_name(self) -> str:
        """The name of the valid API key the call carried; "" for an anonymous call."""
        return "" if self.key is None else self.key.name

    @property
    def capture(self) -> bool:
        """Whether the call's prompt and preview may be stored: not for a key created with --no-capture."""
        return self.key is None or self.key.capture
