"""Bad input (issue 7): odd request bodies reach Ollama exactly as sent, body limits, and no open-proxy behaviour.

Each odd body is sent once straight to the fake Ollama and once through the proxy: the answers must match, the fake
must see the same bytes, and the call must be recorded. The parsers are fuzzed with hypothesis on the request side
(the response side is fuzzed in test_usage.py).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_app import create_app, shutdown
from proxy_app.ollama import jsonscan
from proxy_app.ollama.intake import read_intake, with_usage_requested
from proxy_app.relay.headers import client_address
from proxy_app.state import state_of
from tests.conftest import CallRecorder
from tests.fake_ollama import serve
from tests.raw_upstream import RawUpstream

JSON = "application/json"
DEEP = 100_000  # far past Python's recursion limit and Go's json nesting limit (10,000)
BODIES = {
    "malformed-json": ("/api/generate", b'{"model": "llama3.2", "prompt": ', "application/json"),
    "empty-body": ("/api/chat", b"", "application/json"),
    "empty-body-v1": ("/v1/chat/completions", b"", "application/json"),
    "json-array": ("/api/generate", b"[1, 2, 3]", "application/json"),
    "wrong-content-type": ("/api/generate", b'{"model":"llama3.2","prompt":"hi","stream":false}', "text/plain"),
    "form-encoded": ("/api/chat", b"model=llama3.2&prompt=hi", "application/x-www-form-urlencoded"),
    "invalid-utf8": ("/api/generate", b'{"model":"llama3.2","prompt":"caf\xe9 \xff\xfe","stream":false}', JSON),
    "huge-numbers": ("/api/generate", b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"seed":1e999,'
                     b'"num_ctx":123456789012345678901234567890,"top_k":' + b"9" * 5000 + b"}}", "application/json"),
    "deep-nesting": ("/api/chat", b'{"model":"llama3.2","messages":' + b"[" * DEEP + b"]" * DEEP + b"}", JSON),
    "nul-and-controls": ("/api/generate", b'{"model":"llama3.2\\u0000","prompt":"\x00\x01"}', "application/json"),
}  # fmt: skip


def send(port: int, path: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    """POST raw bytes; return (status, content type, body with Ollama's timestamps blanked)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type})
        answer = connection.getresponse()
        data = re.sub(rb'"(created_at|created|id)":("[^"]*"|\d+)', rb'"\1":0', answer.read())
        return answer.status, answer.getheader("Content-Type", ""), data
    finally:
        connection.close()


@pytest.mark.parametrize("case", BODIES)
def test_bad_input_relayed_as_ollama_sees_it(live_proxy, upstream, fake, recorder, case):
    path, body, content_type = BODIES[case]
    direct = send(upstream.port, path, body, content_type)
    proxied = send(live_proxy.port, path, body, content_type)
    assert proxied == direct
    assert fake.seen[-1]["body"] == fake.seen[-2]["body"] == body  # not re-encoded, not "fixed"
    assert fake.seen[-1]["headers"]["Content-Type"] == content_type
    call = recorder.wait_for(1)[0]
    assert (call.http_status, call.request_size_bytes) == (direct[0], len(body))
    assert call.outcome == ("upstream_error" if direct[0] >= 400 else "completed")
    if call.model_parameters is not None:
        json.loads(call.model_parameters, parse_constant=_no_constants)  # stored parameters are strict JSON
    if case == "invalid-utf8":  # Go reads bad UTF-8 as U+FFFD, and so does the proxy: the model is still known
        assert call.model == "llama3.2" and call.prompt == "caf\ufffd \ufffd\ufffd"


def _no_constants(name):
    raise ValueError(f"{name} in stored JSON")


# ---- body limits ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_limit_proxy(upstream, tmp_path):
    """The proxy under waitress with a 1000-byte body limit; yields (handle, recorder)."""
    app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR",
                      "MAX_BODY_BYTES": 1000}, environ={})  # fmt: skip
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    handle = serve(app, threads=8)
    yield handle, recorder
    handle.close()
    shutdown(app)


