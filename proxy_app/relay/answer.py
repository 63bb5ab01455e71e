"""The answer's way back: the upstream's status, headers and body go to the client as they arrive, and the call is
settled when the body ends, however it ends.

Each piece of the body is whatever has arrived so far (framing.py); a copy feeds a ``UsageMeter``, and a
``UsageStripper`` takes out the usage the relay asked for on the client's behalf. While the upstream is silent the
client is watched (client_watch.py). When the body ends (normally, on a client disconnect, or on an upstream failure)
the upstream connection is released or closed, the concurrency slot freed, and the ``CallInFlight`` settled
(settle.py). The request's way there is forward.py's.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Iterator
from functools import partial

from flask import Flask
from werkzeug.wrappers import Request, Response

from proxy_app.ollama.errors import error_tail
from proxy_app.ollama.usage import Usage, UsageMeter, UsageStripper
from proxy_app.relay import framing, keycheck
from proxy_app.relay.client_watch import ClientLeft, client_gone_check, stream_wait
from proxy_app.relay.headers import client_headers, status_line
from proxy_app.relay.inflight import CallInFlight
from proxy_app.relay.middleware import RelayedAnswer
from proxy_app.relay.on_loop import LOOP_KEY, LoopBody, StreamCut, can_go_to_loop
from proxy_app.relay.settle import outcome_of, refuse_call, settle
from proxy_app.state import state_of

log = logging.getLogger(__name__)

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
# Largest piece read from the upstream at once, the size of http.client's read buffer (framing.py reads into one
# buffer of this size per body and copies out each piece at the size that arrived: about 100 bytes for a token line).
READ_SIZE = 8 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
MODEL_LIST_BYTES = 16 * 1024 * 1024  # the most of a model list read to show a key only its models


class UpstreamBroke(Exception):
    """The upstream died in the middle of a body whose length was announced; the client connection must be cut."""


def relay_answer(app: Flask, req: Request, call: CallInFlight, upstream) -> Response | RelayedAnswer:
    """The client's answer to the upstream's (whose head has been read): its status and headers, and a body that
    relays the upstream's as it arrives and settles the call when it ends."""
    status = upstream.status
    content_type = upstream.head.get("Content-Type", "")
    call.http_status = status
    headers = client_headers(upstream.head)
    headers.append(("X-Request-ID", call.request_id))
    is_stream = content_type.startswith(STREAM_TYPES)
    if is_stream:
        headers.append(("X-Accel-Buffering", "no"))
    meter = UsageMeter(content_type, status)
    is_sse = content_type.startswith(STREAM_TYPES[1])
    stripper = UsageStripper() if call.intake.wants_usage_injected and is_sse else None
    if stripper is not None:
        headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
    if req.method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200:
        finish(app, call, upstream, meter, outcome=None, error=None, sent_bytes=0, ttft=None)
        return Response(b"", status=status, headers=headers)
    if status == 200 and keycheck.filters_models(call.key, req.method, req.path):
        return _model_list(app, call, upstream, meter, headers)
    loop = req.environ.get(LOOP_KEY) if is_stream and can_go_to_loop(upstream) else None
    wait = None if loop is not None else _client_watch(app, req, upstream)
    body = _stream(app, call, upstream, Tally(call, meter, stripper), "Content-Length" in upstream.head, wait, loop)
    next(body)  # into its try: a body closed unread settles the call without reading the upstream
    return RelayedAnswer(status_line(status, upstream.reason), headers, body, partial(abandon, app, call, upstream))


def _model_list(app: Flask, call: CallInFlight, upstream, meter: UsageMeter, headers: list) -> Response:
    """A model list for a key limited to some models: read whole, answered with only those."""
    try:
        whole = upstream.read(MODEL_LIST_BYTES + 1)
    except (http.client.HTTPException, OSError) as exc:
        return abandon(app, call, upstream, f"upstream connection lost: {reason_of(exc)}")
    body = keycheck.allowed_list(call.key, call.endpoint, whole) if len(whole) <= MODEL_LIST_BYTES else None
    if body is None:
        return abandon(app, call, upstream, "the upstream's model list could not be read")
    meter.feed(body)
    headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
    finish(app, call, upstream, meter, None, None, len(body), None)
    return Response(body, status=200, headers=headers)


def _client_watch(app: Flask, req: Request, upstream):
    """The wait that watches the client while the upstream is silent mid-body (client_watch.py), or None."""
    is_gone = client_gone_check(req.environ)
    if is_gone is None:  # a server that offers no way to tell: its next write notices
        return None
    return stream_wait(upstream.socket, app.config["READ_TIMEOUT"] or None, is_gone)


