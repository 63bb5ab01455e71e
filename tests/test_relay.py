"""The relay through a real port: bytes, headers, streaming promptness, failures, and the Call each call produces."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import ollama
import openai
import pytest

from proxy_app import create_app, shutdown
from proxy_app.relay import forward, headers
from proxy_app.state import state_of
from tests.conftest import CallRecorder, free_port
from tests.fake_ollama import serve
from tests.raw_upstream import TLS, chunked, response, tls_upstream

RECORDINGS = Path(__file__).parent / "recordings"


def open_stream(
    url: str, path: str, body: dict, headers: dict | None = None, timeout: float = 30
) -> http.client.HTTPResponse:
    """POST a JSON body with http.client and return the response unread (for timing lines)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Content-Type": "application/json", "Connection": "close", **(headers or {})}
    connection.request("POST", path, json.dumps(body), headers)
    return connection.getresponse()  # with Connection: close the response owns the socket and closes it at the end


class Replay:
    """A tiny upstream that answers every request with fixed bytes in fixed chunks (for byte-for-byte checks)."""

    def __init__(self, status: str, headers: list, chunks: list[bytes]) -> None:
        self.status, self.headers, self.chunks = status, headers, chunks

    def __call__(self, environ, start_response):
        start_response(self.status, self.headers)
        return iter(self.chunks)


def relay_of(replay: Replay, tmp_path) -> tuple:
    """Serve ``replay`` and our app in front of it; return (upstream handle, proxy handle, recorder list)."""
    upstream = serve(replay)
    app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}, environ={})
    seen: list = []
    state_of(app).call_sinks.append(seen.append)
    return upstream, serve(app), seen


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("generate_stream.ndjson", "application/x-ndjson"),
        ("chat_stream.ndjson", "application/x-ndjson"),
        ("v1_chat_stream_usage.sse", "text/event-stream"),
        ("embed.json", "application/json; charset=utf-8"),
    ],
)
def test_relay_body_byte_identical(tmp_path, name, content_type):
    raw = (RECORDINGS / name).read_bytes()
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]  # boundaries that split lines and characters
    upstream, proxy, _ = relay_of(Replay("200 OK", [("Content-Type", content_type)], pieces), tmp_path)
    try:
        response = open_stream(proxy.url, "/api/chat", {"model": "llama3.2"})
        assert response.read() == raw
        assert response.getheader("Content-Type") == content_type
    finally:
        proxy.close()
        upstream.close()


def test_relay_redirect_passed_back_not_followed(tmp_path):
    replay = Replay("301 Moved Permanently", [("Location", "/api/tags"), ("Content-Length", "0")], [b""])
    upstream, proxy, seen = relay_of(replay, tmp_path)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        connection.request("GET", "/api/tags/")
        response = connection.getresponse()
        assert (response.status, response.getheader("Location"), response.read()) == (301, "/api/tags", b"")
        connection.close()
    finally:
        proxy.close()
        upstream.close()


def test_relay_headers_end_to_end_only(live_proxy, fake, upstream):
    connection = http.client.HTTPConnection("127.0.0.1", live_proxy.port, timeout=10)
    connection.putrequest("GET", "/api/tags?x=1&y=%20z", skip_host=True, skip_accept_encoding=True)
    for name, value in [
        ("Host", "localhost:11434"), ("Authorization", "Bearer secret-key"), ("X-Custom", "kept"),
        ("Connection", "keep-alive, X-Drop-Me"), ("X-Drop-Me", "1"), ("Keep-Alive", "timeout=5"),
        ("Accept-Encoding", "gzip"), ("User-Agent", "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7"),
    ]:  # fmt: skip
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["models"]
    seen = fake.seen[-1]
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert seen["path"] == "/api/tags" and seen["query"] == "x=1&y=%20z"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert headers["authorization"] == "Bearer secret-key"
    assert headers["x-custom"] == "kept"
    assert headers["user-agent"] == "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7"
    assert headers["accept-encoding"] == "identity"
    assert "x-drop-me" not in headers and "keep-alive" not in headers
    assert response.getheader("X-Request-ID")
    connection.close()


