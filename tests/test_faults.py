"""Faults (issue 7): a misbehaving upstream, clients that leave or read slowly, many idle connections.

Every case checks the same three things: the client gets a prompt, well-formed answer (or a stream that ends
cleanly), the call is recorded with the right outcome, and the proxy goes on serving the next call.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import threading
import time

import openai
import psutil
import pytest
import requests

from proxy_app import create_app, shutdown
from proxy_app.ollama import usage as usage_module
from proxy_app.service.servers import WaitressService
from proxy_app.state import state_of
from tests.conftest import CallRecorder, free_port
from tests.fake_ollama import FakeOllama, serve
from tests.processes import wait_until
from tests.raw_upstream import RawUpstream, chunked, reply, response

GENERATE = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False}).encode()
STREAM = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode()
GOOD_REPLY = response(b'{"model":"llama3.2","response":"ok","done":true,"eval_count":1}')


def raw_post(path: str, body: bytes) -> bytes:
    """The bytes of a POST, for clients that write to a socket themselves."""
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


@pytest.fixture
def raw():
    """A scripted raw-socket upstream (by default it accepts and never answers)."""
    upstream = RawUpstream()
    yield upstream
    upstream.close()


def post(port: int, path: str = "/api/generate", body: bytes = GENERATE, timeout: float = 10.0):
    """POST with http.client; return (status, body bytes, seconds taken); body None if it could not be read whole."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        try:
            data = answer.read()
        except http.client.IncompleteRead:
            data = None
        return answer.status, data, time.monotonic() - started
    finally:
        connection.close()


def assert_still_serving(handle, raw_upstream: RawUpstream | None = None) -> None:
    """The next call through the same proxy works (switching a raw upstream to a good answer first)."""
    if raw_upstream is not None:
        raw_upstream.script = reply(GOOD_REPLY)
    status, body, _ = post(handle.port)
    assert status == 200 and json.loads(body)["done"] is True


# ---- the upstream misbehaves ------------------------------------------------------------------------------------


def test_faults_upstream_refuses_then_comes_back(proxy_for):
    port = free_port()
    handle, app, recorder = proxy_for(f"http://127.0.0.1:{port}")
    status, body, seconds = post(handle.port)
    assert (status, seconds < 3) == (502, True)
    assert f"127.0.0.1:{port}" in json.loads(body)["error"]
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status, call.model) == ("unreachable", 502, "llama3.2")
    upstream = serve(FakeOllama(), port=port)  # Ollama starts: the proxy needs no restart
    try:
        assert_still_serving(handle)
    finally:
        upstream.close()
    assert recorder.wait_for(2)[1].outcome == "completed"


@pytest.mark.parametrize(("path", "shape"), [("/api/generate", "native"), ("/v1/chat/completions", "openai")])
def test_faults_upstream_silent_gets_504_after_read_timeout(proxy_for, raw, path, shape):
    handle, app, recorder = proxy_for(raw.url, READ_TIMEOUT=0.5)
    status, body, seconds = post(handle.port, path)
    assert status == 504 and 0.4 < seconds < 3
    error = json.loads(body)["error"]
    message = error if shape == "native" else error["message"]
    assert "sent nothing for 0.5 s" in message
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status) == ("upstream_error", 504)
    # The proxy closes it before it records the call; the upstream's thread notes the close a moment later.
    wait_until(lambda: raw.closed_at, timeout=2, message="the silent upstream connection closed (Ollama stops on it)")
    assert_still_serving(handle, raw)


@pytest.mark.parametrize(
    ("script", "message"),
    [(reply(b""), "Remote end closed connection"), (reply(b"garbage\r\n\r\n"), "BadStatusLine")],
    ids=["closes-without-answer", "not-http"],
)
def test_faults_upstream_gives_no_http_answer_gets_502(proxy_for, raw, script, message):
    raw.script = script
    handle, app, recorder = proxy_for(raw.url)
    status, body, seconds = post(handle.port)
    assert status == 502 and seconds < 3 and message in json.loads(body)["error"]
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status) == ("upstream_error", 502)  # it was reached, so not "unreachable"
    assert_still_serving(handle, raw)


