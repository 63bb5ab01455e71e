"""Forwarding a call: the request goes to the upstream, and its answer comes back unchanged (answer.py).

Here a call is started (its ``CallInFlight``), its key identified and admitted, its body size checked, a concurrency
slot taken, and the request sent; a call that gets no answer (unreachable, silent, refused, its client gone) is
answered in the API's shape and settled here. This module does not choose which paths are relayed (middleware.py),
read the request body (request_body.py), store, count or render anything, nor decide which headers, target or status
line cross the wire (headers.py).
"""

from __future__ import annotations

import http.client
import logging
import time
from datetime import UTC, datetime

from flask import Flask
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wrappers import Request, Response

from proxy_app.ollama import intake as intake_module
from proxy_app.relay import answer, keycheck
from proxy_app.relay.client_watch import ClientLeft, watching
from proxy_app.relay.gate import ByteBudget, Gate, InFlight
from proxy_app.relay.headers import client_address, request_target, upstream_headers
from proxy_app.relay.inflight import CallInFlight, new_request_id
from proxy_app.relay.middleware import Relay, RelayedAnswer, make_host_rule
from proxy_app.relay.request_body import InvalidBody, is_blob_upload, read_request_body
from proxy_app.relay.settle import refuse_call
from proxy_app.relay.upstream import Pool, Unreachable
from proxy_app.settings import PREFIX
from proxy_app.state import state_of

log = logging.getLogger(__name__)

CLIENT_GONE_STATUS = 499  # Ollama's (and nginx's) status for "the client closed the connection first"


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
        request_id=new_request_id(),
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
        return refuse_call(app, call, CLIENT_GONE_STATUS, f"request canceled: {answer.reason_of(exc)}", "client_gone")
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
        verdict = keycheck.admit(app, call.key, call.endpoint, intake.model, intake.second_model)
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
    return answer.relay_answer(app, req, call, upstream)


def _refuse_key(app: Flask, call: CallInFlight, verdict: keycheck.Verdict) -> Response:
    """Answer a call its key may not make (401, 403, 429 with Retry-After, 503), and record it."""
    response = refuse_call(app, call, verdict.status, verdict.message, "rejected")
    if verdict.retry_after is not None:
        response.headers["Retry-After"] = str(verdict.retry_after)
    return response


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
    message = f"{message}: {answer.reason_of(exc)}"
    log.warning("%s", message)
    return refuse_call(app, call, status, message, outcome)