def test_relay_root_and_head(live_proxy, recorder):
    connection = http.client.HTTPConnection("127.0.0.1", live_proxy.port, timeout=10)
    connection.request("GET", "/")
    response = connection.getresponse()
    assert (response.status, response.read()) == (200, b"Ollama is running")
    connection.request("HEAD", "/")
    response = connection.getresponse()
    assert (response.status, response.read()) == (200, b"")
    calls = recorder.wait_for(2)
    assert [(call.http_method, call.endpoint, call.outcome) for call in calls] == [
        ("GET", "/", "completed"),
        ("HEAD", "/", "completed"),
    ]
    connection.close()


def lockstep_lines(response: http.client.HTTPResponse, gate: threading.Semaphore, counts=lambda line: True) -> list:
    """Read a stream whose upstream writes each line only after the line before it reached us.

    After every counted line the gate lets the upstream write its next one, so a line the proxy held back (until the
    next line came, or the end) never arrives and the read times out.
    """
    lines = []
    while line := response.readline():
        lines.append(line)
        if counts(line):
            gate.release()
    return lines


def test_relay_lines_arrive_as_sent(live_proxy, fake):
    fake.line_gate = threading.Semaphore(0)
    response = open_stream(live_proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "hi"}, timeout=5)
    assert response.getheader("X-Accel-Buffering") == "no"
    lines = lockstep_lines(response, fake.line_gate)
    assert len(lines) == len(fake.tokens) + 1
    assert json.loads(lines[-1])["done"] is True


def test_relay_sse_events_arrive_as_sent(live_proxy, fake):
    fake.line_gate = threading.Semaphore(0)
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = open_stream(live_proxy.url, "/v1/chat/completions", body, timeout=5)
    lines = lockstep_lines(response, fake.line_gate, counts=lambda line: line.startswith(b"data: {"))
    assert len([line for line in lines if line.startswith(b"data: {")]) >= len(fake.tokens)
    assert lines[-2:] == [b"data: [DONE]\n", b"\n"]


def test_relay_ollama_client_generate_and_chat(live_proxy, recorder, fake, closing):
    client = closing(ollama.Client(host=live_proxy.url))
    streamed = "".join(
        part.response for part in client.generate(model="llama3.2", prompt="why is the sky blue", stream=True)
    )
    whole = client.generate(model="llama3.2", prompt="why is the sky blue")
    assert streamed == whole.response == "".join(fake.tokens)
    chat = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello there"}], options={"seed": 1})
    assert chat.message.content == "".join(fake.tokens)
    first, second, third = recorder.wait_for(3)
    prompt_tokens = fake.expected_prompt_tokens("why is the sky blue")
    assert (first.endpoint, first.stream_mode, first.outcome) == ("/api/generate", True, "completed")
    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (
        prompt_tokens,
        len(fake.tokens),
        prompt_tokens + len(fake.tokens),
    )
    assert (second.stream_mode, second.input_tokens, second.output_tokens) == (False, prompt_tokens, len(fake.tokens))
    assert first.prompt == "why is the sky blue" and first.response_preview == "".join(fake.tokens)
    assert first.ttft_ms is not None and first.tokens_per_second > 0 and first.done_reason == "stop"
    assert (third.endpoint, third.model, third.model_parameters, third.prompt) == (
        "/api/chat",
        "llama3.2",
        '{"seed":1}',
        "hello there",
    )
    assert third.api == "native" and third.http_status == 200


def test_relay_ollama_client_other_endpoints(live_proxy, recorder, fake, closing):
    client = closing(ollama.Client(host=live_proxy.url))
    embedded = client.embed(model="all-minilm", input=["one two", "three"])
    assert len(embedded.embeddings) == 2
    assert client.embeddings(model="all-minilm", prompt="legacy").embedding
    assert [model.model for model in client.list().models]
    assert client.ps() is not None
    assert client.show("llama3.2").modelinfo is not None or True
    assert [part.status for part in client.pull("llama3.2", stream=True)][-1] == "success"
    assert client.copy("llama3.2", "llama3.2-copy").status == "success"
    assert client.delete("llama3.2-copy").status == "success"
    blob = bytes(range(256)) * (4 * 4096)  # 4 MiB
    digest = client.create_blob(_write(blob))
    assert digest.startswith("sha256:")
    calls = recorder.wait_for(9)
    by_endpoint = {call.endpoint: call for call in calls}
    assert by_endpoint["/api/embed"].input_tokens == fake.expected_prompt_tokens(
        "one two"
    ) + fake.expected_prompt_tokens("three")
    assert by_endpoint["/api/embeddings"].input_tokens is None  # unknown, not 0
    assert by_endpoint["/api/pull"].stream_mode is True and by_endpoint["/api/pull"].outcome == "completed"
    upload = next(call for call in calls if call.endpoint.startswith("/api/blobs/"))
    assert (upload.request_size_bytes, upload.http_status) == (len(blob), 201)


