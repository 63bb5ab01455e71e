"""What crosses the wire when the other side breaks HTTP/1.1: an upstream whose answer is framed wrongly, carries a
control character or an interim answer; a client whose chunked body has a bad size line; a relayed answer closed
unread. Each case checks the client's answer, the recorded call, and that the next call is served.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import sqlite3
import threading

import pytest
from werkzeug.test import EnvironBuilder

from proxy_app import create_app, shutdown
from proxy_app.service.servers import WaitressService
from proxy_app.state import state_of
from tests.conftest import CallRecorder
from tests.processes import wait_until
from tests.raw_upstream import RawUpstream, chunked, read_request, reply, response

GENERATE = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()
GOOD_REPLY = response(b'{"model":"llama3.2","response":"ok","done":true,"eval_count":1}')
NDJSON = "application/x-ndjson"
TOKEN = b'{"model":"llama3.2","response":"x","done":false}\n'


@pytest.fixture
def raw():
    upstream = RawUpstream()
    yield upstream
    upstream.close()


def post(port: int, path: str = "/api/generate", body: bytes = GENERATE):
    """POST with http.client; return (status, headers, body); body None when the connection was cut short."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        try:
            data = answer.read()
        except http.client.IncompleteRead:
            data = None
        return answer.status, answer.headers, data
    finally:
        connection.close()


def error_message(path: str, body: bytes) -> str:
    """The message of an error answered in the API's shape: Ollama's native one, or OpenAI's under /v1."""
    error = json.loads(body)["error"]
    return error if not path.startswith("/v1/") else error["message"]


def assert_still_serving(port: int, raw_upstream: RawUpstream) -> None:
    raw_upstream.script = reply(GOOD_REPLY)
    status, _, body = post(port)
    assert status == 200 and json.loads(body)["done"] is True


# ---- the upstream's head is no answer to relay: 502 in the API's shape -------------------------------------------

BAD_HEADS = {
    "two-content-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Content-Length"),
    "invalid-content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}", "invalid Content-Length"),
    "unsupported-coding": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding",
    ),
    "control-character": (b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\n{}", "control character"),
    "switching-protocols": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
}


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
@pytest.mark.parametrize("case", BAD_HEADS)
def test_wire_bad_upstream_head_gets_502_in_the_api_shape(proxy_for, raw, case, path):
    head, message = BAD_HEADS[case]
    raw.script = reply(head, then_close=False)
    handle, app, recorder = proxy_for(raw.url)
    status, headers, body = post(handle.port, path, GENERATE if path == "/api/generate" else CHAT)
    assert status == 502 and headers["Content-Type"].startswith("application/json")
    assert message in error_message(path, body)
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status) == ("upstream_error", 502) and message in call.error_message
    wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")
    assert_still_serving(handle.port, raw)


def test_wire_content_length_beside_transfer_encoding_is_dropped_so_the_body_arrives_whole(proxy_for, raw):
    body = TOKEN * 3
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    )
    raw.script = reply(head + b"\r\n" + chunked(*body.splitlines(keepends=True)))
    handle, app, recorder = proxy_for(raw.url)
    status, headers, data = post(handle.port)
    assert (status, data) == (200, body) and headers["Content-Length"] is None  # the stale 5 never reached the client
    assert recorder.wait_for(1)[0].response_size_bytes == len(body)


@pytest.mark.parametrize(
    "framing", [b"5\nhello\r\n0\r\n\r\n", b"5\r\r\nhello\r\n0\r\n\r\n", b"5 5\r\nhello\r\n0\r\n\r\n"],
    ids=["bare-lf", "cr-cr-lf", "space-in-size"],
)  # fmt: skip
def test_wire_bad_chunk_framing_from_the_upstream_ends_the_stream_with_an_error(proxy_for, raw, framing):
    raw.script = reply(
        response(content_type=NDJSON, framing="chunked") + b"%x\r\n%s\r\n" % (len(TOKEN), TOKEN) + framing
    )
    handle, app, recorder = proxy_for(raw.url)
    status, _, body = post(handle.port)
    lines = body.splitlines()
    assert status == 200 and lines[0] == TOKEN.strip() and "invalid chunk size" in json.loads(lines[-1])["error"]
    assert b"hello" not in body  # nothing the framing does not vouch for reaches the client
    call = recorder.wait_for(1)[0]
    assert call.outcome == "upstream_error" and "invalid chunk size" in call.error_message
    assert_still_serving(handle.port, raw)


def test_wire_interim_answer_never_reaches_another_call(proxy_for, raw):
    served = itertools.count(1)

    def early_hints_then_numbered(upstream, conn: socket.socket) -> None:
        request = True
        while request:
            hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            conn.sendall(hints + response(b'{"n":%d}' % next(served)))
            request = read_request(conn)

    raw.script = early_hints_then_numbered
    handle, app, recorder = proxy_for(raw.url)
    assert [post(handle.port)[::2] for _ in range(3)] == [(200, b'{"n":1}'), (200, b'{"n":2}'), (200, b'{"n":3}')]
    assert raw.accepted == 1


# ---- a control character in an upstream header, in process and under gunicorn -------------------------------------


