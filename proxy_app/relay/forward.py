"""Forwarding a call: the request goes to the upstream, and its answer comes back unchanged.

Bodies are relayed byte for byte as they arrive, each piece whatever has arrived so far (framing.py); a copy of each
piece feeds a ``UsageMeter``. When the call ends (normally, on a client disconnect, or on an upstream failure) its
``CallInFlight`` is settled: one ``Call`` is built and handed to the sinks in ``state_of(app).call_sinks``
(settle.py). This module does not choose which paths are relayed (middleware.py), read the request body
(request_body.py), store, count or render anything, nor decide which headers, target or status line cross the wire
(headers.py).
"""

from __future__ import annotations

import http.client
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial

from flask import Flask
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wrappers import Request, Response

from proxy_app.config import PREFIX
from proxy_app.ollama import intake as intake_module
from proxy_app.ollama.errors import error_tail
from proxy_app.ollama.usage import Usage, UsageMeter, UsageStripper
from proxy_app.relay import framing, keycheck
from proxy_app.relay.client_watch import ClientLeft, client_gone_check, stream_wait, watching
from proxy_app.relay.gate import ByteBudget, Gate, InFlight
from proxy_app.relay.headers import client_address, client_headers, request_target, status_line, upstream_headers
from proxy_app.relay.inflight import CallInFlight
from proxy_app.relay.middleware import Relay, RelayedAnswer, make_host_rule
from proxy_app.relay.request_body import InvalidBody, is_blob_upload, read_request_body
from proxy_app.relay.settle import outcome_of, refuse_call, settle
from proxy_app.relay.upstream import Pool, Unreachable
from proxy_app.state import state_of

log = logging.getLogger(__name__)

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
# Largest piece read from the upstream at once, the size of http.client's read buffer (framing.py reads into one
# buffer of this size per body and copies out each piece at the size that arrived: about 100 bytes for a token line).
READ_SIZE = 8 * 1024
NO_BODY_STATUSES = frozenset({204, 304})
MODEL_LIST_BYTES = 16 * 1024 * 1024  # the most of a model list read to show a key only its models
CLIENT_GONE_STATUS = 499  # Ollama's (and nginx's) status for "the client closed the connection first"


class UpstreamBroke(Exception):
    """The upstream died in the middle of a body whose length was announced; the client connection must be cut."""


def init_app(app: Flask) -> None:
    """Create the shared upstream pool and concurrency gate, and put the relay in front of Flask's own routes."""
    config = app.config
    read_timeout = config["READ_TIMEOUT"] or None
    pool = Pool(config["UPSTREAM"], config["CONNECT_TIMEOUT"], read_timeout, keep=max(config["THREADS"], 10))
    state_of(app).upstream_pool = pool
    state_of(app).shutdown_hooks.append(pool.close)
    state_of(app).gate = Gate(config["MAX_CONCURRENT"])
    state_of(app).in_flight = InFlight()
    state_of(app).body_budget = ByteBudget(config["BODY_MEMORY_BYTES"])
    host_rule = make_host_rule(config)
    if not host_rule.checks_anything:
        log.warning(
            "HOST %r is not loopback and %sALLOWED_HOSTS is empty: any Host is accepted, as Ollama does on such an "
            "address; list this proxy's names there to refuse DNS-rebound pages",
            config["HOST"],
            PREFIX,
        )
    state_of(app).relay = app.wsgi_app = Relay(app, app.wsgi_app, forward, refuse, host_rule)


def forward(app: Flask, req: Request) -> Response | RelayedAnswer:
    """Relay this request to the upstream and stream its answer back."""
    call = _start_call(app, req)
    gate, in_flight = state_of(app).gate, state_of(app).in_flight
    call.concurrent_requests = in_flight.enter()
    try:
        verdict = keycheck.identify(app, req.environ)
        call.key = verdict.policy
        if verdict.status:
            return _refuse_key(app, call, verdict)
        return _forward_in_slot(app, req, call, gate)
    except BaseException:
        in_flight.leave()
        raise


def refuse(app: Flask, req: Request, status: int, message: str) -> Response:
    """Answer a relayed call ourselves before it reaches the upstream (a Host not allowed), and record it."""
    call = _start_call(app, req)
    call.concurrent_requests = state_of(app).in_flight.enter()
    return refuse_call(app, call, status, message, "rejected")