def _write(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as handle:
        handle.write(data)
    return handle.name


def test_relay_openai_client(live_proxy, recorder, fake, closing):
    client = closing(openai.OpenAI(base_url=live_proxy.url + "/v1", api_key="sk-test"))
    messages = [{"role": "user", "content": "say hi"}]
    reply = client.chat.completions.create(model="llama3.2", messages=messages)
    assert reply.choices[0].message.content == "".join(fake.tokens)
    chunks = list(client.chat.completions.create(model="llama3.2", messages=messages, stream=True))
    assert all(chunk.usage is None for chunk in chunks)  # the usage event the proxy asked for never reaches the client
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "".join(fake.tokens)
    with_usage = list(
        client.chat.completions.create(
            model="llama3.2", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].usage.completion_tokens == len(fake.tokens)
    completion = client.completions.create(model="llama3.2", prompt="once upon")
    assert completion.choices[0].text == "".join(fake.tokens)
    assert client.embeddings.create(model="all-minilm", input="hello").data[0].embedding
    assert [model.id for model in client.models.list()]
    calls = recorder.wait_for(6)
    expected_input = fake.expected_prompt_tokens("say hi")
    for call in calls[:3]:
        assert (call.api, call.input_tokens, call.output_tokens, call.outcome) == (
            "openai",
            expected_input,
            len(fake.tokens),
            "completed",
        )
    assert calls[1].stream_mode is True and calls[1].ttft_ms is not None
    assert calls[3].output_tokens == len(fake.tokens) and calls[3].prompt == "once upon"


def test_relay_openai_stream_matches_direct_events(live_proxy, upstream):
    body = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    direct = _normalise(open_stream(upstream.url, "/v1/chat/completions", body).read())
    proxied = _normalise(open_stream(live_proxy.url, "/v1/chat/completions", body).read())
    assert proxied == direct and b'"usage"' not in proxied


def _normalise(raw: bytes) -> bytes:
    import re

    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', rb'"\1":0', raw)


def test_relay_upstream_unreachable_native_and_openai(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    app = create_app({"UPSTREAM": dead, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}, environ={})
    seen: list = []
    state_of(app).call_sinks.append(seen.append)
    client = app.test_client()
    native = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert native.status_code == 502 and native.content_type == "application/json; charset=utf-8"
    assert dead in native.get_json()["error"]
    compat = client.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []})
    assert compat.status_code == 502
    assert compat.get_json()["error"]["type"] == "api_error" and dead in compat.get_json()["error"]["message"]
    assert [(call.outcome, call.http_status, call.model) for call in seen] == [
        ("unreachable", 502, "llama3.2"),
        ("unreachable", 502, "llama3.2"),
    ]
    assert state_of(app).in_flight.count == 0


def test_relay_upstream_dies_mid_stream(live_proxy, fake, recorder, closing):
    fake.cut_after = 2
    fake.token_delay = 0.01
    with pytest.raises(ollama.ResponseError, match="upstream connection lost"):
        list(closing(ollama.Client(host=live_proxy.url)).generate(model="llama3.2", prompt="hi", stream=True))
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status) == ("upstream_error", 200)
    assert "upstream connection lost" in call.error_message
    assert closing(ollama.Client(host=live_proxy.url)).generate(model="llama3.2", prompt="again").done  # still serving