@pytest.mark.parametrize("target", ["/v1/models/hf.co%2Fuser%2Frepo:Q4_K_M?x=%20y&z=%C3%A9", "/api/a%20b%25c"])
def test_faults_request_target_reaches_the_upstream_as_the_client_sent_it(proxy_for, raw, target):
    raw.script = reply(GOOD_REPLY)
    handle, app, recorder = proxy_for(raw.url)
    connection = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    connection.request("GET", target)
    assert connection.getresponse().status == 200
    connection.close()
    assert raw.wait_for_requests(1)[0].split(b"\r\n", 1)[0] == b"GET %s HTTP/1.1" % target.encode()


@pytest.mark.parametrize(
    ("status", "expected"),
    [("404 Not Found", "404 Not Found"), ("200 Fine By Me", "200 Fine By Me"), ("418 caf\xe9", "418 I'm a teapot"),
     ("299 ", "299 UNKNOWN"), ("503 a\x01b", "503 Service Unavailable")],
)  # fmt: skip
def test_faults_status_line_reaches_the_client_as_the_upstream_wrote_it_if_printable(proxy_for, raw, status, expected):
    raw.script = reply(response(b"{}", status=status).replace(b"\xc3\xa9", b"\xe9"))  # latin-1, as a server may send
    handle, app, recorder = proxy_for(raw.url)
    with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as conn:
        conn.sendall(raw_post("/api/generate", GENERATE))
        head = conn.recv(65536).split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 " + expected.encode()
    assert recorder.wait_for(1)[0].http_status == int(status[:3])


def test_faults_upstream_restarts_between_calls(proxy_for, tmp_path):
    first = serve(FakeOllama())
    port = first.port
    handle, app, recorder = proxy_for(first.url)
    assert_still_serving(handle)  # leaves a kept-alive connection in the proxy's pool
    first.close()  # Ollama restarts: that pooled connection is dead
    second = serve(FakeOllama(), port=port)
    try:
        assert_still_serving(handle)  # a dead pooled connection is never used for a call
    finally:
        second.close()
    assert [call.outcome for call in recorder.wait_for(2)] == ["completed", "completed"]


def test_faults_upstream_slow_within_read_timeout_then_silent_mid_stream(proxy_for, upstream, fake):
    handle, app, recorder = proxy_for(upstream.url, READ_TIMEOUT=0.6)
    fake.tokens, fake.load_delay, fake.token_delay = ["a", " b"], 0.2, 0.2  # slow, but never 0.6 s silent
    status, body, _ = post(handle.port, body=STREAM)
    assert status == 200 and json.loads(body.splitlines()[-1])["done"] is True
    assert recorder.wait_for(1)[0].outcome == "completed"
    fake.load_delay, fake.token_delay = 0.0, 1.2  # silent for longer than READ_TIMEOUT after the first token
    status, body, _ = post(handle.port, body=STREAM)
    lines = body.splitlines()
    assert status == 200 and len(lines) == 2  # the first token, then the stream's own error line
    assert json.loads(lines[0])["response"] == "a" and "timed out" in json.loads(lines[-1])["error"]
    call = recorder.wait_for(2)[1]
    assert call.outcome == "upstream_error" and "timed out" in call.error_message
    fake.token_delay = 0.0
    assert_still_serving(handle)


def test_faults_upstream_dies_mid_sse_stream(proxy_for, upstream, fake, closing):
    handle, app, recorder = proxy_for(upstream.url)
    fake.cut_after = 2
    client = closing(openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0))
    with pytest.raises(openai.APIError, match="upstream connection lost"):
        list(client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True))
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.http_status) == ("upstream_error", 200)
    fake.cut_after = None
    assert_still_serving(handle)


