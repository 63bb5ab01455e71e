"""What the server raises costs nothing: a start_response that refuses the relayed head, in process and under
gunicorn, still records the call and gives back its in-flight count, gate slot and upstream socket.

Servers refuse heads for reasons of their own (gunicorn and waitress both take int() of Content-Length, gunicorn
refuses control characters); the relay cannot foresee every one, so it answers in the API's shape when the server
still lets it, and frees everything whether or not it does.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest
import requests
from werkzeug.test import EnvironBuilder

from proxy_app import create_app, shutdown
from proxy_app.state import state_of
from tests.conftest import CallRecorder, GunicornProxy
from tests.processes import wait_until
from tests.raw_upstream import RawUpstream, reply, response

GOOD_REPLY = response(b'{"model":"llama3.2","response":"ok","done":true,"eval_count":1}')
# A head gunicorn and waitress refuse in start_response (int("1 2") fails); the relay's own framing check refuses
# it first, as a bad upstream answer.
REFUSED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 1 2\r\n\r\n"
                b'{"model":"llama3.2","response":"ok","done":true}')  # fmt: skip
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


class RefusingServer:
    """A start_response that raises for the relayed head, as a server does; ``answers``: later calls it accepted."""

    def __init__(self, accepts_exc_info: bool = True) -> None:
        self.accepts_exc_info = accepts_exc_info
        self.answers: list[tuple[str, list]] = []

    def __call__(self, status, headers, exc_info=None):
        if exc_info is None or not self.accepts_exc_info:
            raise ValueError("invalid header value")
        self.answers.append((status, headers))


@pytest.fixture
def raw():
    """An upstream with a good answer (RefusingServer refuses any head); it notes every connection the proxy closes."""
    upstream = RawUpstream(reply(GOOD_REPLY, then_close=False))
    yield upstream
    upstream.close()


@pytest.fixture
def proxy(raw, tmp_path):
    """Our app in front of ``raw`` with two slots and a short queue, and a recorder."""
    settings = {"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "CRITICAL", "MAX_CONCURRENT": 2,
                "QUEUE_TIMEOUT": 0.5}  # fmt: skip
    app = create_app(settings, environ={})
    recorder = CallRecorder()
    state_of(app).call_sinks.append(recorder)
    yield app, recorder
    shutdown(app)


def call_with(app, server: RefusingServer, path: str = "/api/generate") -> bytes:
    """Run one call through the app as a server would, with ``server`` as its start_response."""
    environ = EnvironBuilder(path=path, method="POST", json=GENERATE, headers={"Host": "localhost"}).get_environ()
    body = app(environ, server)
    try:
        return b"".join(body)
    finally:
        body.close()


def test_leaks_start_response_raising_answers_in_shape_and_frees_the_slot(proxy, raw):
    app, recorder = proxy
    server = RefusingServer()
    native = call_with(app, server)
    openai_shape = call_with(app, server, "/v1/chat/completions")
    call_with(app, server)
    message = "the server could not send the upstream's answer: ValueError: invalid header value"
    assert [status for status, _ in server.answers] == ["502 BAD GATEWAY"] * 3
    assert json.loads(native) == {"error": message}
    assert json.loads(openai_shape)["error"] == {"message": message, "type": "api_error", "param": None, "code": None}
    calls = recorder.wait_for(3)
    assert [(call.outcome, call.http_status, call.error_message) for call in calls] == [
        ("upstream_error", 502, message)
    ] * 3
    assert state_of(app).in_flight.count == 0
    wait_until(lambda: len(raw.closed_at) == 3, timeout=5, message="every upstream connection closed")
    raw.script = reply(GOOD_REPLY)
    assert app.test_client().post("/api/generate", json=GENERATE).status_code == 200  # both slots are free


def test_leaks_start_response_always_raising_still_frees_the_slot(proxy, raw):
    """A server that refuses our error answer too gets its own exception back; nothing is held all the same."""
    app, recorder = proxy
    for _ in range(3):
        with pytest.raises(ValueError, match="invalid header value"):
            call_with(app, RefusingServer(accepts_exc_info=False))
    assert [call.outcome for call in recorder.wait_for(3)] == ["upstream_error"] * 3
    assert state_of(app).in_flight.count == 0
    wait_until(lambda: len(raw.closed_at) == 3, timeout=5, message="every upstream connection closed")
    raw.script = reply(GOOD_REPLY)
    assert app.test_client().post("/api/generate", json=GENERATE).status_code == 200


def test_leaks_gunicorn_bad_head_answers_in_shape_and_frees_the_slot(raw, tmp_path):
    env = {"OLLAMA_PROXY_UPSTREAM": raw.url, "OLLAMA_PROXY_DATA_DIR": str(tmp_path / "data"),
           "OLLAMA_PROXY_MAX_CONCURRENT": "2", "OLLAMA_PROXY_QUEUE_TIMEOUT": "1"}  # fmt: skip
    raw.script = reply(GOOD_REPLY)  # while gunicorn starts and its /health probes the upstream
    proxy = GunicornProxy(env, workers=1, threads=8)
    raw.script = reply(REFUSED_HEAD, then_close=False)
    try:
        with requests.Session() as session:
            session.trust_env = False
            refused = [session.post(proxy.url + "/api/generate", json=GENERATE, timeout=10) for _ in range(3)]
            wait_until(lambda: len(raw.closed_at) == 3, timeout=5, message="every upstream connection closed")
            raw.script = reply(GOOD_REPLY)
            later = [session.post(proxy.url + "/api/generate", json=GENERATE, timeout=10) for _ in range(3)]
    finally:
        assert proxy.stop() == 0
        proxy.log.close()
    for answer in refused:
        assert answer.status_code == 502 and "invalid Content-Length from the upstream" in answer.json()["error"]
    assert [answer.status_code for answer in later] == [200] * 3
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "ollama-proxy.db")) as db:
        stored = db.execute("SELECT outcome, http_status FROM calls ORDER BY timestamp").fetchall()
    assert stored == [("upstream_error", 502)] * 3 + [("completed", 200)] * 3


def test_leaks_server_failing_mid_body_then_closing_frees_the_slot(proxy, raw):
    """A write that fails after the first piece (the server raises, then closes the body, as PEP 3333 has it)."""
    app, recorder = proxy
    line = b'{"model":"llama3.2","response":"a","done":false}\n'
    raw.script = reply(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"%x\r\n%s\r\n" % (len(line), line), then_close=False)  # fmt: skip
    for _ in range(3):
        environ = EnvironBuilder(path="/api/generate", method="POST", json=GENERATE).get_environ()
        body = app(environ, lambda status, headers, exc_info=None: None)
        assert next(iter(body)) == line  # then the server's write of it fails, and it closes the body
        body.close()
    assert [(call.outcome, call.response_size_bytes) for call in recorder.wait_for(3)] == [
        ("client_gone", len(line))
    ] * 3
    assert state_of(app).in_flight.count == 0
    wait_until(lambda: len(raw.closed_at) == 3, timeout=5, message="every upstream connection closed")
    raw.script = reply(GOOD_REPLY)
    assert app.test_client().post("/api/generate", json=GENERATE).status_code == 200
