"""Metrics: exact /metrics lines after known calls, bounded labels, the token, promtool, deploy assets, workers."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest

from proxy_app import access, create_app, shutdown
from proxy_app.calls import Call
from proxy_app.ops import labels, metrics
from proxy_app.state import state_of
from tests.conftest import CallRecorder, free_port, need
from tests.fake_ollama import serve

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CALL_DEFAULTS = {field.name: None for field in fields(Call)} | {
    "timestamp": datetime(2025, 5, 1, tzinfo=UTC), "request_id": "r", "ip_source": "127.0.0.1", "user_agent": "",
    "http_method": "POST", "endpoint": "/api/generate", "session_id": "", "model": "llama3.2", "stream_mode": True,
    "request_size_bytes": 10, "response_size_bytes": 10, "queue_time_ms": 0.0, "total_time_ms": 1000.0,
    "http_status": 200, "concurrent_requests": 1, "outcome": "completed", "api": "native",
}  # fmt: skip


def make_call(**changes) -> Call:
    """A Call with plausible defaults; tests name only the fields that matter."""
    return Call(**(CALL_DEFAULTS | changes))


def family(text: str, *names: str) -> str:
    """Return the HELP/TYPE lines and samples of the named metric families from an exposition, in that order."""
    blocks = [text.split(f"# HELP {name} ", 1)[1].split("\n# HELP ", 1)[0] for name in names]
    return "".join(f"# HELP {name} {block.rstrip()}\n" for name, block in zip(names, blocks, strict=True))


def samples(text: str, name: str) -> dict[str, float]:
    """Return {labels: value} for every sample called exactly ``name``."""
    found = re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, flags=re.M)
    return {labels: float(value) for labels, value in found}


def observed(*calls: Call, max_models: int = 100) -> str:
    """Observe ``calls`` with metrics on a fresh registry and return the exposition text."""
    registry = CollectorRegistry()
    collected = metrics.make_metrics(registry, max_models=max_models)
    for call in calls:
        collected.observe(call)
    return generate_latest(registry).decode()


# ---- observe(call), no network -------------------------------------------------------------------------------


KNOWN_CALLS = (
    make_call(input_tokens=15, output_tokens=5, total_time_ms=1500.0, ttft_ms=200.0, tokens_per_second=40.0,
              load_duration_ms=1200.0, prompt_eval_duration_ms=30.0, key_name="team-a"),  # native stream
    make_call(model="qwen3", endpoint="/v1/chat/completions", api="openai", stream_mode=False, input_tokens=12,
              output_tokens=300, total_time_ms=8000.0, key_name="team-b"),  # OpenAI, not streamed: no TTFT
    make_call(model="nope", endpoint="/api/chat", http_status=404, outcome="upstream_error", total_time_ms=3.0),
    make_call(endpoint="/api/chat", outcome="client_gone", ttft_ms=90.0, total_time_ms=400.0, key_name="team-a"),
    make_call(endpoint="/v1/chat/completions", http_status=502, outcome="unreachable", total_time_ms=2.0,
              key_name="ci"),
    make_call(model=None, endpoint="/favicon.ico", http_method="GET", http_status=404, outcome="upstream_error"),
    make_call(model="llama3.2", endpoint="/api/blobs/sha256:abc", http_status=201, total_time_ms=20.0),
)  # fmt: skip


OBSERVED_REQUESTS = """\
# HELP ollama_requests_total Finished calls
# TYPE ollama_requests_total counter
ollama_requests_total{endpoint="/api/generate",key="team-a",model="llama3.2",outcome="completed",status="200"} 1.0
ollama_requests_total{endpoint="/v1/chat/completions",key="team-b",model="qwen3",outcome="completed",status="200"} 1.0
ollama_requests_total{endpoint="/api/chat",key="none",model="other",outcome="upstream_error",status="404"} 1.0
ollama_requests_total{endpoint="/api/chat",key="team-a",model="llama3.2",outcome="client_gone",status="200"} 1.0
ollama_requests_total{endpoint="/v1/chat/completions",key="ci",model="llama3.2",outcome="unreachable",status="502"} 1.0
ollama_requests_total{endpoint="other",key="none",model="none",outcome="upstream_error",status="404"} 1.0
ollama_requests_total{endpoint="/api/blobs",key="none",model="llama3.2",outcome="completed",status="201"} 1.0
"""
OBSERVED_TOKENS = """\
# HELP ollama_prompt_tokens_total Input tokens
# TYPE ollama_prompt_tokens_total counter
ollama_prompt_tokens_total{endpoint="/api/generate",key="team-a",model="llama3.2"} 15.0
ollama_prompt_tokens_total{endpoint="/v1/chat/completions",key="team-b",model="qwen3"} 12.0
# HELP ollama_completion_tokens_total Output tokens
# TYPE ollama_completion_tokens_total counter
ollama_completion_tokens_total{endpoint="/api/generate",key="team-a",model="llama3.2"} 5.0
ollama_completion_tokens_total{endpoint="/v1/chat/completions",key="team-b",model="qwen3"} 300.0
"""


def test_metrics_observe_counts_calls_exactly():
    text = observed(*KNOWN_CALLS)
    assert family(text, "ollama_requests_total") == OBSERVED_REQUESTS
    assert family(text, "ollama_prompt_tokens_total", "ollama_completion_tokens_total") == OBSERVED_TOKENS


OBSERVED_TOKENS_GENERATED = """\
# HELP ollama_tokens_generated Output tokens per call
# TYPE ollama_tokens_generated histogram
ollama_tokens_generated_bucket{le="1.0",model="llama3.2"} 0.0
ollama_tokens_generated_bucket{le="10.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="50.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="100.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="250.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="500.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="1000.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="2000.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="4000.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="8000.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="16000.0",model="llama3.2"} 1.0
ollama_tokens_generated_bucket{le="+Inf",model="llama3.2"} 1.0
ollama_tokens_generated_count{model="llama3.2"} 1.0
ollama_tokens_generated_sum{model="llama3.2"} 5.0
ollama_tokens_generated_bucket{le="1.0",model="qwen3"} 0.0
ollama_tokens_generated_bucket{le="10.0",model="qwen3"} 0.0
ollama_tokens_generated_bucket{le="50.0",model="qwen3"} 0.0
ollama_tokens_generated_bucket{le="100.0",model="qwen3"} 0.0
ollama_tokens_generated_bucket{le="250.0",model="qwen3"} 0.0
ollama_tokens_generated_bucket{le="500.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="1000.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="2000.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="4000.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="8000.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="16000.0",model="qwen3"} 1.0
ollama_tokens_generated_bucket{le="+Inf",model="qwen3"} 1.0
ollama_tokens_generated_count{model="qwen3"} 1.0
ollama_tokens_generated_sum{model="qwen3"} 300.0
"""
OBSERVED_TTFT = """\
# HELP ollama_time_to_first_token_seconds Arrival to first content
# TYPE ollama_time_to_first_token_seconds histogram
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="0.01",model="llama3.2"} 0.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="0.05",model="llama3.2"} 0.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="0.1",model="llama3.2"} 0.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="0.25",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="0.5",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="1.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="2.5",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="5.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="10.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="30.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="60.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="300.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/generate",le="+Inf",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_count{endpoint="/api/generate",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_sum{endpoint="/api/generate",model="llama3.2"} 0.2
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="0.01",model="llama3.2"} 0.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="0.05",model="llama3.2"} 0.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="0.1",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="0.25",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="0.5",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="1.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="2.5",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="5.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="10.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="30.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="60.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="300.0",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_bucket{endpoint="/api/chat",le="+Inf",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_count{endpoint="/api/chat",model="llama3.2"} 1.0
ollama_time_to_first_token_seconds_sum{endpoint="/api/chat",model="llama3.2"} 0.09
"""


def test_metrics_observe_histograms_exactly():
    text = observed(*KNOWN_CALLS)
    assert family(text, "ollama_tokens_generated") == OBSERVED_TOKENS_GENERATED
    assert family(text, "ollama_time_to_first_token_seconds") == OBSERVED_TTFT
    assert samples(text, "ollama_tokens_per_second_sum") == {'{model="llama3.2"}': 40.0}
    assert samples(text, "ollama_load_duration_seconds_sum") == {'{model="llama3.2"}': 1.2}
    assert samples(text, "ollama_prompt_eval_duration_seconds_sum") == {'{model="llama3.2"}': 0.03}
    assert samples(text, "ollama_request_duration_seconds_count") == {
        '{endpoint="/api/generate",model="llama3.2"}': 1.0,
        '{endpoint="/v1/chat/completions",model="qwen3"}': 1.0,
        '{endpoint="/api/chat",model="other"}': 1.0,
        '{endpoint="/api/chat",model="llama3.2"}': 1.0,
        '{endpoint="/v1/chat/completions",model="llama3.2"}': 1.0,
        '{endpoint="other",model="none"}': 1.0,
        '{endpoint="/api/blobs",model="llama3.2"}': 1.0,
    }
    durations = samples(text, "ollama_request_duration_seconds_sum")
    assert durations['{endpoint="/v1/chat/completions",model="qwen3"}'] == 8.0
    assert "ollama_queue_wait_seconds" not in text and "ollama_queue_depth" not in text  # no limit, no queue


OBSERVED_CACHED = """\
# HELP ollama_cached_prompt_tokens_total Cached input tokens
# TYPE ollama_cached_prompt_tokens_total counter
ollama_cached_prompt_tokens_total{endpoint="/v1/messages",key="none",model="llama3.2"} 1024.0
ollama_cached_prompt_tokens_total{endpoint="/api/chat",key="none",model="llama3.2"} 0.0
"""


def test_metrics_cached_prompt_tokens_counted_only_where_the_answer_says():
    text = observed(
        make_call(endpoint="/v1/messages", api="anthropic", input_tokens=1040, cached_input_tokens=1024),
        make_call(endpoint="/api/chat", input_tokens=20, cached_input_tokens=0),  # said: none came from the cache
        make_call(endpoint="/v1/responses", api="openai", input_tokens=26),  # not said: no series
    )
    assert family(text, "ollama_cached_prompt_tokens_total") == OBSERVED_CACHED
    assert samples(text, "ollama_prompt_tokens_total")['{endpoint="/v1/responses",key="none",model="llama3.2"}'] == 26.0


def test_metrics_model_label_capped():
    calls = [make_call(model=name) for name in ("a", "b", "c", "a")]
    calls += [make_call(model="d", http_status=404, outcome="upstream_error"), make_call(model="x" * 201)]
    text = observed(*calls, max_models=2)
    assert samples(text, "ollama_tokens_generated_count") == {}
    assert samples(text, "ollama_requests_total") == {
        '{endpoint="/api/generate",key="none",model="a",outcome="completed",status="200"}': 2.0,
        '{endpoint="/api/generate",key="none",model="b",outcome="completed",status="200"}': 1.0,
        '{endpoint="/api/generate",key="none",model="other",outcome="completed",status="200"}': 2.0,
        '{endpoint="/api/generate",key="none",model="other",outcome="upstream_error",status="404"}': 1.0,
    }


def test_metrics_key_label_capped_like_the_model_label():
    """The first MAX_MODELS key names keep their label, the rest are "other", anonymous calls "none". Unlike a model
    name, a key name is admitted by a refused call too: it names a key the proxy knows, not text the client chose."""
    calls = [make_call(key_name="a", http_status=429, outcome="rejected", input_tokens=None)]
    calls += [make_call(key_name=name, input_tokens=1) for name in ("a", "b", "c", "")]
    calls.append(make_call(key_name="d", http_status=429, outcome="rejected", input_tokens=None))
    text = observed(*calls, max_models=2)
    assert samples(text, "ollama_requests_total") == {
        '{endpoint="/api/generate",key="a",model="other",outcome="rejected",status="429"}': 1.0,  # not yet admitted
        '{endpoint="/api/generate",key="a",model="llama3.2",outcome="completed",status="200"}': 1.0,
        '{endpoint="/api/generate",key="b",model="llama3.2",outcome="completed",status="200"}': 1.0,
        '{endpoint="/api/generate",key="other",model="llama3.2",outcome="completed",status="200"}': 1.0,
        '{endpoint="/api/generate",key="none",model="llama3.2",outcome="completed",status="200"}': 1.0,
        '{endpoint="/api/generate",key="other",model="llama3.2",outcome="rejected",status="429"}': 1.0,
    }
    assert samples(text, "ollama_prompt_tokens_total") == {
        '{endpoint="/api/generate",key="a",model="llama3.2"}': 1.0,
        '{endpoint="/api/generate",key="b",model="llama3.2"}': 1.0,
        '{endpoint="/api/generate",key="other",model="llama3.2"}': 1.0,
        '{endpoint="/api/generate",key="none",model="llama3.2"}': 1.0,
    }


def test_metrics_model_flood_of_failing_names_keeps_real_models():
    names = labels.BoundedLabels(limit=3)
    assert {names.label(f"random-{n}", is_success=False) for n in range(1000)} == {"other"}
    assert names.label("llama3.2", is_success=True) == "llama3.2"
    assert names.label("llama3.2", is_success=False) == "llama3.2"  # known names keep their label on errors
    assert names.label(None, is_success=True) == names.label("", is_success=True) == "none"


@pytest.mark.parametrize(
    ("path", "label"),
    [("/api/chat", "/api/chat"), ("/", "/"), ("/v1/models", "/v1/models"), ("/v1/models/llama3.2", "/v1/models/{id}"),
     ("/v1/models/hf.co/org/m:Q4", "/v1/models/{id}"), ("/api/blobs/sha256:1", "/api/blobs"),
     ("/v1/responses", "/v1/responses"), ("/v1/messages", "/v1/messages"),
     ("/v1/audio/transcriptions", "/v1/audio/transcriptions"), ("/api/status", "/api/status"),
     ("/api/me", "/api/me"), ("/api/signout", "/api/signout"),
     ("/api/experimental/web_search", "/api/experimental/*"), ("/api/experimental/web_fetch", "/api/experimental/*"),
     ("/api/experimental/model-recommendations", "/api/experimental/*"), ("/api/experimental", "other"),
     ("/v1/messages/count_tokens", "other"), ("/api/chat/", "other"), ("/wp-login.php", "other"),
     ("/v1/chat/completions?x=1", "other")],
)  # fmt: skip
def test_metrics_endpoint_label_from_fixed_list(path, label):
    assert labels.endpoint_label(path) == label


WRITER_BLOCKS = """\
# HELP ollama_analytics_queue_depth Calls waiting to be stored
# TYPE ollama_analytics_queue_depth gauge
ollama_analytics_queue_depth 2.0
# HELP ollama_analytics_rows_written_total Rows stored
# TYPE ollama_analytics_rows_written_total counter
ollama_analytics_rows_written_total 10.0
# HELP ollama_analytics_rows_dropped_total Rows dropped (queue full or database down)
# TYPE ollama_analytics_rows_dropped_total counter
ollama_analytics_rows_dropped_total 4.0
"""


def test_metrics_writer_counts_copied():
    registry = CollectorRegistry()
    collected = metrics.make_metrics(registry)
    writer = SimpleNamespace(written=3, dropped=0, depth=lambda: 2)
    collected.copy_writer(writer)
    writer.written, writer.dropped = 10, 4
    collected.copy_writer(writer)
    collected.copy_writer(None)  # no writer configured: nothing changes
    text = generate_latest(registry).decode()
    names = (
        "ollama_analytics_queue_depth",
        "ollama_analytics_rows_written_total",
        "ollama_analytics_rows_dropped_total",
    )
    assert family(text, *names) == WRITER_BLOCKS


PROBE_BLOCKS = """\
# HELP ollama_upstream_up 1 if the last upstream probe succeeded, else 0
# TYPE ollama_upstream_up gauge
ollama_upstream_up 1.0
# HELP ollama_upstream_probe_duration_seconds How long the last upstream probe took
# TYPE ollama_upstream_probe_duration_seconds gauge
ollama_upstream_probe_duration_seconds 0.0123
"""


def test_metrics_process_and_build_info():
    registry = CollectorRegistry()
    collected = metrics.make_metrics(registry)
    collected.sample_process()
    collected.record_probe(True, 0.0123)
    text = generate_latest(registry).decode()
    assert samples(text, "ollama_proxy_process_cpu_seconds_total")[""] > 0
    assert samples(text, "ollama_proxy_process_resident_memory_bytes")[""] > 10_000_000
    assert list(samples(text, "ollama_proxy_build_info").values()) == [1.0]
    assert family(text, "ollama_upstream_up", "ollama_upstream_probe_duration_seconds") == PROBE_BLOCKS


# ---- through the real relay -------------------------------------------------------------------------------------


class Proxy:
    """Our app on a real port with its own settings, plus a recorder of finished calls."""

    def __init__(self, settings: dict, **overrides) -> None:
        self.app = create_app({**settings, **overrides}, environ={})
        self.recorder = CallRecorder()
        state_of(self.app).call_sinks.append(self.recorder)
        self.handle = serve(self.app, threads=16)
        self.url = self.handle.url

    def scrape(self, **headers) -> str:
        answer = requests.get(self.url + "/metrics", headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.text

    def close(self) -> None:
        self.handle.close()
        shutdown(self.app)


@pytest.fixture
def proxy_factory(settings):
    started: list[Proxy] = []

    def start(**overrides) -> Proxy:
        started.append(Proxy(settings, **overrides))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


def post(url: str, path: str, body: dict, **headers) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers, timeout=10)


def leave_mid_stream(url: str, path: str, body: dict, **headers) -> None:
    """Start a stream, read its first line, and hang up."""
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{head}"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        received = b""
        while b"\n{" not in received:  # headers, then the first NDJSON line
            received += sock.recv(4096)


def run_known_calls(proxy: Proxy, fake) -> int:
    """Native and OpenAI, streamed and not, errors and a disconnect, one after another; return the number of calls."""
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}
    assert post(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "why is the sky blue"}).ok
    assert post(proxy.url, "/api/chat", chat | {"stream": False}).ok
    assert "data: [DONE]" in post(proxy.url, "/v1/chat/completions", chat | {"stream": True}).text
    assert post(proxy.url, "/v1/chat/completions", chat).ok
    assert post(proxy.url, "/api/embed", {"model": "all-minilm", "input": ["one two", "three"]}).ok
    assert post(proxy.url, "/api/generate", {"model": "missing", "prompt": "x"}).status_code == 404
    assert post(proxy.url, "/api/chat", chat, **{"X-Fake-Fail-Status": "500"}).status_code == 500
    assert requests.get(proxy.url + "/no/such/path", timeout=10).status_code == 404
    leave_mid_stream(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"}, X_Fake_Token_Delay="0.2")
    proxy.recorder.wait_for(9)
    return 9


RELAY_REQUESTS = """\
# HELP ollama_requests_total Finished calls
# TYPE ollama_requests_total counter
ollama_requests_total{endpoint="/api/generate",key="none",model="llama3.2",outcome="completed",status="200"} 1.0
ollama_requests_total{endpoint="/api/chat",key="none",model="llama3.2",outcome="completed",status="200"} 1.0
ollama_requests_total{endpoint="/v1/chat/completions",key="none",model="llama3.2",outcome="completed",status="200"} 2.0
ollama_requests_total{endpoint="/api/embed",key="none",model="all-minilm",outcome="completed",status="200"} 1.0
ollama_requests_total{endpoint="/api/generate",key="none",model="other",outcome="upstream_error",status="404"} 1.0
ollama_requests_total{endpoint="/api/chat",key="none",model="llama3.2",outcome="upstream_error",status="500"} 1.0
ollama_requests_total{endpoint="other",key="none",model="none",outcome="upstream_error",status="404"} 1.0
ollama_requests_total{endpoint="/api/generate",key="none",model="llama3.2",outcome="client_gone",status="200"} 1.0
"""
RELAY_TOKENS = """\
# HELP ollama_prompt_tokens_total Input tokens
# TYPE ollama_prompt_tokens_total counter
ollama_prompt_tokens_total{endpoint="/api/generate",key="none",model="llama3.2"} 15.0
ollama_prompt_tokens_total{endpoint="/api/chat",key="none",model="llama3.2"} 12.0
ollama_prompt_tokens_total{endpoint="/v1/chat/completions",key="none",model="llama3.2"} 24.0
ollama_prompt_tokens_total{endpoint="/api/embed",key="none",model="all-minilm"} 23.0
# HELP ollama_completion_tokens_total Output tokens
# TYPE ollama_completion_tokens_total counter
ollama_completion_tokens_total{endpoint="/api/generate",key="none",model="llama3.2"} 5.0
ollama_completion_tokens_total{endpoint="/api/chat",key="none",model="llama3.2"} 5.0
ollama_completion_tokens_total{endpoint="/v1/chat/completions",key="none",model="llama3.2"} 10.0
"""


def test_metrics_relay_lines_exact(proxy_factory, fake):
    proxy = proxy_factory()
    run_known_calls(proxy, fake)
    text = proxy.scrape()
    prompt = fake.expected_prompt_tokens("why is the sky blue")  # 15
    chat_prompt = fake.expected_chat_prompt_tokens([{"content": "hello there"}])  # 12
    embed_prompt = fake.expected_embed_tokens(["one two", "three"])  # 23
    assert (prompt, chat_prompt, embed_prompt, len(fake.tokens)) == (15, 12, 23, 5)
    assert family(text, "ollama_requests_total") == RELAY_REQUESTS
    assert family(text, "ollama_prompt_tokens_total", "ollama_completion_tokens_total") == RELAY_TOKENS
    # The fake reports eval_duration = 10 ms a token, so native calls decode at exactly 100 tokens/s.
    assert samples(text, "ollama_tokens_per_second_count") == {'{model="llama3.2"}': 2.0}
    assert samples(text, "ollama_tokens_per_second_sum") == {'{model="llama3.2"}': 200.0}
    assert samples(text, "ollama_tokens_generated_sum") == {'{model="llama3.2"}': 20.0}
    # Two native generations at the fake's 1 ms load; its embed reports 1_019_500 ns, which the Call keeps as 1.02 ms.
    loads = {'{model="llama3.2"}': 0.002, '{model="all-minilm"}': 0.00102}
    assert samples(text, "ollama_load_duration_seconds_sum") == loads
    assert samples(text, "ollama_time_to_first_token_seconds_count") == {  # answers with content; embeddings have none
        '{endpoint="/api/generate",model="llama3.2"}': 2.0,  # the completed stream and the one cut after a line
        '{endpoint="/api/chat",model="llama3.2"}': 1.0,  # a whole JSON answer: its first byte
        '{endpoint="/v1/chat/completions",model="llama3.2"}': 2.0,
    }
    assert sum(samples(text, "ollama_request_duration_seconds_count").values()) == 9
    assert samples(text, "ollama_active_requests") == {"": 0.0}
    assert samples(text, "ollama_upstream_up") == {"": 1.0}  # the first scrape waited for the first probe


def test_metrics_active_and_queue_gauges(proxy_factory, fake):
    proxy = proxy_factory(MAX_CONCURRENT=1, QUEUE_TIMEOUT=5)
    fake.token_delay = 0.05
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"})
        fake.wait_for(lambda: len(fake.seen) >= 1)
        second = pool.submit(post, proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "y"})
        deadline = time.monotonic() + 5
        while samples(text := proxy.scrape(), "ollama_queue_depth") != {"": 1.0} and time.monotonic() < deadline:
            pass
        assert (samples(text, "ollama_active_requests"), samples(text, "ollama_queue_depth")) == ({"": 2.0}, {"": 1.0})
        assert first.result().ok and second.result().ok
    proxy.recorder.wait_for(2)
    text = proxy.scrape()
    assert (samples(text, "ollama_active_requests"), samples(text, "ollama_queue_depth")) == ({"": 0.0}, {"": 0.0})
    assert samples(text, "ollama_queue_wait_seconds_count") == {"": 2.0}
    assert samples(text, "ollama_queue_wait_seconds_sum")[""] >= 0.15  # the second call waited for 5 tokens at 0.05 s


def test_metrics_own_endpoints_timed_relay_excluded(proxy_factory):
    proxy = proxy_factory()
    requests.get(proxy.url + "/health", timeout=10)
    for path in ("/api/tags", "/random/path/1", "/random/path/2"):
        requests.get(proxy.url + path, timeout=10)
    text = proxy.scrape()
    assert samples(text, "ollama_proxy_http_request_duration_seconds_count") == {
        '{endpoint="ops.health",method="GET",status="200"}': 1.0
    }
    assert "path" not in family(text, "ollama_proxy_http_request_duration_seconds")


def test_metrics_token_required_when_set(proxy_factory):
    proxy = proxy_factory(METRICS_TOKEN="s3cret-token")
    for header in (None, "Bearer wrong", "Basic czNjcmV0LXRva2Vu", "s3cret-token", "Bearer s3cret-tokenX"):
        answer = requests.get(proxy.url + "/metrics", headers={"Authorization": header} if header else {}, timeout=10)
        assert (answer.status_code, answer.text) == (401, "unauthorized\n")
    assert "ollama_requests_total" in proxy.scrape(Authorization="Bearer s3cret-token")
    assert "ollama_requests_total" in proxy.scrape(Authorization="bearer s3cret-token")
    assert access.is_authorized(None, "")  # no token set: open, like Prometheus' own exporters


def test_metrics_openmetrics_when_asked(proxy_factory):
    proxy = proxy_factory()
    answer = requests.get(proxy.url + "/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n")


def test_metrics_promtool_check_metrics_silent(proxy_factory, fake):
    need(shutil.which("promtool") is not None, "promtool (Debian package prometheus)")
    proxy = proxy_factory(MAX_CONCURRENT=4)
    run_known_calls(proxy, fake)
    requests.get(proxy.url + "/health", timeout=10)
    checked = subprocess.run(["promtool", "check", "metrics"], input=proxy.scrape(), capture_output=True, text=True)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


# ---- deploy assets ------------------------------------------------------------------------------------------


def test_metrics_promtool_accepts_deploy_config_and_rules():
    need(shutil.which("promtool") is not None, "promtool (Debian package prometheus)")
    for kind, path in [("config", "prometheus/prometheus.yml"), ("rules", "prometheus/alerts.yml")]:
        checked = subprocess.run(["promtool", "check", kind, str(DEPLOY / path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    names = re.findall(r"^\s+- alert: (\w+)$", (DEPLOY / "prometheus/alerts.yml").read_text(), flags=re.M)
    assert names == ["OllamaProxyDown", "OllamaUpstreamDown", "OllamaHighErrorRate", "OllamaSlowFirstToken",
                     "OllamaAnalyticsRowsDropped"]  # fmt: skip


def exported_names(text: str) -> set[str]:
    """Every sample name in an exposition (histograms give _bucket, _sum and _count)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_grafana_panels_query_exported_metrics(proxy_factory, fake):
    proxy = proxy_factory(MAX_CONCURRENT=4)
    run_known_calls(proxy, fake)
    exported = exported_names(proxy.scrape())
    dashboard = json.loads((DEPLOY / "grafana/ollama-proxy.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            named = set(re.findall(r"\b(ollama_\w+)", target["expr"]))
            assert named and named <= exported, (panel["title"], named - exported)
    for variable in dashboard["templating"]["list"][1:]:
        assert set(re.findall(r"\b(ollama_\w+)", variable["query"]["query"])) <= exported
    assert {"Calls by model", "Errors by model", "Time to first token", "Upstream up"} <= titles


# ---- several workers, and a real Prometheus ------------------------------------------------------------------


def test_metrics_gunicorn_four_workers_count_every_call(gunicorn_proxy, tmp_path):
    proxy = gunicorn_proxy(workers=4, threads=16)
    metric_files = proxy.metrics_dir

    def calls(worker: int) -> int:
        """50 calls on one keep-alive connection (http.client: the client must not be the bottleneck)."""
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for n in range(50):
            body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": n % 2 == 0})
            connection.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            assert (answer.status, answer.read().count(b'"done":true')) == (200, 1)
        connection.close()
        return 50

    with ThreadPoolExecutor(20) as pool:
        assert sum(pool.map(calls, range(20))) == 1000
    text = requests.get(proxy.url + "/metrics", timeout=10).text
    assert sum(samples(text, "ollama_requests_total").values()) == 1000
    assert sum(samples(text, "ollama_request_duration_seconds_count").values()) == 1000
    assert samples(text, "ollama_completion_tokens_total") == {
        '{endpoint="/api/generate",key="none",model="llama3.2"}': 5000.0
    }
    assert samples(text, "ollama_active_requests") == {"": 0.0}
    counters = sorted(metric_files.glob("counter_*.db"))
    assert len(counters) >= 2  # several workers served and wrote their own files
    victim = int(counters[0].stem.split("_")[1])
    assert (metric_files / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (metric_files / f"gauge_livesum_{victim}.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded polling: child_exit runs in the arbiter once it reaps the worker
    assert not (metric_files / f"gauge_livesum_{victim}.db").exists()
    text = requests.get(proxy.url + "/metrics", timeout=10).text
    assert sum(samples(text, "ollama_requests_total").values()) == 1000  # a dead worker's counts stay


def test_metrics_real_prometheus_scrapes_the_proxy(proxy_factory, fake, tmp_path):
    need(shutil.which("prometheus") is not None, "prometheus (Debian package prometheus)")
    proxy = proxy_factory(METRICS_TOKEN="scrape-token")
    config_file, port = prometheus_config(tmp_path, proxy.handle.port, "scrape-token"), free_port()
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        expected = run_known_calls(proxy, fake)  # while Prometheus starts (its first scrape comes after ~5 s)
        api = f"http://127.0.0.1:{port}/api/v1/"
        assert poll_query(api, "sum(ollama_requests_total)", str(expected), timeout=20) == str(expected)
        assert poll_query(api, 'sum(ollama_requests_total{outcome="client_gone"})', "1") == "1"
        rules = requests.get(api + "rules", timeout=5).json()["data"]["groups"][0]["rules"]
        assert [rule["name"] for rule in rules][:2] == ["OllamaProxyDown", "OllamaUpstreamDown"] and len(rules) == 5
    finally:
        server.terminate()
        server.wait(10)


def prometheus_config(tmp_path: Path, proxy_port: int, token: str) -> Path:
    """Write deploy/prometheus/prometheus.yml with a 1 s interval, the test proxy as target and the token enabled."""
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    config = (DEPLOY / "prometheus/prometheus.yml").read_text()
    for old, new in [
        ("15s", "1s"), ("scrape_timeout: 10s", "scrape_timeout: 1s"), ("127.0.0.1:11434", f"127.0.0.1:{proxy_port}"),
        ("- alerts.yml", f"- {DEPLOY / 'prometheus/alerts.yml'}"), ("    # authorization:", "    authorization:"),
        ("    #   credentials_file: /etc/prometheus/ollama-proxy-token", f"      credentials_file: {token_file}"),
    ]:  # fmt: skip
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(config)
    return tmp_path / "prometheus.yml"


def poll_query(api: str, query: str, expected: str, timeout: float = 10.0) -> str | None:
    """Return an instant query's value once it equals ``expected``, else its last value after ``timeout`` seconds."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            answer = requests.get(api + "query", params={"query": query}, timeout=2)
        except requests.ConnectionError:
            answer = None  # not listening yet
        if answer is not None and answer.status_code != 503:  # 503: listening, its storage not ready yet
            result = answer.json()["data"]["result"]
            value = result[0]["value"][1] if result else None
        if value == expected:
            return value
        time.sleep(0.1)  # bounded polling while Prometheus starts and scrapes
    return value