def _forward_in_slot(app: Flask, req: Request, call: CallInFlight, gate: Gate) -> Response | RelayedAnswer:
    too_big = _check_body_size(app, req, call)
    if too_big is not None:
        return too_big
    waited = time.perf_counter()
    if not gate.enter(app.config["QUEUE_TIMEOUT"]):
        call.queue_time_ms = (time.perf_counter() - waited) * 1000
        return refuse_call(app, call, 503, "server busy, please try again.  proxy queue timeout exceeded", "rejected")
    call.queue_time_ms = (time.perf_counter() - waited) * 1000
    try:
        return _open_upstream(app, req, call)
    except BaseException:
        gate.leave()
        raise


def _start_call(app: Flask, req: Request) -> CallInFlight:
    """Copy what the call record needs out of the request before any streaming starts (no stream_with_context)."""
    environ = req.environ
    return CallInFlight(
        arrived=time.perf_counter(),
        timestamp=datetime.now(UTC),
        request_id=uuid.uuid4().hex,
        ip_source=client_address(environ, app.config["TRUSTED_PROXIES"]),
        user_agent=environ.get("HTTP_USER_AGENT", ""),
        http_method=req.method,
        endpoint=req.path,
        session_id=environ.get("HTTP_X_SESSION_ID", ""),
        request_size_bytes=req.content_length or 0,
        trace_context=_trace_context(environ),
    )


def _trace_context(environ: dict) -> dict[str, str] | None:
    """The client's W3C trace headers, which a span of this call continues; None when it sent no traceparent."""
    if "HTTP_TRACEPARENT" not in environ:
        return None
    return {"traceparent": environ["HTTP_TRACEPARENT"], "tracestate": environ.get("HTTP_TRACESTATE", "")}


def _check_body_size(app: Flask, req: Request, call: CallInFlight) -> Response | None:
    limit = app.config["MAX_BODY_BYTES"]
    if is_blob_upload(req.method, req.path) or not limit:
        return None
    declared = req.content_length
    if declared is not None and declared > limit:
        message = f"request body of {declared} bytes exceeds the limit of {limit}"
        return refuse_call(app, call, 413, message, "rejected")
    return None


def _open_upstream(app: Flask, req: Request, call: CallInFlight) -> Response | RelayedAnswer:
    """Hold the body's bytes in the process's budget while it is read and sent (503 when they do not fit)."""
    limit, declared = app.config["MAX_BODY_BYTES"], req.content_length
    size = 0 if is_blob_upload(req.method, req.path) else declared if declared is not None else limit
    budget = state_of(app).body_budget
    if not budget.take(size):
        state_of(app).gate.leave()
        message = f"server busy: request bodies in memory would pass {app.config['BODY_MEMORY_BYTES']} bytes"
        response = refuse_call(app, call, 503, f"{message}; please try again", "rejected")
        response.headers["Retry-After"] = "1"
        return response
    try:
        return _send(app, req, call)
    finally:
        budget.give(size)


def _send(app: Flask, req: Request, call: CallInFlight) -> Response | RelayedAnswer:
    try:
        body, body_size = read_request_body(req, app.config["MAX_BODY_BYTES"])
    except InvalidBody as exc:  # a chunked body with a bad size line, say
        state_of(app).gate.leave()
        return refuse_call(app, call, 400, exc.description, "rejected")
    except (OSError, ClientDisconnected) as exc:  # gunicorn: the client left before sending the whole body
        state_of(app).gate.leave()
        call.request_size_bytes = 0
        return refuse_call(app, call, CLIENT_GONE_STATUS, f"request canceled: {_reason(exc)}", "client_gone")
    if body_size < 0:
        state_of(app).gate.leave()
        return refuse_call(app, call, 413, "request body exceeds the limit", "rejected")
    intake = intake_module.read_intake(
        call.endpoint, body if isinstance(body, bytes) else None, req.headers.get("Content-Encoding"),
        req.headers.get("Content-Type"), req.query_string,
    )  # fmt: skip
    call.request_size_bytes = body_size
    call.intake = intake
    if call.key is not None:
        verdict = keycheck.admit(app, call.key, intake.model)
        if verdict is not None:
            state_of(app).gate.leave()
            return _refuse_key(app, call, verdict)
        call.key_admitted = True
    if intake.wants_usage_injected:
        body = intake_module.with_usage_requested(body)
    target = request_target(req.environ, req.path)
    headers = upstream_headers(req, body)
    call.sent = time.perf_counter()
    try:
        with watching(req.environ):  # a client leaving while Ollama is silent raises ClientLeft (client_watch.py)
            upstream = state_of(app).upstream_pool.request(req.method, target, body or None, headers)
    except (http.client.HTTPException, OSError, ClientLeft, ClientDisconnected, InvalidBody) as exc:
        state_of(app).gate.leave()
        return _no_answer(app, call, exc)
    return _relay_response(app, req, call, upstream)