@pytest.mark.parametrize("then_close", [True, False], ids=["closes", "stays-open"])
def test_faults_upstream_content_length_too_long(proxy_for, raw, then_close):
    raw.script = reply(response(b'{"model":"llama3.2","resp', length=1000), then_close=then_close)
    handle, app, recorder = proxy_for(raw.url, READ_TIMEOUT=0.5)
    status, body, seconds = post(handle.port)
    assert (status, body, seconds < 3) == (200, None, True)  # the client sees a cut body, never a "complete" one
    call = recorder.wait_for(1)[0]
    assert call.outcome == "upstream_error" and "upstream connection lost" in call.error_message
    assert_still_serving(handle, raw)


def test_faults_upstream_content_length_too_short_never_leaks_into_next_call(proxy_for, raw):
    evil = response(b'{"evil":true}')
    raw.script = reply(response(b'{"done":true}', length=5) + evil)  # surplus bytes, then the upstream closes
    handle, app, recorder = proxy_for(raw.url)
    status, body, _ = post(handle.port)
    assert (status, body) == (200, b'{"don')  # exactly what was declared
    assert recorder.wait_for(1)[0].http_status == 200
    for _ in range(3):  # the surplus never reaches a later call
        assert_still_serving(handle, raw)


NDJSON = "application/x-ndjson"
FINAL = b'{"model":"llama3.2","response":"","done":true,"done_reason":"stop","prompt_eval_count":7,"eval_count":2}\n'
TOKEN = b'{"model":"llama3.2","response":"x","done":false}\n'


@pytest.mark.parametrize(
    ("pieces", "outcome", "output_tokens"),
    [
        ([TOKEN, b"{not json\n", b"\xff\xfe\x00garbage\n", TOKEN, FINAL], "completed", 2),
        ([TOKEN, b'{"model":"llama3.2","response":"' + b"y" * (10 << 20) + b'"}\n', FINAL], "completed", 2),
        ([TOKEN, FINAL[:-1]], "completed", 2),  # the last line without its newline
        ([TOKEN, TOKEN], "incomplete", None),  # the stream ended without its final line
        ([TOKEN, FINAL[:40]], "incomplete", None),  # ... or in the middle of it
    ],
    ids=["invalid-json-and-non-utf8", "10MB-line", "no-final-newline", "no-final-line", "half-final-line"],
)
def test_faults_upstream_odd_stream_relayed_byte_identical(proxy_for, raw, pieces, outcome, output_tokens):
    raw.script = reply(response(chunked(*pieces), NDJSON, framing="chunked"))
    handle, app, recorder = proxy_for(raw.url)
    status, body, _ = post(handle.port)
    assert status == 200 and body == b"".join(pieces)
    call = recorder.wait_for(1)[0]
    assert (call.outcome, call.output_tokens, call.response_size_bytes) == (outcome, output_tokens, len(body))
    assert_still_serving(handle, raw)


def test_faults_usage_parser_failure_never_costs_the_client_its_stream(proxy_for, upstream, monkeypatch):
    handle, app, recorder = proxy_for(upstream.url)
    direct = post(upstream.port, body=STREAM)[1]

    def broken(self, *args):
        raise RuntimeError("a parser bug")

    for method in ("feed", "result"):
        with monkeypatch.context() as patch:
            patch.setattr(usage_module.UsageMeter, method, broken)
            status, body, _ = post(handle.port, body=STREAM)
        assert status == 200 and len(body.splitlines()) == len(direct.splitlines())  # the whole stream
    calls = recorder.wait_for(2)
    assert [(call.http_status, call.output_tokens) for call in calls] == [(200, None)] * 2  # recorded, no counts
    assert state_of(app).in_flight.count == 0


# ---- the client misbehaves ------------------------------------------------------------------------------------


