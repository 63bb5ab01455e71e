"""OpenTelemetry: each finished model call as a GenAI span, and the GenAI metrics, sent over OTLP/HTTP.

A call sink, like the Prometheus metrics and the writer: it turns a ``Call`` into one span named
"{operation} {model}" with the GenAI semantic conventions' attributes, continuing the client's W3C ``traceparent``,
and records the GenAI histograms. The SDK starts in each process on its first call, so a gunicorn worker starts its
own after the fork (exporter threads and HTTP sessions do not survive one). Spans wait in a bounded queue: a slow or
dead collector costs dropped spans, counted in ``dropped``, never a slower call.

It reads no environment variable (config.py passes the OTEL_* values in), exports nothing for calls that are not
model operations (/api/tags, /api/pull, ...), and exports prompt and answer text only when both content settings
allow it.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from proxy_app import __version__
from proxy_app.calls import Call
from proxy_app.ops.labels import BoundedLabels
from proxy_app.state import state_of

# gen_ai.operation.name by path: the GenAI conventions' names for what each Ollama endpoint does.
OPERATIONS = {
    "/api/chat": "chat",
    "/api/generate": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
}
PROVIDER = "ollama"  # gen_ai.provider.name: not one of the conventions' well-known values, which allow custom ones
# Why: the bucket boundaries the GenAI metric conventions give for each histogram.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The GenAI metric conventions' histograms: attribute here -> (name, unit, description, bucket boundaries).
HISTOGRAMS = {
    "token_usage": ("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS),
    "duration": ("gen_ai.client.operation.duration", "s", "GenAI operation duration.", DURATION_BUCKETS),
    "first_chunk": (
        "gen_ai.client.operation.time_to_first_chunk", "s", "Time to receive the first chunk.", DURATION_BUCKETS
    ),
    "first_token": ("gen_ai.server.time_to_first_token", "s", "Time to generate first token.", FIRST_TOKEN_BUCKETS),
    "per_token": (
        "gen_ai.server.time_per_output_token", "s", "Time per output token generated.", PER_TOKEN_BUCKETS
    ),
}  # fmt: skip
# Why: a dead collector must not hold a worker's exit (and the writer's last rows) for the SDK's 30 s.
SHUTDOWN_SECONDS = 5.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def init_app(app) -> None:
    """With OTEL on, register the span-and-metrics sink and its shutdown hook; the SDK starts on the first call."""
    if not app.config["OTEL"]:
        return
    export = OtelExport(app.config)
    state_of(app).otel = export
    state_of(app).call_sinks.append(export.submit)
    state_of(app).shutdown_hooks.append(export.shutdown)


class OtelExport:
    """One app's OpenTelemetry export: ``submit`` is the call sink; the SDK objects are made once per process."""

    def __init__(self, config) -> None:
        from opentelemetry import sdk  # noqa: F401  (imported now, so the first call does not pay for it)
        from opentelemetry.exporter.otlp.proto.http import metric_exporter, trace_exporter  # noqa: F401

        self.config = config
        upstream = urlsplit(config["UPSTREAM"])
        self.server = {"server.address": upstream.hostname, "server.port": upstream.port or _default_port(upstream)}
        self.capture = config["CAPTURE_CONTENT"] and config["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"]
        self.models = BoundedLabels(config["MAX_MODELS"])  # metric attributes stay bounded, as Prometheus labels do
        self.shutdown_seconds = SHUTDOWN_SECONDS
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._sdk: _Sdk | None = None
        self._shut_pid: int | None = None  # the process whose SDK was shut down

    @property
    def dropped(self) -> int:
        """Spans this process made that will never reach the collector (queue full, export failed, shut down)."""
        sdk = self._sdk if self._pid == os.getpid() else None
        return 0 if sdk is None else sdk.spans.dropped

    def submit(self, call: Call) -> None:
        """Export one finished call as a span and in the metrics; calls that are not model operations are skipped."""
        operation = OPERATIONS.get(call.endpoint)
        if operation is None:
            return
        sdk = self._started()
        self._record_span(sdk, call, operation)
        self._record_metrics(sdk, call, operation)

    def flush(self, timeout: float = 10.0) -> None:
        """Send what this process holds now (tests, and anyone who must not wait for the next batch)."""
        sdk = self._sdk if self._pid == os.getpid() else None
        if sdk is not None:
            sdk.tracer_provider.force_flush(int(timeout * 1000))
            sdk.meter_provider.force_flush(timeout * 1000)

    def shutdown(self) -> None:
        """Send what is left and stop this process's exporters, within ``shutdown_seconds``; safe to call twice."""
        with self._lock:
            sdk = self._sdk if self._pid == os.getpid() != self._shut_pid else None
            self._shut_pid = os.getpid()
        if sdk is not None:
            sdk.spans.shutdown(self.shutdown_seconds)
            sdk.tracer_provider.shutdown()  # the span queue is down already: this ends the provider
            sdk.meter_provider.shutdown(timeout_millis=self.shutdown_seconds * 1000)

    def _started(self) -> _Sdk:
        """This process's SDK objects, made on its first call (a forked child makes its own)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._sdk, self._pid = _Sdk(self.config, self.shutdown_seconds), os.getpid()
        return self._sdk

    def _record_span(self, sdk: _Sdk, call: Call, operation: str) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        start = (call.timestamp - _EPOCH) // timedelta(microseconds=1) * 1000
        parent = sdk.propagator.extract(call.trace_context) if call.trace_context else None
        name = f"{operation} {call.model}" if call.model else operation
        attributes = self._span_attributes(call, operation)
        span = sdk.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes, start_time=start
        )
        if "error.type" in attributes:
            span.set_status(Status(StatusCode.ERROR, call.error_message))
        span.end(end_time=start + round(call.total_time_ms * 1e6))

    def _span_attributes(self, call: Call, operation: str) -> dict:
        """The span's attributes: the GenAI conventions' names, then Ollama's own durations (seconds)."""
        attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, **self.server}
        error_type = _error_type(call)
        values = {
            "gen_ai.request.model": call.model,
            "gen_ai.response.model": None if error_type else call.model,  # Ollama answers as the model asked
            "gen_ai.request.stream": call.stream_mode,
            "gen_ai.usage.input_tokens": call.input_tokens,
            "gen_ai.usage.output_tokens": call.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": getattr(call, "cached_input_tokens", None),
            "gen_ai.response.finish_reasons": [call.done_reason] if call.done_reason else None,
            "gen_ai.response.time_to_first_chunk": _seconds(call.ttft_ms) if call.stream_mode else None,
            "http.response.status_code": call.http_status or None,
            "error.type": error_type,
            "ollama.load_duration": _seconds(call.load_duration_ms),
            "ollama.prompt_eval_duration": _seconds(call.prompt_eval_duration_ms),
            "ollama.eval_duration": _seconds(call.eval_duration_ms),
            "ollama_proxy.request_id": call.request_id,  # the X-Request-ID header and the stored row's id
        }
        attributes.update((key, value) for key, value in values.items() if value is not None)
        if self.capture:
            attributes.update(_content(call))
        return attributes

    def _record_metrics(self, sdk: _Sdk, call: Call, operation: str) -> None:
        error_type = _error_type(call)
        model = self.models.label(call.model, not error_type) if call.model else None
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, **self.server}
        if model is not None:
            common["gen_ai.request.model"] = model
        failed = {**common, "error.type": error_type} if error_type else common
        sdk.duration.record(call.total_time_ms / 1000, failed)
        for kind, count in (("input", call.input_tokens), ("output", call.output_tokens)):
            if count is not None:
                sdk.token_usage.record(count, {**common, "gen_ai.token.type": kind})
        if call.stream_mode and call.ttft_ms is not None:
            sdk.first_chunk.record(call.ttft_ms / 1000, failed)
        if error_type:
            return
        if call.prompt_eval_duration_ms is not None:  # Ollama's own: model load and prompt evaluation
            sdk.first_token.record(((call.load_duration_ms or 0) + call.prompt_eval_duration_ms) / 1000, common)
        if call.eval_duration_ms is not None and call.output_tokens:
            sdk.per_token.record(call.eval_duration_ms / 1000 / call.output_tokens, common)


