"""``CallInFlight``: what the relay knows of one call while it runs, filled in as the call goes.

``forward`` starts it from the request, the relay adds timings and sizes, and ``settle`` turns it into the stored
``Call`` (calls.py). Moments are ``time.perf_counter()`` readings; durations are milliseconds. It does no I/O
beyond drawing random request ids from the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from proxy_app.apikeys import Policy
from proxy_app.ollama.intake import Intake

# Why: one system call per this many calls, for 4 KiB of randomness held at a time.
IDS_PER_DRAW = 256


class _RequestIds:
    """Request ids: 32 random hex digits (as unguessable as uuid4's, and telling nothing of how many calls others
    made), drawn from the kernel IDS_PER_DRAW at a time: a draw is a system call that gives up the interpreter lock,
    which uuid4 would make for every call. A forked child drops what its parent drew, so the two never share an id."""

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._ids = iter(())

    def next(self) -> str:
        try:
            return next(self._ids)  # one C call under the GIL: no two threads take the same id
        except StopIteration:
            drawn = os.urandom(16 * IDS_PER_DRAW).hex()
            ids = iter([drawn[start : start + 32] for start in range(0, len(drawn), 32)])
            self._ids = ids  # threads that ran out at once each keep their own draw: random, so never the same
            return next(ids)


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