class Tally:
    """What a relayed body has given the client so far: each piece passes ``take`` on its way (the usage meter, the
    stripper, the first-byte and first-token times, the bytes sent)."""

    def __init__(self, call: CallInFlight, meter: UsageMeter, stripper) -> None:
        self.call, self.meter, self.stripper = call, meter, stripper
        self.sent_bytes, self.ttft, self.at_line_start = 0, None, True

    def take(self, chunk: bytes) -> bytes:
        """The client's bytes for ``chunk`` of the upstream's body (maybe none, while the stripper holds them)."""
        call = self.call
        try:
            self.meter.feed(chunk)
        except Exception:  # a parser bug must not cost the client its stream (STYLE habit 2)
            log.exception("usage parsing failed; the call is recorded without counts")
            self.meter = UsageMeter("", call.http_status)  # a meter without a mode ignores the rest
        if self.stripper is not None:
            chunk = self.stripper.feed(chunk)
        if call.first_byte_ms is None:  # once, not a clock read on every chunk
            call.first_byte_ms = (time.perf_counter() - call.arrived) * 1000
        if self.ttft is None and self.meter.has_content:
            self.ttft = (time.perf_counter() - call.arrived) * 1000
        return self.sent(chunk)

    def sent(self, chunk: bytes) -> bytes:
        """Count ``chunk`` as given to the client."""
        if chunk:
            self.sent_bytes += len(chunk)
            self.at_line_start = chunk.endswith(b"\n")
        return chunk

    def held(self) -> bytes:
        """What the stripper still holds back (a partial event), for the client."""
        return self.sent(self.stripper.flush()) if self.stripper is not None else b""


def _stream(app: Flask, call: CallInFlight, upstream, tally: Tally, has_length: bool, wait, loop) -> Iterator[bytes]:
    """Yield the upstream body as it arrives, after one empty piece for the caller; settle the call in ``finally``
    whatever happens.

    ``wait`` (client_watch.stream_wait) watches the client while the upstream is silent; it raises ClientLeft. With a
    ``loop`` (on_loop.py) the server's event loop relays the body instead, and this only waits for its end.
    """
    outcome, error = None, None
    try:
        yield b""
        if loop is not None:
            LoopBody(upstream, tally.take, partial(_last_words, app, upstream, tally)).relay_on(loop)
        else:
            for chunk in framing.pieces(upstream, READ_SIZE, wait):
                if chunk := tally.take(chunk):
                    yield chunk
        if tail := tally.held():
            yield tail
    except GeneratorExit:
        outcome = "client_gone"
        raise
    except (ClientLeft, StreamCut):  # left while the upstream was silent, or cut by the drain: nobody reads on
        outcome = "client_gone"
    except (http.client.HTTPException, OSError) as exc:
        outcome, error = "upstream_error", f"upstream connection lost: {reason_of(exc)}"
        if has_length:
            raise UpstreamBroke(error) from exc
        held = tally.held()  # a partial event it was holding back
        yield tally.sent(held + error_tail(upstream.head.get("Content-Type", ""), error, tally.at_line_start))
    finally:
        finish(app, call, upstream, tally.meter, outcome, error, tally.sent_bytes, tally.ttft)


def _last_words(app: Flask, upstream, tally: Tally) -> bytes | None:
    """The end of a stream the drain cuts (drain.py), or None while it does not cut."""
    drain = state_of(app).drain
    if drain is None or not drain.is_cutting:
        return None
    return drain.last_words(upstream.head.get("Content-Type", ""), tally.at_line_start)


def reason_of(exc: BaseException) -> str:
    """What went wrong, for the error message: http.client's errors say little without their name."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, framing.BrokenBody):
        return f"{type(exc).__name__}: {text}"
    return text


def finish(app: Flask, call: CallInFlight, upstream, meter: UsageMeter, outcome, error, sent_bytes: int, ttft) -> None:
    """Close the upstream (so Ollama stops generating), free the slot and hand the finished Call to the sinks."""
    if call.abandoned:  # abandon has released and recorded it already
        return
    call.ended = time.perf_counter()
    release(app, upstream, reusable=outcome is None)  # an abandoned body must not go back to the pool
    try:
        usage = meter.result()
    except Exception:  # as in _stream: the call is still recorded and counted out of flight
        log.exception("usage parsing failed; the call is recorded without counts")
        usage = Usage()
    if ttft is None and meter.has_content:  # a whole JSON answer: its first byte is its first token
        ttft = call.first_byte_ms
    if outcome == "client_gone" and (usage.is_complete or usage.error_message is not None):
        # It left once the answer's last line or event (or the error line that ends a failed stream) had come, before
        # the closing chunk Go's server writes after it: the record says what Ollama did, completed or failed (its
        # connection, released above, is still not reused).
        outcome = None
    content_type = upstream.head.get("Content-Type", "")
    outcome = outcome or outcome_of(call.http_status, usage, content_type.startswith(STREAM_TYPES))
    call.sent_bytes, call.ttft_ms = sent_bytes, ttft
    settle(app, call, usage, outcome, error)


def release(app: Flask, upstream, reusable: bool) -> None:
    """Give the upstream connection back (or close it, so Ollama sees the close) and free the call's slot."""
    try:
        state_of(app).upstream_pool.release(upstream, reusable=reusable)
    except Exception:  # closing must never stop the accounting
        log.exception("closing the upstream response failed")
    finally:
        state_of(app).gate.leave()


def abandon(app: Flask, call: CallInFlight, upstream, message: str) -> Response:
    """Settle a relayed answer whose head the server would not send: 502 in the API's shape, recorded."""
    call.abandoned = True
    release(app, upstream, reusable=False)
    return refuse_call(app, call, 502, message, "upstream_error")