def test_faults_client_leaves_before_sending_the_body(proxy_for, upstream, fake, app):
    handle, proxy_app_, recorder = proxy_for(upstream.url)
    with socket.create_connection(("127.0.0.1", handle.port)) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n" + GENERATE[:10])
    assert_still_serving(handle)
    assert [seen["path"] for seen in fake.seen] == ["/api/generate"]  # only the second call reached Ollama
    # waitress reads the whole body before it calls the app, so the first call never started: nothing to record.
    assert [call.outcome for call in recorder.wait_for(1)] == ["completed"]
    # Servers that hand the app a short body (gunicorn) get a recorded 499 and no upstream request:
    for terminated in (False, True):  # werkzeug's LimitedStream raises; gunicorn's reader just returns less
        short = {"wsgi.input": io.BytesIO(GENERATE[:10]), "CONTENT_LENGTH": "1000"}
        short.update({"wsgi.input_terminated": True} if terminated else {})
        answer = app.test_client().post("/api/generate", environ_overrides=short)
        assert answer.status_code == 499 and len(fake.seen) == 1


def test_faults_client_leaves_while_upstream_loads(proxy_for, upstream, fake, raw):
    """No thread waits out a model load for a client that has gone: measured, it is noticed within ~0.1 s."""
    fake.load_delay = 1.5
    handle, app, recorder = proxy_for(upstream.url)
    with socket.create_connection(("127.0.0.1", handle.port)) as sock:
        sock.sendall(raw_post("/api/generate", STREAM))
        time.sleep(0.3)  # the relay is now waiting for Ollama's first byte
    left = time.monotonic()
    call = recorder.wait_for(1, timeout=1.0)[0]  # before the load ends
    noticed = time.monotonic() - left
    assert (call.outcome, call.http_status) == ("client_gone", 499) and noticed < 1.0
    assert state_of(app).in_flight.count == 0
    # The upstream connection is closed too, which is what makes Ollama stop (seen here on a raw upstream).
    handle2, app2, recorder2 = proxy_for(raw.url)
    with socket.create_connection(("127.0.0.1", handle2.port)) as sock:
        sock.sendall(raw_post("/api/chat", STREAM))
        raw.wait_for_requests(1)
    left = time.monotonic()
    recorder2.wait_for(1, timeout=1.5)
    deadline = time.monotonic() + 2
    while not raw.closed_at and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.closed_at and raw.closed_at[0] - left < 1.0


