"""OpenTelemetry: the real SDK and OTLP/HTTP exporter send each model call to a small collector here, which decodes
the protobuf with opentelemetry-proto; spans, metrics, trace continuation, content opt-in, a dead collector, and
gunicorn workers."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import psutil
import pytest
import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy_app import config, create_app, shutdown
from proxy_app.ops import otel
from proxy_app.state import state_of
from tests.conftest import free_port
from tests.fake_ollama import serve
from tests.test_metrics import make_call, samples

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
GENERATE = {"model": "llama3.2", "prompt": "Why is the sky blue?"}
METRIC_NAMES = {
    "gen_ai.client.token.usage",
    "gen_ai.client.operation.duration",
    "gen_ai.client.operation.time_to_first_chunk",
    "gen_ai.server.time_to_first_token",
    "gen_ai.server.time_per_output_token",
}


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind)


def _attributes(key_values) -> dict:
    return {pair.key: _value(pair.value) for pair in key_values}


class OtlpReceiver:
    """A collector on an ephemeral port: OTLP/HTTP protobuf in, decoded spans and metric points kept for tests."""

    def __init__(self) -> None:
        self.spans: list[SimpleNamespace] = []
        self.metric_exports: list[tuple[dict, object]] = []  # (resource attributes, ResourceMetrics) per export
        self.headers: list = []  # each export's headers (case-insensitive HTTPMessage)
        self._changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.receive(self.path, body, self.headers)
                answer = (ExportTraceServiceResponse if self.path == "/v1/traces" else ExportMetricsServiceResponse)()
                payload = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        return Handler

    def receive(self, path: str, body: bytes, headers) -> None:
        with self._changed:
            self.headers.append(headers)
            if path == "/v1/traces":
                for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    for scope in resource_spans.scope_spans:
                        self.spans.extend(_span(span, resource) for span in scope.spans)
            elif path == "/v1/metrics":
                for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                    self.metric_exports.append((_attributes(resource_metrics.resource.attributes), resource_metrics))
            self._changed.notify_all()

    def wait_for_spans(self, count: int, timeout: float = 15.0) -> list[SimpleNamespace]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.spans) >= count, timeout):
                raise AssertionError(f"expected {count} spans, got {len(self.spans)}")
            return list(self.spans)

    def points(self, name: str) -> list[SimpleNamespace]:
        """The histogram points of metric ``name`` in the latest export that has it (cumulative: the totals)."""
        with self._changed:
            for _resource, resource_metrics in reversed(self.metric_exports):
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        if metric.name == name:
                            return [_point(metric, point) for point in metric.histogram.data_points]
        return []

    def metric_names(self) -> set[str]:
        with self._changed:
            return {
                metric.name
                for _resource, resource_metrics in self.metric_exports
                for scope in resource_metrics.scope_metrics
                for metric in scope.metrics
            }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _span(span, resource: dict) -> SimpleNamespace:
    return SimpleNamespace(
        name=span.name, kind=span.kind, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(), trace_state=span.trace_state, start=span.start_time_unix_nano,
        end=span.end_time_unix_nano, attributes=_attributes(span.attributes), status=span.status.code,
        status_message=span.status.message, resource=resource,
    )  # fmt: skip


def _point(metric, point) -> SimpleNamespace:
    return SimpleNamespace(
        unit=metric.unit, attributes=_attributes(point.attributes), count=point.count, sum=point.sum,
        bounds=tuple(point.explicit_bounds),
    )  # fmt: skip


@pytest.fixture
def receiver():
    handle = OtlpReceiver()
    yield handle
    handle.close()


@pytest.fixture
def settings(settings, receiver) -> dict:
    """conftest's settings with OTEL on, sending to this test's collector."""
    return {**settings, "OTEL": True, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}


def exported(app, receiver: OtlpReceiver, count: int) -> dict[str, SimpleNamespace]:
    """Flush this process's spans and metrics; return the spans by the request id they carry."""
    state_of(app).otel.flush()
    spans = receiver.wait_for_spans(count)
    assert len(spans) == count, [span.name for span in spans]
    return {span.attributes["ollama_proxy.request_id"]: span for span in spans}