def test_wire_control_character_in_upstream_header_in_process(raw, tmp_path):
    raw.script = reply(BAD_HEADS["control-character"][0], then_close=False)
    app = create_app({"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "CRITICAL"}, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    try:
        answer = app.test_client().post("/api/generate", data=GENERATE)
        assert answer.status_code == 502 and "control character" in answer.get_json()["error"]
        assert "X-Bad" not in answer.headers
        assert (recorder.wait_for(1)[0].outcome, state_of(app).in_flight.count) == ("upstream_error", 0)
        wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")
    finally:
        shutdown(app)


def test_wire_control_character_in_upstream_header_under_gunicorn(gunicorn_proxy, raw, tmp_path):
    raw.script = reply(BAD_HEADS["control-character"][0], then_close=False)
    proxy = gunicorn_proxy(OLLAMA_PROXY_UPSTREAM=raw.url)
    status, headers, body = post(proxy.port)
    assert status == 502 and "control character" in json.loads(body)["error"]
    wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")
    assert_still_serving(proxy.port, raw)
    assert proxy.stop() == 0
    assert stored(tmp_path / "data") == [("upstream_error", 502), ("completed", 200)]
    assert b"Traceback" not in proxy.stderr()


def stored(data_dir) -> list[tuple]:
    """(outcome, http_status) of every stored row, in order."""
    with contextlib.closing(sqlite3.connect(data_dir / "ollama-proxy.db")) as connection:
        return connection.execute("SELECT outcome, http_status FROM calls ORDER BY timestamp").fetchall()


# ---- a relayed answer closed unread ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"1", b"5\r\nhel"], ids=["head-only", "half-a-size-line", "half-a-chunk"])
def test_wire_closing_an_unread_relayed_answer_never_waits_for_the_upstream(raw, tmp_path, sent):
    raw.script = reply(response(content_type=NDJSON, framing="chunked") + sent, then_close=False)  # then it stalls
    settings = {"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "CRITICAL", "READ_TIMEOUT": 30}
    app = create_app(settings, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    try:
        environ = EnvironBuilder(path="/api/generate", method="POST", data=GENERATE).get_environ()
        answer = app(environ, lambda status, headers, exc_info=None: None)
        closed = threading.Event()
        threading.Thread(target=lambda: (answer.close(), closed.set()), daemon=True).start()
        assert closed.wait(10)  # a server closing a body it never sent does not wait out the 30 s read timeout
        call = recorder.wait_for(1, timeout=1)[0]
        assert (call.outcome, state_of(app).in_flight.count) == ("client_gone", 0)
        wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")
    finally:
        shutdown(app)


# ---- a client's chunked body with a bad size line: 400, not a 500 with a traceback ---------------------------------

BAD_SIZES = {"not-hex": b"zz", "space-in-size": b"5 5", "plus": b"+5"}


def send_chunked(port: int, path: str, size_line: bytes) -> tuple[int, str, bytes]:
    """Send a chunked POST whose first size line is ``size_line``; return (status, content type, body)."""
    head = b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head % path.encode() + size_line + b"\r\nhello\r\n0\r\n\r\n")
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, answer.getheader("Content-Type", ""), answer.read()


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions", "/api/blobs/sha256:" + "a" * 64])
def test_wire_bad_chunk_size_from_the_client_under_gunicorn_gets_400_in_the_api_shape(gunicorn_proxy, fake, tmp_path,
                                                                                          path):  # fmt: skip
    proxy = gunicorn_proxy()
    for size_line in BAD_SIZES.values():
        status, content_type, body = send_chunked(proxy.port, path, size_line)
        assert status == 400 and content_type.startswith("application/json")
        assert "invalid chunk size" in error_message(path, body).lower()
    assert post(proxy.port)[0] == 200  # and the proxy goes on serving
    relayed = [seen["path"] for seen in fake.seen if seen["path"] != "/api/version"]  # (/health asks for the version)
    assert relayed == ["/api/generate"]  # no bad body reached Ollama
    assert proxy.stop() == 0
    # The front (waitress's event loop, in every gunicorn worker) refuses the body before the app runs; each is a row.
    assert sorted(stored(tmp_path / "data")) == sorted([("completed", 200)] + [("rejected", 400)] * len(BAD_SIZES))
    assert b"Traceback" not in proxy.stderr()


def test_wire_bad_chunk_size_from_the_client_under_waitress_gets_400(upstream, fake, tmp_path):
    """waitress decodes the body before the app runs and answers a bad size line itself: a 400 in the API's shape,
    and the call is recorded as refused."""
    settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "CRITICAL", "PORT": 0}
    app = create_app(settings, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    service = WaitressService(app)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    port = service.server.effective_port
    try:
        for size_line in BAD_SIZES.values():
            status, content_type, body = send_chunked(port, "/api/generate", size_line)
            assert status == 400 and content_type.startswith("application/json") and b"Invalid chunk size" in body
        assert post(port)[0] == 200 and fake.seen[-1]["path"] == "/api/generate" and len(fake.seen) == 1
        calls = recorder.wait_for(len(BAD_SIZES) + 1)
        assert [(call.outcome, call.http_status) for call in calls] == [("rejected", 400)] * len(BAD_SIZES) + [
            ("completed", 200)
        ]
        assert {call.endpoint for call in calls} == {"/api/generate"}
        assert "invalid chunk size" in calls[0].error_message.lower()
    finally:
        assert service.stop(wait=10)