def _relay_response(app: Flask, req: Request, call: CallInFlight, upstream) -> Response | RelayedAnswer:
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
        _finish(app, call, upstream, meter, outcome=None, error=None, sent_bytes=0, ttft=None)
        return Response(b"", status=status, headers=headers)
    if status == 200 and keycheck.filters_models(call.key, req.method, req.path):
        return _model_list(app, call, upstream, meter, headers)
    wait = _client_watch(app, req, upstream)
    body = _stream(app, call, upstream, meter, stripper, "Content-Length" in upstream.head, wait)
    next(body)  # into its try: a body closed unread settles the call without reading the upstream
    return RelayedAnswer(status_line(status, upstream.reason), headers, body, partial(_abandon, app, call, upstream))


def _refuse_key(app: Flask, call: CallInFlight, verdict: keycheck.Verdict) -> Response:
    """Answer a call its key may not make (401, 403, 429 with Retry-After, 503), and record it."""
    response = refuse_call(app, call, verdict.status, verdict.message, "rejected")
    if verdict.retry_after is not None:
        response.headers["Retry-After"] = str(verdict.retry_after)
    return response


def _model_list(app: Flask, call: CallInFlight, upstream, meter: UsageMeter, headers: list) -> Response:
    """A model list for a key limited to some models: read whole, answered with only those."""
    try:
        whole = upstream.read(MODEL_LIST_BYTES + 1)
    except (http.client.HTTPException, OSError) as exc:
        return _abandon(app, call, upstream, f"upstream connection lost: {_reason(exc)}")
    body = keycheck.allowed_list(call.key, call.endpoint, whole) if len(whole) <= MODEL_LIST_BYTES else None
    if body is None:
        return _abandon(app, call, upstream, "the upstream's model list could not be read")
    meter.feed(body)
    headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
    _finish(app, call, upstream, meter, None, None, len(body), None)
    return Response(body, status=200, headers=headers)


def _client_watch(app: Flask, req: Request, upstream):
    """The wait that watches the client while the upstream is silent mid-body (client_watch.py), or None."""
    is_gone = client_gone_check(req.environ)
    if is_gone is None:  # a server that offers no way to tell: its next write notices
        return None
    return stream_wait(upstream.socket, app.config["READ_TIMEOUT"] or None, is_gone)


def _stream(
    app: Flask, call: CallInFlight, upstream, meter: UsageMeter, stripper, has_length: bool, wait
) -> Iterator[bytes]:
    """Yield the upstream body as it arrives, after one empty piece for the caller; settle the call in ``finally``
    whatever happens.

    ``wait`` (client_watch.stream_wait) watches the client while the upstream is silent; it raises ClientLeft.
    """
    sent_bytes, ttft, outcome, error, at_line_start = 0, None, None, None, True
    try:
        yield b""
        for chunk in framing.pieces(upstream, READ_SIZE, wait):
            try:
                meter.feed(chunk)
            except Exception:  # a parser bug must not cost the client its stream (STYLE habit 2)
                log.exception("usage parsing failed; the call is recorded without counts")
                meter = UsageMeter("", call.http_status)  # a meter without a mode ignores the rest
            if stripper is not None:
                chunk = stripper.feed(chunk)
            if call.first_byte_ms is None:  # once, not a clock read on every chunk
                call.first_byte_ms = (time.perf_counter() - call.arrived) * 1000
            if ttft is None and meter.has_content:
                ttft = (time.perf_counter() - call.arrived) * 1000
            if chunk:
                sent_bytes += len(chunk)
                at_line_start = chunk.endswith(b"\n")
                yield chunk
        if stripper is not None and (tail := stripper.flush()):
            sent_bytes += len(tail)
            yield tail
    except GeneratorExit:
        outcome = "client_gone"
        raise
    except ClientLeft:  # left while the upstream was silent: end the body, nobody reads it
        outcome = "client_gone"
    except (http.client.HTTPException, OSError) as exc:
        outcome, error = "upstream_error", f"upstream connection lost: {_reason(exc)}"
        if has_length:
            raise UpstreamBroke(error) from exc
        held = stripper.flush() if stripper is not None else b""  # a partial event it was holding back
        if held:
            at_line_start = held.endswith(b"\n")
        tail = held + error_tail(upstream.head.get("Content-Type", ""), error, at_line_start)
        sent_bytes += len(tail)
        yield tail
    finally:
        _finish(app, call, upstream, meter, outcome, error, sent_bytes, ttft)