def _padded(size: int) -> bytes:
    """A valid generate body of exactly ``size`` bytes."""
    head = b'{"model":"llama3.2","stream":false,"prompt":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _post(port: int, path: str, body: bytes, chunked: bool = False) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        if chunked:  # no Content-Length at all: the size is known only once the body has been read
            connection.request("POST", path, iter([body[:300], body[300:]]), {"Content-Type": "application/json"},
                               encode_chunked=True)  # fmt: skip
        else:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_bad_input_body_over_limit_gets_413_in_ollama_shape(small_limit_proxy, fake, chunked):
    handle, recorder = small_limit_proxy
    status, content_type, body = _post(handle.port, "/api/generate", _padded(1001), chunked)
    assert (status, content_type) == (413, "application/json; charset=utf-8")
    assert "exceeds" in json.loads(body)["error"]
    status, _, body = _post(handle.port, "/v1/chat/completions", _padded(1001), chunked)
    assert status == 413 and json.loads(body)["error"]["type"] == "api_error"
    assert fake.seen == []  # Ollama never saw them
    status, _, body = _post(handle.port, "/api/generate", _padded(1000), chunked)  # at the limit: relayed
    assert status == 200 and json.loads(body)["done"] is True
    assert fake.seen[-1]["body_len"] == 1000 and fake.seen[-1]["headers"]["Content-Length"] == "1000"
    calls = recorder.wait_for(3)
    assert [(call.outcome, call.http_status) for call in calls] == [("rejected", 413)] * 2 + [("completed", 200)]


def test_bad_input_blob_upload_is_exempt_from_the_limit(small_limit_proxy, fake):
    handle, recorder = small_limit_proxy
    blob = bytes(range(256)) * 40  # 10 kB, ten times the limit
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    status, _, _ = _post(handle.port, f"/api/blobs/{digest}", blob)
    assert status == 201 and fake.seen[-1]["body_len"] == len(blob)
    assert recorder.wait_for(1)[0].request_size_bytes == len(blob)


# ---- not an open proxy ----------------------------------------------------------------------------------------


@pytest.fixture
def evil():
    """A server the proxy must never connect to."""
    server = RawUpstream()
    yield server
    server.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw request bytes and return everything the proxy answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while piece := sock.recv(65536):
            received += piece
        return received


def test_bad_input_never_an_open_proxy(live_proxy, upstream, fake, evil):
    target = f"127.0.0.1:{evil.port}".encode()
    requests = {
        "absolute-form": b"GET http://%s/api/tags HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, target),
        "host-header": b"GET /api/tags HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % target,
        "forwarded-headers": b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Host: %s\r\n"
                             b"Forwarded: host=%s\r\nConnection: close\r\n\r\n" % (target, target),
        "scheme-relative-path": b"GET //%s/api/tags HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % target,
        "connect": b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, target),
    }  # fmt: skip
    answers = {name: raw_exchange(live_proxy.port, request).split(b"\r\n", 1)[0] for name, request in requests.items()}
    assert evil.accepted == 0  # not one TCP connection to the address the client named
    for name in ("absolute-form", "host-header", "forwarded-headers"):
        assert answers[name] == b"HTTP/1.1 200 OK", name  # answered by the configured upstream
    assert answers["scheme-relative-path"] == b"HTTP/1.1 404 Not Found"  # the fake's own 404 for that odd path
    assert answers["connect"].split(b" ")[1] in (b"400", b"405")  # CONNECT is refused, never tunnelled
    assert {seen["headers"]["Host"] for seen in fake.seen} == {f"127.0.0.1:{upstream.port}"}
    assert [seen["path"] for seen in fake.seen][:3] == ["/api/tags"] * 3
    assert fake.seen[3]["path"].endswith(f"127.0.0.1:{evil.port}/api/tags") and len(fake.seen) == 4  # just a path


# ---- fuzzing the request side ---------------------------------------------------------------------------------