def test_faults_waitress_service_notices_a_client_leaving_while_upstream_loads(raw, tmp_path):
    """The shipped waitress service (no request lookahead, so waitress itself cannot tell) notices too."""
    settings = {"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR", "PORT": 0}
    app = create_app(settings, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    service = WaitressService(app)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", service.server.effective_port)) as sock:
            sock.sendall(raw_post("/api/generate", STREAM))
            raw.wait_for_requests(1)  # the upstream has the request and stays silent, like Ollama loading a model
        left = time.monotonic()
        call = recorder.wait_for(1, timeout=2)[0]
        assert (call.outcome, call.http_status) == ("client_gone", 499) and time.monotonic() - left < 1.0
        wait_until(lambda: raw.closed_at, timeout=2, message="the upstream connection closed")
    finally:
        assert service.stop(wait=10)


def test_faults_client_leaves_mid_stream_noticed_at_next_token(proxy_for, upstream, fake):
    fake.tokens, fake.token_delay = ["t"] * 100, 0.05
    handle, app, recorder = proxy_for(upstream.url)
    with socket.create_connection(("127.0.0.1", handle.port)) as sock:
        sock.sendall(raw_post("/api/generate", STREAM))
        received = b""
        while received.count(b"\n") < 8:
            received += sock.recv(4096)
    left = time.monotonic()
    call = recorder.wait_for(1, timeout=3)[0]
    assert call.outcome == "client_gone" and time.monotonic() - left < 1.0  # a token or two later
    assert state_of(app).in_flight.count == 0


def test_faults_slow_reader_gets_everything_and_blocks_no_one(proxy_for, upstream, fake):
    fake.tokens = ["tok"] * 1500  # about 150 kB of NDJSON
    handle, app, recorder = proxy_for(upstream.url)
    connection = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    connection.connect()
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # (4 kB trips TCP's delayed ACKs)
    connection.request("POST", "/api/generate", STREAM)
    answer = connection.getresponse()
    received, others = b"", []
    while piece := answer.read(2048):
        received += piece
        time.sleep(0.001)
        if len(others) < 5 and len(received) > 10_000 * (len(others) + 1):
            others.append(post(handle.port, "/api/show", b'{"model":"llama3.2"}')[2])  # while the slow one reads
    connection.close()
    assert len(others) == 5 and max(others) < 1.0
    lines = received.splitlines()
    assert len(lines) == 1501 and json.loads(lines[-1])["eval_count"] == 1500
    slow = next(call for call in recorder.wait_for(6) if call.endpoint == "/api/generate")
    assert (slow.outcome, slow.output_tokens, slow.response_size_bytes) == ("completed", 1500, len(received))


def test_faults_500_idle_keepalive_connections(upstream, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}, environ={})
    handle = serve(app, threads=16, connection_limit=600)  # a server for this many must allow them (see README)
    idle: list[socket.socket] = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", handle.port), timeout=10))
            idle[-1].sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for sock in idle:  # each answered with a length, so each connection stays open, idle
            assert b'"version"' in _read_response(sock)
        started = time.monotonic()
        assert post(handle.port)[0] == 200 and time.monotonic() - started < 2.0
        idle[0].sendall(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")  # an idle one is still usable
        assert b'"version"' in _read_response(idle[0])
        wait_until(lambda: state_of(app).in_flight.count == 0, timeout=5, message="no call in flight")
    finally:
        for sock in idle:
            sock.close()
        handle.close()
        shutdown(app)


def _read_response(sock: socket.socket) -> bytes:
    """Read one response with a Content-Length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(4096)
    return body


# ---- the process: a full disk, a killed worker, departed clients under gunicorn -----------------------------------


def test_faults_disk_full_calls_succeed_and_drops_are_counted(proxy_for, upstream, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is simulated with a 1 MB tmpfs, which needs mount rights: {mounted.stderr!r}")
    try:
        handle, app, recorder = proxy_for(upstream.url, DATA_DIR=str(small), WRITER_RETRY_SECONDS="1")
        writer = state_of(app).writer
        assert post(handle.port)[0] == 200 and recorder.wait_for(1) and writer.flush(10) and writer.written == 1
        with open(small / "filler", "wb") as filler:  # take every byte that is left
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        prompt = json.dumps({"model": "llama3.2", "prompt": "word " * 200, "stream": False}).encode()
        took = [post(handle.port, body=prompt)[:3:2] for _ in range(40)]
        assert all(status == 200 and seconds < 1.0 for status, seconds in took)  # calls never wait for the disk
        recorder.wait_for(41)
        assert writer.flush(10)
        assert writer.dropped > 0 and writer.written + writer.dropped == 41  # what did not fit is counted, not raised
        metrics = app.test_client().get("/metrics").get_data(as_text=True)
        dropped = re.search(r"^ollama_analytics_rows_dropped_total (\S+)$", metrics, re.MULTILINE)
        assert dropped and float(dropped.group(1)) == writer.dropped
        (small / "filler").unlink()  # space again: rows are stored again
        stored_before = writer.written
        assert post(handle.port)[0] == 200 and recorder.wait_for(42) and writer.flush(10)
        assert writer.written == stored_before + 1
    finally:
        while proxy_for.started:  # the files on the tmpfs must be closed before it goes
            handle_, app_ = proxy_for.started.pop()
            handle_.close()
            shutdown(app_)
        subprocess.run(["umount", "-l", str(small)], check=False)


def _stored(data_dir) -> list[tuple]:
    """(request_id, session_id, outcome, http_status, total_time_ms) of every stored row."""
    with contextlib.closing(sqlite3.connect(data_dir / "ollama-proxy.db")) as connection:
        columns = "request_id, session_id, outcome, http_status, total_time_ms"
        return connection.execute(f"SELECT {columns} FROM calls").fetchall()


def test_faults_gunicorn_notices_departed_clients(gunicorn_proxy, fake, tmp_path):
    proxy = gunicorn_proxy(workers=1, threads=4)
    waiting = b"X-Fake-Load-Delay: 1.5\r\nX-Session-ID: left-while-loading\r\n"  # the fake "loads" for 1.5 s
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            raw_post("/api/generate", STREAM).replace(b"Host: localhost\r\n", b"Host: localhost\r\n" + waiting)
        )
        fake.wait_for(lambda: _sessions(fake) == ["left-while-loading"])  # the relay now waits for a first byte
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:  # leaves after 10 of 1000 body bytes
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nX-Session-ID: left-mid-body\r\n"
                     b"Content-Length: 1000\r\n\r\n" + STREAM[:10])  # fmt: skip
    assert post(proxy.port)[0] == 200  # and the proxy goes on serving
    assert proxy.stop() == 0
    rows = {row[1]: row[2:] for row in _stored(tmp_path / "data")}
    outcome, status, total_ms = rows["left-while-loading"]
    assert (outcome, status) == ("client_gone", 499) and total_ms < 1000  # noticed before the 1.5 s load ended
    # The worker reads a body whole before the app sees the call (as waitress does): a client gone mid-body never
    # started a call, so there is nothing to record, and the short body never went upstream.
    assert "left-mid-body" not in rows
    assert _sessions(fake) == ["left-while-loading"]


def _sessions(fake) -> list:
    return [seen["headers"]["X-Session-Id"] for seen in fake.seen if "X-Session-Id" in seen["headers"]]


def test_faults_gunicorn_worker_killed_is_replaced_rows_lost_measured(gunicorn_proxy, tmp_path):
    proxy = gunicorn_proxy(workers=2, threads=8)
    arbiter = psutil.Process(proxy.process.pid)
    answered, errors, lock, stop = {}, [], threading.Lock(), threading.Event()  # answered: request id -> when

    def client(streaming: bool) -> None:
        body = {"model": "llama3.2", "prompt": "x", "stream": streaming}
        headers = {"X-Fake-Token-Delay": "0.02"} if streaming else {}
        with requests.Session() as session:
            session.trust_env = False
            while not stop.is_set():
                try:
                    answer = session.post(proxy.url + "/api/generate", json=body, headers=headers, timeout=10)
                    if answer.status_code != 200 or '"done":true' not in answer.text:
                        raise ValueError(answer.status_code)
                except (requests.RequestException, ValueError) as exc:
                    errors.append(exc)  # in flight in the killed worker: the client saw the connection cut
                    continue
                with lock:
                    answered[answer.headers["X-Request-ID"]] = time.monotonic()

    threads = [threading.Thread(target=client, args=(n % 3 == 0,)) for n in range(9)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 30, timeout=20, message="30 answered calls")
        workers = {child.pid for child in arbiter.children()}
        killed, killed_at = time.monotonic(), len(answered)
        os.kill(min(workers), signal.SIGKILL)
        replaced = wait_until(lambda: {c.pid for c in arbiter.children()} - workers, timeout=20, message="a new worker")
        wait_until(lambda: len(answered) >= killed_at + 30, timeout=20, message="calls after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert len(replaced) == 1 and len(arbiter.children()) == 2
    assert proxy.stop() == 0  # SIGTERM: the surviving and the new worker store everything they answered
    lost_ages = sorted(killed - answered[request_id] for request_id in answered.keys() - {row[0] for row in
                       _stored(tmp_path / "data")})  # fmt: skip
    print(f"SIGKILL: {len(lost_ages)} of {len(answered)} answered calls lost, answered {lost_ages} s before the kill; "
          f"{len(errors)} calls in flight were cut")  # fmt: skip
    # Only rows the killed worker had not yet committed are lost: calls it answered just before the kill. Nothing
    # answered well before it, and nothing the other workers answered afterwards (the README gives the figures).
    assert all(-0.5 < age < 2.0 for age in lost_ages)