def _reason(exc: BaseException) -> str:
    """What went wrong, for the error message: http.client's errors say little without their name."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, framing.BrokenBody):
        return f"{type(exc).__name__}: {text}"
    return text


def _finish(app: Flask, call: CallInFlight, upstream, meter: UsageMeter, outcome, error, sent_bytes: int, ttft) -> None:
    """Close the upstream (so Ollama stops generating), free the slot and hand the finished Call to the sinks."""
    if call.abandoned:  # _abandon has released and recorded it already
        return
    call.ended = time.perf_counter()
    _release(app, upstream, reusable=outcome is None)  # an abandoned body must not go back to the pool
    try:
        usage = meter.result()
    except Exception:  # as in _stream: the call is still recorded and counted out of flight
        log.exception("usage parsing failed; the call is recorded without counts")
        usage = Usage()
    if ttft is None and meter.has_content:  # a whole JSON answer: its first byte is its first token
        ttft = call.first_byte_ms
    content_type = upstream.head.get("Content-Type", "")
    outcome = outcome or outcome_of(call.http_status, usage, content_type.startswith(STREAM_TYPES))
    call.sent_bytes, call.ttft_ms = sent_bytes, ttft
    settle(app, call, usage, outcome, error)


def _release(app: Flask, upstream, reusable: bool) -> None:
    """Give the upstream connection back (or close it, so Ollama sees the close) and free the call's slot."""
    try:
        state_of(app).upstream_pool.release(upstream, reusable=reusable)
    except Exception:  # closing must never stop the accounting
        log.exception("closing the upstream response failed")
    finally:
        state_of(app).gate.leave()


def _abandon(app: Flask, call: CallInFlight, upstream, message: str) -> Response:
    """Settle a relayed answer whose head the server would not send: 502 in the API's shape, recorded."""
    call.abandoned = True
    _release(app, upstream, reusable=False)
    return refuse_call(app, call, 502, message, "upstream_error")


def _no_answer(app: Flask, call: CallInFlight, exc: BaseException) -> Response:
    """Answer and record a call that got no response: unreachable (502), silent (504), broken (502), client gone."""
    upstream = app.config["UPSTREAM"]
    if isinstance(exc, ClientLeft | ClientDisconnected):  # left while we waited, or in the middle of a blob upload
        return refuse_call(app, call, CLIENT_GONE_STATUS, "request canceled", "client_gone")
    if isinstance(exc, InvalidBody):  # a blob upload whose chunked framing broke on the way
        return refuse_call(app, call, 400, exc.description, "rejected")
    if isinstance(exc, Unreachable):
        status, outcome, message = 502, "unreachable", f"cannot reach the Ollama upstream at {upstream}"
    elif isinstance(exc, TimeoutError):
        seconds = app.config["READ_TIMEOUT"]
        status, outcome, message = 504, "upstream_error", f"the Ollama upstream sent nothing for {seconds:g} s"
    else:
        status, outcome, message = 502, "upstream_error", f"the Ollama upstream at {upstream} gave no answer"
    message = f"{message}: {_reason(exc)}"
    log.warning("%s", message)
    return refuse_call(app, call, status, message, outcome)