class _Sdk:
    """One process's tracer and meter providers, OTLP/HTTP exporters and instruments."""

    def __init__(self, config, shutdown_seconds: float) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from proxy_app.ops.span_queue import SpanQueue

        endpoint, headers = config["OTEL_EXPORTER_OTLP_ENDPOINT"], config["OTEL_EXPORTER_OTLP_HEADERS"]
        resource = Resource.create(
            {
                "service.name": config["OTEL_SERVICE_NAME"],
                "service.version": __version__,
                "service.instance.id": uuid.uuid4().hex,  # each worker's cumulative metrics are its own series
                "process.pid": os.getpid(),
            }
        )
        span_exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", headers=headers)
        self.spans = SpanQueue(span_exporter, config["OTEL_BSP_MAX_QUEUE_SIZE"], shutdown_seconds)
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(self.spans)
        self.tracer = self.tracer_provider.get_tracer("ollama-proxy", __version__)
        self.propagator = TraceContextTextMapPropagator()
        readers = []
        if config["OTEL_METRICS_EXPORTER"] == "otlp":
            metric_exporter = OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics", headers=headers)
            readers.append(PeriodicExportingMetricReader(metric_exporter))
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        meter = self.meter_provider.get_meter("ollama-proxy", __version__)
        for attribute, (name, unit, description, buckets) in HISTOGRAMS.items():
            instrument = meter.create_histogram(name, unit, description, explicit_bucket_boundaries_advisory=buckets)
            setattr(self, attribute, instrument)


def _error_type(call: Call) -> str | None:
    """error.type: the HTTP status of a failed call, else the outcome of one that did not complete; None if fine."""
    if call.http_status >= 400:
        return str(call.http_status)
    return None if call.outcome == "completed" else call.outcome


def _content(call: Call) -> dict:
    """The opt-in message attributes, from what the Call kept (none where CAPTURE_CONTENT kept nothing)."""
    attributes = {}
    if call.prompt is not None:
        message = {"role": "user", "parts": [{"type": "text", "content": call.prompt}]}
        attributes["gen_ai.input.messages"] = json.dumps([message], ensure_ascii=False)
    if call.response_preview is not None:
        answer = {"role": "assistant", "parts": [{"type": "text", "content": call.response_preview}]}
        if call.done_reason:
            answer["finish_reason"] = call.done_reason
        attributes["gen_ai.output.messages"] = json.dumps([answer], ensure_ascii=False)
    return attributes


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000


def _default_port(url) -> int:
    return 443 if url.scheme == "https" else 80
