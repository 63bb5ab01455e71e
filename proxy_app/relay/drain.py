"""Graceful shutdown inside one server process: in-flight calls may run for GRACE_SECONDS, then streams are cut.

After ``Drain.run()`` starts, calls already in flight keep streaming. Streams (NDJSON, SSE) still running when the grace
period ends are cut at their next chunk: the client gets one last error line in the stream's own shape and the relay
records the call as usual, so the store still gets its row. Used by both servers: the waitress service
(servers.py) and each gunicorn worker (``arm`` from service/gunicorn_conf.py). It does not close listeners, flush
the store or stop Ollama; the caller does those, in that order.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from proxy_app.ollama.errors import error_tail  # the same last line the relay sends when the upstream breaks
from proxy_app.relay.answer import STREAM_TYPES
from proxy_app.state import KEY, state_of

log = logging.getLogger(__name__)

SETTLE_SECONDS = 10.0  # after the cut: time for cut streams to reach their next chunk and for the writer to flush
POLL_SECONDS = 0.05


def init_app(app) -> None:
    """Wrap the app so that its streams can be cut at shutdown (a no-op until then)."""
    drain = Drain(state_of(app).in_flight, app.config["GRACE_SECONDS"])
    state_of(app).drain = drain
    app.wsgi_app = drain.wrap(app.wsgi_app)


def arm(app) -> None:
    """In a gunicorn worker: on SIGTERM, start the drain, then let gunicorn's own handler stop accepting."""
    state = getattr(app, "extensions", {}).get(KEY)
    drain = state.drain if state is not None else None
    if drain is None:  # not our app (the gunicorn settings used for something else): leave gunicorn's handling alone
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        drain.start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: the signal must not break a running read


class Drain:
    """Shutdown bookkeeping for one process: waits on the in-flight count, then cuts the streams left."""

    def __init__(self, in_flight, grace_seconds: float, clock=time.monotonic) -> None:
        self.in_flight, self.grace_seconds, self.clock = in_flight, grace_seconds, clock
        self._cut = threading.Event()
        self._started = threading.Event()

    @property
    def is_cutting(self) -> bool:
        """True once the grace period is over (or ``cut()`` was called)."""
        return self._cut.is_set()

    def cut(self) -> None:
        """End every stream at its next chunk from now on."""
        self._cut.set()

    def last_words(self, content_type: str, at_line_start: bool) -> bytes:
        """The error line that ends a cut stream, in its own shape."""
        message = f"the proxy is shutting down: stream cut after the {self.grace_seconds:g} s grace period"
        return error_tail(content_type, message, at_line_start)

    def start(self) -> None:
        """Run the drain in a background thread (safe from a signal handler; a second call does nothing)."""
        if not self._started.is_set():
            self._started.set()
            threading.Thread(target=self.run, name="drain", daemon=True).start()

    def run(self, settle_seconds: float = SETTLE_SECONDS) -> int:
        """Wait for in-flight calls up to the grace period, cut the rest, wait for them; return how many remain."""
        self._started.set()
        if self.wait_idle(self.grace_seconds):
            return 0
        log.warning("%d call(s) still running after the %g s grace period; cutting their streams",
                    self.in_flight.count, self.grace_seconds)  # fmt: skip
        self.cut()
        self.wait_idle(settle_seconds)
        return self.in_flight.count

    def wait_idle(self, timeout: float) -> bool:
        """Poll until no call is in flight; False if ``timeout`` seconds pass first."""
        deadline = self.clock() + timeout
        while self.in_flight.count > 0:
            if self.clock() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def wrap(self, wsgi_app):
        """Return ``wsgi_app`` with every streamed body made cuttable; other bodies pass untouched."""

        def drained(environ, start_response):
            content_type = []

            def remember(status, headers, exc_info=None):
                content_type[:] = [value for name, value in headers if name.lower() == "content-type"][:1]
                return start_response(status, headers, exc_info)

            body = wsgi_app(environ, remember)
            if not content_type or not content_type[0].startswith(STREAM_TYPES):
                return body
            return _CuttableBody(body, content_type[0], self)

        return drained


class _CuttableBody:
    """A streamed body that ends with an error line once the drain cuts; closing it closes the relay's body."""

    def __init__(self, body, content_type: str, drain: Drain) -> None:
        self._body, self._content_type, self._drain = body, content_type, drain

    def __iter__(self):
        at_line_start = True
        for chunk in self._body:
            if self._drain.is_cutting:
                yield self._drain.last_words(self._content_type, at_line_start)
                return
            at_line_start = chunk.endswith(b"\n")
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