def post(proxy, path: str, body: dict, **options) -> requests.Response:
    response = requests.post(proxy.url + path, json=body, timeout=10, **options)
    response.content  # noqa: B018  (read to the end; the recorder tells when the call is settled)
    return response


def span_times(call) -> tuple[int, int]:
    """The span start and end (Unix ns) a Call should give: arrival, and arrival plus the total time."""
    start = int(call.timestamp.timestamp() * 1_000_000) * 1000
    return start, start + round(call.total_time_ms * 1e6)


def test_otel_native_calls_are_genai_spans(live_proxy, app, recorder, receiver, upstream, fake):
    post(live_proxy, "/api/chat", {**CHAT, "stream": False})
    post(live_proxy, "/api/chat", {**CHAT, "stream": True})
    post(live_proxy, "/api/generate", {**GENERATE, "stream": False})
    post(live_proxy, "/api/generate", {**GENERATE, "stream": True})
    calls = recorder.wait_for(4)
    spans = exported(app, receiver, 4)
    prompt_tokens = fake.expected_prompt_tokens("Why is the sky blue?")
    for call in calls:
        span = spans[call.request_id]
        operation = "chat" if call.endpoint == "/api/chat" else "text_completion"
        expected = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "ollama",
            "server.address": "127.0.0.1",
            "server.port": int(upstream.port),
            "gen_ai.request.model": "llama3.2",
            "gen_ai.response.model": "llama3.2",
            "gen_ai.request.stream": call.stream_mode,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": 5,
            "gen_ai.response.finish_reasons": ["stop"],
            "http.response.status_code": 200,
            "ollama.load_duration": 0.001,
            "ollama.prompt_eval_duration": prompt_tokens / 1000,
            "ollama.eval_duration": 0.05,
            "ollama_proxy.request_id": call.request_id,
        }
        if call.stream_mode:
            expected["gen_ai.response.time_to_first_chunk"] = call.ttft_ms / 1000
        assert span.attributes == expected
        assert (span.name, span.kind, span.status) == (f"{operation} llama3.2", Span.SPAN_KIND_CLIENT, 0)
        assert (span.start, span.end) == span_times(call)
        assert span.parent_span_id == ""  # no traceparent: a trace of its own
    assert sorted(call.stream_mode for call in calls) == [False, False, True, True]
    resource = next(iter(spans.values())).resource
    assert resource["service.name"] == "ollama-proxy" and resource["process.pid"] == psutil.Process().pid


def test_otel_openai_chat_spans_streamed_and_not(live_proxy, app, recorder, receiver, fake):
    post(live_proxy, "/v1/chat/completions", {**CHAT, "stream": False})
    post(live_proxy, "/v1/chat/completions", {**CHAT, "stream": True})
    calls = recorder.wait_for(2)
    spans = exported(app, receiver, 2)
    for call in calls:
        span = spans[call.request_id]
        assert span.name == "chat llama3.2"
        attributes = span.attributes
        assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.response.finish_reasons"] == [
            "stop"
        ]
        counts = attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]
        assert counts == (fake.expected_prompt_tokens("Why is the sky blue?"), 5) == (call.input_tokens, 5)
        assert not [name for name in attributes if name.startswith("ollama.")]  # the OpenAI API gives no durations
        assert ("gen_ai.response.time_to_first_chunk" in attributes) is call.stream_mode


def test_otel_upstream_404_is_an_error_span(live_proxy, app, recorder, receiver):
    response = post(live_proxy, "/api/chat", {**CHAT, "model": "no-such-model", "stream": False})
    assert response.status_code == 404
    (call,) = recorder.wait_for(1)
    (span,) = exported(app, receiver, 1).values()
    assert span.name == "chat no-such-model" and span.status == Status.STATUS_CODE_ERROR
    assert span.status_message == call.error_message and "not found" in span.status_message
    attributes = span.attributes
    assert (attributes["error.type"], attributes["http.response.status_code"]) == ("404", 404)
    assert "gen_ai.response.model" not in attributes and "gen_ai.usage.output_tokens" not in attributes
    (duration,) = receiver.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "404" and duration.count == 1
    assert duration.attributes["gen_ai.request.model"] == "other"  # a failed call admits no new model name