def test_relay_mid_stream_error_line(live_proxy, fake, recorder, closing):
    fake.error_after = 2
    with pytest.raises(ollama.ResponseError, match="error was encountered"):
        list(
            closing(ollama.Client(host=live_proxy.url)).chat(
                model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    call = recorder.wait_for(1)[0]
    assert call.outcome == "upstream_error" and "error was encountered" in call.error_message


def test_relay_stream_without_done_is_incomplete(live_proxy, fake, recorder, closing):
    fake.omit_done = True
    list(closing(ollama.Client(host=live_proxy.url)).generate(model="llama3.2", prompt="x", stream=True))
    assert recorder.wait_for(1)[0].outcome == "incomplete"


def test_relay_pre_stream_error_keeps_status(live_proxy, recorder, closing):
    with pytest.raises(ollama.ResponseError) as caught:
        closing(ollama.Client(host=live_proxy.url)).generate(model="no-such-model", prompt="x")
    assert caught.value.status_code == 404
    call = recorder.wait_for(1)[0]
    assert (call.http_status, call.outcome) == (404, "upstream_error")
    assert "not found" in call.error_message


def test_relay_client_disconnect_closes_upstream(live_proxy, fake, recorder, app):
    fake.tokens = ["tok"] * 200
    fake.token_delay = 0.05
    with socket.create_connection(("127.0.0.1", live_proxy.port)) as sock:
        body = json.dumps({"model": "llama3.2", "prompt": "x"}).encode()
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        received = b""
        while received.count(b"\n") < 12:
            received += sock.recv(4096)
    call = recorder.wait_for(1, timeout=5)[0]
    assert call.outcome == "client_gone"
    deadline = time.monotonic() + 5
    while fake.cancelled < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.cancelled == 1  # Ollama saw the close and would stop generating
    assert state_of(app).in_flight.count == 0


def test_relay_64_concurrent_streams_are_all_relayed_at_once(live_proxy, fake, recorder):
    """Each stream gets its first line while no stream may have its second: none waits for a slot behind another."""
    fake.line_gate = threading.Semaphore(0)
    body = {"model": "llama3.2", "prompt": "x"}
    answers = [open_stream(live_proxy.url, "/api/generate", body, timeout=10) for _ in range(64)]
    assert [answer.status for answer in answers] == [200] * 64
    assert all(json.loads(answer.readline())["response"] == fake.tokens[0] for answer in answers)
    fake.line_gate.release(64 * len(fake.tokens))
    for answer in answers:
        assert json.loads(answer.read().splitlines()[-1])["done"] is True
    assert len(recorder.wait_for(64)) == 64


def test_relay_body_over_limit_gets_413(tmp_path, upstream):
    app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "MAX_BODY_BYTES": 100}, environ={})
    seen: list = []
    state_of(app).call_sinks.append(seen.append)
    response = app.test_client().post("/api/generate", data=b"{" + b" " * 200 + b"}")
    assert response.status_code == 413 and "exceeds" in response.get_json()["error"]
    assert seen[0].outcome == "rejected"


def test_relay_queue_limit_rejects_in_ollama_shape(tmp_path, upstream, fake):
    fake.token_delay = 0.2
    settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "MAX_CONCURRENT": 1, "QUEUE_TIMEOUT": 0.2}
    app = create_app(settings, environ={})
    seen: list = []
    state_of(app).call_sinks.append(seen.append)
    proxy = serve(app)
    try:
        slow = open_stream(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"})
        refused = open_stream(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "y"})
        assert refused.status == 503 and "server busy" in json.loads(refused.read())["error"]
        slow.read()
    finally:
        proxy.close()
    rejected = next(call for call in seen if call.outcome == "rejected")
    assert rejected.http_status == 503 and rejected.queue_time_ms >= 150