PATHS = st.sampled_from(["/api/generate", "/api/chat", "/api/embed", "/api/pull", "/v1/chat/completions",
                         "/v1/completions", "/v1/embeddings", "/v1/models/x", "/api/tags", "/"])  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
KEYS = st.sampled_from(["model", "name", "prompt", "messages", "stream", "options", "stream_options", "input",
                        "temperature", "format", "keep_alive", "role", "content", "include_usage", "x"])  # fmt: skip
DOCUMENTS = st.dictionaries(KEYS | st.text(max_size=6), JSON_VALUES, max_size=8)
WHITESPACE = st.text(alphabet=" \t\r\n", max_size=3)


def intake_problems(intake) -> list[str]:
    """What in ``intake`` breaks a property every body's intake keeps, whatever the body held: none, when it holds."""
    problems = []
    if intake.api not in ("native", "openai"):
        problems.append(f"api {intake.api!r}")
    if not (intake.model is None or (isinstance(intake.model, str) and intake.model)):
        problems.append(f"model {intake.model!r}")
    if not (intake.prompt is None or (isinstance(intake.prompt, str) and len(intake.prompt) <= 1000)):
        problems.append(f"prompt {intake.prompt!r:.80}")
    if intake.model_parameters is not None:  # strict JSON, or json.loads raises and the test fails
        if not isinstance(json.loads(intake.model_parameters, parse_constant=_no_constants), dict):
            problems.append(f"model_parameters {intake.model_parameters!r:.80}")
    return problems


@settings(max_examples=200, deadline=None)
@given(path=PATHS, body=st.binary(max_size=300))
def test_bad_input_fuzz_intake_any_bytes(path, body):
    assert intake_problems(read_intake(path, body)) == []


@settings(max_examples=100, deadline=None)
@given(path=PATHS, document=DOCUMENTS, before=WHITESPACE, after=WHITESPACE, compact=st.booleans(),
       stream=st.sampled_from([None, True, False, "yes", 1]))  # fmt: skip
def test_bad_input_fuzz_intake_json_documents(path, document, before, after, compact, stream):
    if stream is not None:
        document["stream"] = stream
    separators = (",", ":") if compact else (", ", ": ")
    body = (before + json.dumps(document, separators=separators) + after).encode()
    intake = read_intake(path, body)
    assert intake_problems(intake) == []
    if intake.wants_usage_injected:  # the only change the proxy ever makes to a body
        assert json.loads(with_usage_requested(body)) == {**document, "stream_options": {"include_usage": True}}


@settings(max_examples=200, deadline=None)
@given(forwarded=st.text(max_size=80), peer=st.sampled_from(["127.0.0.1", "10.0.0.7", "::1", ""]),
       trusted=st.sampled_from(["", "127.0.0.1", "10.0.0.0/8,::1", "0.0.0.0/0"]))  # fmt: skip
def test_bad_input_fuzz_client_address(forwarded, peer, trusted):
    networks = tuple(ipaddress.ip_network(item, strict=False) for item in trusted.split(",") if item)
    address = client_address({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}, networks)
    assert isinstance(address, str) and len(address) <= max(64, len(peer))
    if not networks:
        assert address == peer  # X-Forwarded-For is never believed unless the peer is trusted


@settings(max_examples=150, deadline=None)
@given(path=PATHS, document=DOCUMENTS, stream=st.sampled_from([None, True, False]), keys=st.lists(KEYS, max_size=3))
def test_bad_input_fuzz_large_values_read_like_small_ones(path, document, stream, keys):
    """Every string, array and object read piece by piece (as a large one is) gives what a whole parse gives."""
    if stream is not None:
        document["stream"] = stream
    body = json.dumps(document).encode()
    for key in keys:  # a duplicate key in another case, which Go also reads
        body = body[:-1] + (b"," if len(body) > 2 else b"") + json.dumps({key.upper(): document}).encode()[1:]
    whole = read_intake(path, body)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonscan, "VALUE_BYTES", 0)
        assert read_intake(path, body) == whole