def test_otel_client_that_leaves_is_an_error_span(live_proxy, app, recorder, receiver, fake):
    fake.tokens, fake.token_delay = ["tok"] * 200, 0.05
    with socket.create_connection(("127.0.0.1", live_proxy.port)) as sock:
        body = json.dumps({**GENERATE, "stream": True}).encode()
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        received = b""
        while received.count(b"\n") < 12:
            received += sock.recv(4096)
    (call,) = recorder.wait_for(1, timeout=5)
    (span,) = exported(app, receiver, 1).values()
    assert call.outcome == "client_gone" and span.status == Status.STATUS_CODE_ERROR
    assert (span.attributes["error.type"], span.attributes["http.response.status_code"]) == ("client_gone", 200)


def test_otel_span_continues_the_clients_trace(live_proxy, app, recorder, receiver):
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}
    post(live_proxy, "/api/generate", {**GENERATE, "stream": False}, headers=headers)
    post(live_proxy, "/api/generate", {**GENERATE, "stream": False}, headers={"traceparent": TRACEPARENT[:-2] + "00"})
    post(live_proxy, "/api/generate", {**GENERATE, "stream": False}, headers={"traceparent": "not-a-traceparent"})
    calls = {call.trace_context["traceparent"][-2:]: call for call in recorder.wait_for(3)}  # any order
    spans = exported(app, receiver, 2)  # the client did not sample the second call: no span
    continued, fresh = spans[calls["01"].request_id], spans[calls["nt"].request_id]
    assert (continued.trace_id, continued.parent_span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert continued.trace_state == "vendor=opaque"
    assert fresh.trace_id != continued.trace_id and fresh.parent_span_id == ""
    assert calls["00"].request_id not in spans


def test_otel_other_calls_make_no_span(live_proxy, app, recorder, receiver):
    assert requests.get(live_proxy.url + "/api/tags", timeout=10).status_code == 200
    assert requests.get(live_proxy.url + "/api/version", timeout=10).status_code == 200
    post(live_proxy, "/api/embed", {"model": "all-minilm", "input": ["a b", "c"]})
    (embed,) = [call for call in recorder.wait_for(3) if call.endpoint == "/api/embed"]
    assert exported(app, receiver, 1)[embed.request_id].name == "embeddings all-minilm"


@pytest.mark.parametrize("endpoint", ["/v1/messages", "/v1/responses"])
def test_otel_messages_and_responses_are_chat(app, receiver, endpoint):
    # The fake serves neither API yet; the sink maps them by the Call's endpoint.
    state_of(app).otel.submit(make_call(endpoint=endpoint, api="openai", input_tokens=3, output_tokens=4))
    (span,) = exported(app, receiver, 1).values()
    assert span.name == "chat llama3.2" and span.attributes["gen_ai.operation.name"] == "chat"


def test_otel_metrics_follow_the_genai_conventions(live_proxy, app, recorder, receiver, upstream, fake):
    post(live_proxy, "/api/chat", {**CHAT, "stream": False})
    post(live_proxy, "/api/generate", {**GENERATE, "stream": True})
    post(live_proxy, "/v1/chat/completions", {**CHAT, "stream": True})
    post(live_proxy, "/api/chat", {**CHAT, "model": "no-such-model", "stream": False})
    calls = recorder.wait_for(4)
    exported(app, receiver, 4)
    assert receiver.metric_names() == METRIC_NAMES
    common = {"gen_ai.provider.name": "ollama", "server.address": "127.0.0.1", "server.port": int(upstream.port)}
    tokens = receiver.points("gen_ai.client.token.usage")
    assert {(point.attributes["gen_ai.operation.name"], point.attributes["gen_ai.token.type"]) for point in tokens} == {
        ("chat", "input"), ("chat", "output"), ("text_completion", "input"), ("text_completion", "output"),
    }  # fmt: skip
    for point in tokens:
        assert point.attributes.items() >= {**common, "gen_ai.request.model": "llama3.2"}.items()
        assert point.unit == "{token}" and point.bounds == otel.TOKEN_BUCKETS
    prompt_tokens = fake.expected_prompt_tokens("Why is the sky blue?")
    assert sum(point.sum for point in tokens if point.attributes["gen_ai.token.type"] == "input") == 3 * prompt_tokens
    assert sum(point.sum for point in tokens if point.attributes["gen_ai.token.type"] == "output") == 15
    durations = receiver.points("gen_ai.client.operation.duration")
    assert sum(point.count for point in durations) == 4
    assert sum(point.sum for point in durations) == pytest.approx(sum(call.total_time_ms for call in calls) / 1000)
    assert [point.attributes.get("error.type") for point in durations].count("404") == 1
    streamed = [call for call in calls if call.stream_mode]
    first_chunks = receiver.points("gen_ai.client.operation.time_to_first_chunk")
    assert sum(point.sum for point in first_chunks) == pytest.approx(sum(call.ttft_ms for call in streamed) / 1000)
    native = [call for call in calls if call.api == "native" and call.http_status == 200]
    server_first = receiver.points("gen_ai.server.time_to_first_token")
    expected_first = sum(call.load_duration_ms + call.prompt_eval_duration_ms for call in native) / 1000
    assert sum(point.count for point in server_first) == 2
    assert sum(point.sum for point in server_first) == pytest.approx(expected_first)
    per_token = receiver.points("gen_ai.server.time_per_output_token")
    assert sum(point.count for point in per_token) == 2 and sum(point.sum for point in per_token) == pytest.approx(0.02)
    assert {point.bounds for point in per_token} == {otel.PER_TOKEN_BUCKETS}


def test_otel_content_only_with_both_opt_ins(upstream, tmp_path, receiver):
    base = {
        "UPSTREAM": upstream.url,
        "DATA_DIR": str(tmp_path),
        "OTEL": True,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
    }
    cases = [
        ({}, False),
        ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}, True),
        ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true", "CAPTURE_CONTENT": False}, False),
    ]
    for count, (changes, has_content) in enumerate(cases, start=1):
        app = create_app({**base, **changes}, environ={})
        try:
            response = app.test_client().post("/api/chat", json={**CHAT, "stream": False})
            assert response.status_code == 200 and response.get_json()["done"] is True
            state_of(app).otel.flush()
        finally:
            shutdown(app)
        attributes = receiver.wait_for_spans(count)[-1].attributes
        assert ("gen_ai.input.messages" in attributes) is has_content
        assert ("gen_ai.output.messages" in attributes) is has_content
        if has_content:
            assert json.loads(attributes["gen_ai.input.messages"]) == [
                {"role": "user", "parts": [{"type": "text", "content": "Why is the sky blue?"}]}
            ]
            assert json.loads(attributes["gen_ai.output.messages"]) == [
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": "The sky is blue."}],
                    "finish_reason": "stop",
                }
            ]


