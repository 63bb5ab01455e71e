"""A client that leaves mid-stream while Ollama is silent (building a tool call, a long thought) is noticed at once:
the upstream connection is closed, which makes Ollama stop, within one poll, under gunicorn and under waitress.

The upstream is a raw socket that sends one NDJSON line and then nothing, and notes the moment the proxy closes the
connection: the time is measured on the upstream's side.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import sqlite3
import threading
import time

import pytest
from urllib3.util.wait import wait_for_read

from proxy_app import create_app, shutdown
from proxy_app.relay import framing
from proxy_app.relay.client_watch import POLL_SECONDS
from proxy_app.service.servers import WaitressService
from proxy_app.state import state_of
from tests.conftest import CallRecorder, GunicornProxy
from tests.fake_ollama import serve
from tests.processes import wait_until
from tests.raw_upstream import RawUpstream, reply, response

FIRST_LINE = b'{"model":"llama3.2","created_at":"2026-01-01T00:00:00Z","response":"Let","done":false}\n'
ONE_LINE_THEN_SILENCE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n" % (len(FIRST_LINE), FIRST_LINE))  # fmt: skip
VERSION = response(b'{"version":"0.12.6"}')
STREAM = b'{"model":"llama3.2","prompt":"hi"}'
MARGIN_SECONDS = 0.15  # scheduling on a busy two-core machine


@pytest.fixture
def raw():
    """An upstream answering /api/version (for start-up probes) until a test gives it the silent stream."""
    upstream = RawUpstream(reply(VERSION))
    yield upstream
    upstream.close()


def leave_after_first_line(port: int) -> float:
    """Start a streaming generate, read its first line, close the connection; return when it was closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(STREAM), STREAM))  # fmt: skip
        received = b""
        while b'"done":false}' not in received:
            piece = sock.recv(4096)
            assert piece, received
            received += piece
    return time.monotonic()


def assert_upstream_closed_soon(raw: RawUpstream, left: float) -> None:
    wait_until(lambda: raw.closed_at, timeout=3, message="the upstream connection closed")
    assert raw.closed_at[0] - left < POLL_SECONDS * 2 + MARGIN_SECONDS


def test_departures_waitress_closes_the_upstream_when_the_client_leaves_mid_stream(raw, tmp_path):
    app = create_app({"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR", "PORT": 0}, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    service = WaitressService(app)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    try:
        raw.script = reply(ONE_LINE_THEN_SILENCE, then_close=False)
        left = leave_after_first_line(int(service.server.effective_port))
        assert_upstream_closed_soon(raw, left)
        call = recorder.wait_for(1)[0]
        assert (call.outcome, call.http_status, call.response_size_bytes) == ("client_gone", 200, len(FIRST_LINE))
        assert state_of(app).in_flight.count == 0
    finally:
        assert service.stop(wait=10)


def test_departures_gunicorn_closes_the_upstream_when_the_client_leaves_mid_stream(raw, tmp_path):
    env = {"OLLAMA_PROXY_UPSTREAM": raw.url, "OLLAMA_PROXY_DATA_DIR": str(tmp_path / "data")}
    proxy = GunicornProxy(env, workers=1, threads=4)
    try:
        raw.script = reply(ONE_LINE_THEN_SILENCE, then_close=False)
        left = leave_after_first_line(proxy.port)
        assert_upstream_closed_soon(raw, left)
    finally:
        assert proxy.stop() == 0
        proxy.log.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "ollama-proxy.db")) as db:
        stored = db.execute("SELECT outcome, http_status, response_size_bytes FROM calls").fetchall()
    assert stored == [("client_gone", 200, len(FIRST_LINE))]


def test_departures_plain_waitress_thread_notices_the_client_leaving_mid_stream(raw, tmp_path):
    """Under a server that offers no loop (plain waitress here), the call's thread relays the stream and watches the
    client between polls: the upstream is closed just as soon."""
    app = create_app({"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    handle = serve(app, threads=4)
    try:
        raw.script = reply(ONE_LINE_THEN_SILENCE, then_close=False)
        left = leave_after_first_line(handle.port)
        assert_upstream_closed_soon(raw, left)
        call = recorder.wait_for(1)[0]
        assert (call.outcome, call.http_status, call.response_size_bytes) == ("client_gone", 200, len(FIRST_LINE))
    finally:
        handle.close()
        shutdown(app)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize(("count", "size"), [(40, 8192), (40, 1000), (8, 8192), (8, 100)])
def test_departures_relay_waits_on_the_socket_only_when_nothing_is_buffered(chunked, count, size):
    """The wait polls the socket, so it must never run while the body's next bytes sit in http.client's buffer
    (8 lines arrive with the head, in one buffer; 40 lines, about 100 kB, take many)."""
    lines = [b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * (n * 397 % 5000 if count > 10 else 300)) for n in range(count)]
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"
    framing_header = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(b"".join(lines))
    upstream, relay = socket.socketpair()
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    waits = []

    def wait() -> None:  # everything was sent before the first read: if nothing is in the socket, it is buffered
        assert wait_for_read(relay, timeout=0), "waited on the socket while bytes were buffered"
        waits.append(1)

    with upstream, relay:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n%s\r\n\r\n" % framing_header
        upstream.sendall(head + (body if chunked else b"".join(lines)))
        response = http.client.HTTPResponse(relay)
        response.begin()
        assert b"".join(framing.pieces(response, size, wait)) == b"".join(lines)
    assert waits or count < 10  # a long body is read in many reads, and the wait ran between them
