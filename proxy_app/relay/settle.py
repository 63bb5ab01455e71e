"""Settling a finished call: its outcome, the ``Call`` record, and the hand-over to the sinks; and answering a call
ourselves instead of the upstream (``refuse_call``).

It relays nothing, stores nothing (the sinks: metrics, writer) and shapes no error (ollama/errors.py).
"""

from __future__ import annotations

import logging
import time

from flask import Flask
from werkzeug.wrappers import Response

from proxy_app.calls import Call, is_cold_start
from proxy_app.ollama import intake as intake_module
from proxy_app.ollama.usage import Usage
from proxy_app.relay import keycheck
from proxy_app.relay.inflight import CallInFlight
from proxy_app.relay.middleware import answer_ourselves
from proxy_app.state import state_of

log = logging.getLogger(__name__)


def outcome_of(status: int, usage: Usage, is_stream: bool) -> str:
    """The outcome of a call the upstream answered: an error, a stream cut short, or completed."""
    if status >= 400 or usage.error_message:
        return "upstream_error"
    if is_stream and not usage.is_complete:
        return "incomplete"
    return "completed"


def settle(app: Flask, call: CallInFlight, usage: Usage, outcome: str, error: str | None) -> None:
    """Build the Call, lower the in-flight count and hand the Call to every sink (a failing sink is only logged)."""
    state_of(app).in_flight.leave()
    if call.key_admitted:
        keycheck.settle_key(app, call.key, (usage.input_tokens or 0) + (usage.output_tokens or 0))
    try:
        finished = _build_call(app, call, usage, outcome, error)
        finished.trace_context = call.trace_context
    except Exception:  # raised from a generator's finally, it would cut the client's finished stream
        log.exception("building the record of call %s failed; it is not recorded", call.request_id)
        return
    for sink in state_of(app).call_sinks:
        try:
            sink(finished)
        except Exception:
            log.exception("call sink %r failed", sink)


def refuse_call(app: Flask, call: CallInFlight, status: int, message: str, outcome: str) -> Response:
    """Answer a call ourselves (403, 413, 503, 502, ...) in the error shape of its API, and record it."""
    if call.intake is None:  # refused before its body was read
        call.intake = intake_module.read_intake(call.endpoint, None)
    if call.sent is None:
        call.sent = time.perf_counter()
    call.http_status = status
    response = answer_ourselves(call.endpoint, status, message)
    response.headers["X-Request-ID"] = call.request_id
    call.ended, call.sent_bytes, call.ttft_ms = time.perf_counter(), len(response.get_data()), None
    settle(app, call, Usage(), outcome, message)
    return response


def _build_call(app: Flask, call: CallInFlight, usage: Usage, outcome: str, error: str | None) -> Call:
    intake, status = call.intake, call.http_status
    sampler = state_of(app).load_sampler
    cpu, memory = sampler.latest() if sampler is not None else (None, None)
    capture = app.config["CAPTURE_CONTENT"] and call.capture
    return Call(
        timestamp=call.timestamp,
        request_id=call.request_id,
        ip_source=call.ip_source,
        user_agent=call.user_agent,
        http_method=call.http_method,
        endpoint=call.endpoint,
        session_id=call.session_id or call.ip_source,
        model=intake.model or usage.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        model_parameters=intake.model_parameters,
        stream_mode=intake.stream_mode,
        request_size_bytes=call.request_size_bytes,
        response_size_bytes=call.sent_bytes,
        queue_time_ms=round(call.queue_time_ms, 3),
        processing_time_ms=_elapsed_ms(call.sent, call.ended),
        total_time_ms=_elapsed_ms(call.arrived, call.ended),
        http_status=status,
        error_message=error or usage.error_message or (f"HTTP {status}" if status >= 400 else None),
        system_load_cpu=cpu,
        system_load_memory=memory,
        concurrent_requests=call.concurrent_requests,
        outcome=outcome,
        ttft_ms=None if call.ttft_ms is None else round(call.ttft_ms, 3),
        tokens_per_second=None if usage.tokens_per_second is None else round(usage.tokens_per_second, 3),
        load_duration_ms=_ms(usage.load_duration_ns),
        prompt_eval_duration_ms=_ms(usage.prompt_eval_duration_ns),
        eval_duration_ms=_ms(usage.eval_duration_ns),
        done_reason=usage.done_reason,
        api=intake.api,
        prompt=intake.prompt if capture else None,
        response_preview=(usage.response_preview or None) if capture else None,
        cached_input_tokens=usage.cached_input_tokens,
        remote_model=usage.remote_model,
        remote_host=usage.remote_host,
        cold_start=is_cold_start(_ms(usage.load_duration_ns)),
        key_name=call.key_name,
        instance=app.config["INSTANCE"],
        upstream=app.config["UPSTREAM"],
    )


def _elapsed_ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


def _ms(nanoseconds: int | None) -> float | None:
    return None if nanoseconds is None else round(nanoseconds / 1e6, 3)