def test_otel_metrics_exporter_none_sends_spans_only(upstream, tmp_path, receiver):
    settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "OTEL": True,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_METRICS_EXPORTER": "none"}  # fmt: skip
    app = create_app(settings, environ={})
    try:
        assert app.test_client().post("/api/generate", json={**GENERATE, "stream": False}).get_json()["done"]
        state_of(app).otel.flush()
    finally:
        shutdown(app)
    assert len(receiver.wait_for_spans(1)) == 1 and receiver.metric_exports == []


def test_otel_headers_reach_the_collector_and_stay_masked(upstream, tmp_path, receiver):
    headers = "Authorization=Basic%20cGs6c2s=,X-Scope=team a"
    settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "OTEL": True,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url + "/", "OTEL_EXPORTER_OTLP_HEADERS": headers}  # fmt: skip
    app = create_app(settings, environ={})
    try:
        assert app.test_client().post("/api/generate", json={**GENERATE, "stream": False}).get_json()["done"]
        state_of(app).otel.flush()
    finally:
        shutdown(app)
    sent = receiver.headers[0]
    assert (sent["Authorization"], sent["X-Scope"]) == ("Basic cGs6c2s=", "team a")
    assert config.masked(app.config)["OTEL_EXPORTER_OTLP_HEADERS"] == "***"