def test_relay_under_gunicorn_with_clients(gunicorn_proxy, fake, closing):
    proxy = gunicorn_proxy(workers=2, threads=8)
    client = closing(ollama.Client(host=proxy.url))
    text = "".join(
        part.message.content
        for part in client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert text == "".join(fake.tokens)
    reply = closing(openai.OpenAI(base_url=proxy.url + "/v1", api_key="x")).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.usage.completion_tokens == len(fake.tokens)
    fake.line_gate = threading.Semaphore(0)
    response = open_stream(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"}, timeout=5)
    assert len(lockstep_lines(response, fake.line_gate)) == len(fake.tokens) + 1  # streamed, not buffered


def test_relay_health_and_test_endpoints(client, fake):
    health = client.get("/health")
    assert health.status_code == 200
    document = health.get_json()
    assert document["upstream"]["reachable"] is True and document["upstream"]["version"]
    assert client.head("/health").status_code == 200
    test = client.get("/test").get_json()
    assert test["ok"] is True and "llama3.2:latest" in test["models"]


def test_relay_health_503_when_upstream_down(tmp_path):
    app = create_app({"UPSTREAM": f"http://127.0.0.1:{free_port()}", "DATA_DIR": str(tmp_path)}, environ={})
    response = app.test_client().get("/health")
    assert response.status_code == 503 and response.get_json()["upstream"]["reachable"] is False
    assert app.test_client().get("/test").status_code == 502


@pytest.mark.parametrize(
    ("environ", "path", "expected"),
    [
        ({"RAW_URI": "/api/a%2Fb?q=%20"}, "/api/a/b", "/api/a%2Fb?q=%20"),  # gunicorn: as sent
        ({"REQUEST_URI": "/api/tags"}, "/api/tags", "/api/tags"),  # waitress
        ({"RAW_URI": "http://evil.example/api/tags", "QUERY_STRING": "x=1&y=%20"}, "/api/tags", "/api/tags?x=1&y=%20"),
        ({"QUERY_STRING": "n=\xe9"}, "/api/a b", "/api/a%20b?n=%E9"),  # no raw target: quoted again, bytes kept
        ({"RAW_URI": "/api/\xe9"}, "/api/\xe9", "/api/%C3%A9"),  # not ASCII: never put in the request line as is
    ],
)
def test_relay_request_target_is_the_clients_in_origin_form(environ, path, expected):
    assert headers.request_target(environ, path) == expected


@pytest.mark.parametrize(
    ("path", "relayed"),
    [("/health", False), ("/analytics/no-such-page", False), ("/metrics", False), ("/healthz", True),
     ("/metricsx", True), ("/api/tags", True), ("/", True)],
)  # fmt: skip
def test_relay_serves_only_paths_that_are_not_ours(client, fake, path, relayed):
    client.get(path)
    assert (path in [seen["path"] for seen in fake.seen]) is relayed  # /health and /metrics probe /api/version


def test_relay_refuses_methods_ollama_has_no_use_for_in_its_error_shape(client, fake, recorder):
    for path in ("/api/tags", "/v1/models"):
        answer = client.open(path, method="PROPFIND")
        assert answer.status_code == 405
        assert answer.headers["Allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert client.open("/api/tags", method="PROPFIND").get_json() == {"error": "method 'PROPFIND' is not allowed"}
    assert client.open("/v1/models", method="TRACE").get_json()["error"]["message"] == "method 'TRACE' is not allowed"
    assert fake.seen == [] and recorder.calls == []


def test_relay_a_bug_of_ours_still_answers_in_ollamas_shape_and_the_proxy_goes_on(app, client, caplog):
    relay_app = state_of(app).relay

    def broken(app, req):
        raise RuntimeError("a bug")

    relay_app.forward = broken
    answer = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
    assert answer.status_code == 500 and answer.get_json() == {"error": "internal error in the proxy"}
    assert "relaying POST /api/generate failed" in caplog.text and "RuntimeError: a bug" in caplog.text
    relay_app.forward = forward.forward
    assert client.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}).status_code == 200


def test_relay_https_upstream_end_to_end(tmp_path, monkeypatch):
    lines = [
        b'{"model":"llama3.2","created_at":"t","response":"hi","done":false}\n',
        b'{"model":"llama3.2","created_at":"t","response":"","done":true,"prompt_eval_count":3,"eval_count":1}\n',
    ]
    answer = response(framing="chunked", content_type="application/x-ndjson") + chunked(*lines)
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "cert.pem"))  # trust the test certificate, as a CA bundle would
    with tls_upstream(answer) as url:
        app = create_app({"UPSTREAM": url, "DATA_DIR": str(tmp_path)}, environ={})
        recorder = CallRecorder()
        state_of(app).call_sinks.append(recorder)
        reply = app.test_client().post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
        assert reply.status_code == 200 and reply.data == b"".join(lines)
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.input_tokens, call.output_tokens) == ("completed", 3, 1)
    shutdown(app)