def test_otel_settings_checked_only_when_on():
    bad = {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318", "OTEL_BSP_MAX_QUEUE_SIZE": "0"}
    values = config.merge(environ=bad)
    assert values["OTEL"] is False and values["OTEL_EXPORTER_OTLP_ENDPOINT"] == "collector:4318"
    with pytest.raises(config.SettingError, match="^OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318': must be an http"):
        config.merge(environ={**bad, "OLLAMA_PROXY_OTEL": "true"})
    good = config.merge(environ={"OLLAMA_PROXY_OTEL": "1", "OTEL_SERVICE_NAME": "gpu-box"})
    assert (good["OTEL_SERVICE_NAME"], good["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("gpu-box", "http://localhost:4318")
    assert (good["OTEL_EXPORTER_OTLP_HEADERS"], good["OTEL_BSP_MAX_QUEUE_SIZE"]) == ({}, 2048)
    assert good["OTEL_METRICS_EXPORTER"] == "otlp"
    assert good["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] is False


def test_otel_off_adds_no_sink_and_no_counter(upstream, tmp_path):
    app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path)}, environ={})
    try:
        assert state_of(app).otel is None
        assert "ollama_proxy_otel" not in app.test_client().get("/metrics").get_data(as_text=True)
    finally:
        shutdown(app)


def test_otel_dead_collector_leaves_calls_whole_and_counts_drops(upstream, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every export is refused, and retried for seconds
    settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "OTEL": True,
                "OTEL_EXPORTER_OTLP_ENDPOINT": dead, "OTEL_BSP_MAX_QUEUE_SIZE": "2"}  # fmt: skip
    app = create_app(settings, environ={})
    proxy = serve(app)
    try:
        for _ in range(6):
            # Streamed, so the client gets the last chunk only after every sink has taken the call: a sink that
            # waited for the exporter's retries would run past this timeout.
            response = requests.post(proxy.url + "/api/generate", json={**GENERATE, "stream": True}, timeout=3)
            assert response.status_code == 200 and response.text.count("\n") == 6
        scraped = samples(app.test_client().get("/metrics").get_data(as_text=True), "ollama_proxy_otel_dropped_total")
        assert scraped[""] >= 2  # two may wait in the queue and two in the exporter's hands; the rest are refused
        export = state_of(app).otel
        export.shutdown_seconds = 0.5  # the collector is dead: give up on it at once
    finally:
        proxy.close()
        shutdown(app)
    assert export.dropped == 6  # refused, failed to export, or still queued at shutdown: none arrived


def test_otel_spans_arrive_from_gunicorn_workers(receiver, gunicorn_proxy):  # receiver first: it outlives the workers
    env = {"OLLAMA_PROXY_OTEL": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "200"}  # fmt: skip
    proxy = gunicorn_proxy(workers=2, threads=8, **env)
    workers = {child.pid for child in psutil.Process(proxy.process.pid).children()}
    assert len(workers) == 2

    def call(_):
        return post(proxy, "/api/generate", {**GENERATE, "stream": True}, headers={"X-Fake-Token-Delay": "0.05"})

    threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = receiver.wait_for_spans(8, timeout=30)
    pids = {span.resource["process.pid"] for span in spans}
    assert pids <= workers and proxy.process.pid not in pids
    instances = {span.resource["process.pid"]: span.resource["service.instance.id"] for span in spans}
    assert len(set(instances.values())) == len(pids)  # each worker is an instance of its own
    assert {span.name for span in spans} == {"text_completion llama3.2"}
    deadline = time.monotonic() + 30
    while "gen_ai.client.operation.duration" not in receiver.metric_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gen_ai.client.operation.duration" in receiver.metric_names()
