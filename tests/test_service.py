"""`serve` as a service: a supervised Ollama that is restarted and stopped last, SIGTERM during live streams under
both servers, the in-process waitress stop used by the Windows service, and the Windows helpers that run on Linux."""

from __future__ import annotations

import http.client
import importlib.util
import json
import sqlite3
import threading
import time

import pytest

from proxy_app import create_app
from proxy_app.relay.drain import Drain
from proxy_app.relay.gate import InFlight
from proxy_app.service.servers import WaitressService, choose_server, client_address
from proxy_app.service.supervisor import is_listening
from proxy_app.state import state_of
from tests.conftest import free_port
from tests.processes import ROOT, ServeProcess, fake_ollama_env, health, wait_until

GRACE_SECONDS = 1.0
TOKEN_DELAY = 0.05
SHORT_TOKENS, LONG_TOKENS = 5, 100  # 0.25 s: done inside the grace period; 5 s: cut when it ends


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_service_supervises_ollama_and_drains_streams_on_sigterm(tmp_path, server):
    """serve --with-ollama: Ollama restarted after a crash; SIGTERM during 20 streams: each completes or is cut only
    after the grace period, every call is stored, and the supervised Ollama stops last."""
    upstream_port = free_port()
    env = fake_ollama_env(tmp_path, UPSTREAM=f"http://127.0.0.1:{upstream_port}")
    args = ["--server", server, "--with-ollama", "--grace-seconds", str(GRACE_SECONDS)]
    proxy = ServeProcess(tmp_path, free_port(), args, env)
    first = health(proxy.url)["ollama_supervisor"]
    assert (first["state"], first["upstream"], first["restarts"]) == ("running", f"127.0.0.1:{upstream_port}", 0)
    (tmp_path / "crash").touch()  # the fake ollama exits with code 3
    again = wait_until(lambda: _restarted(proxy.url), timeout=10, message="ollama restarted")
    assert again["pid"] != first["pid"] and again["last_exit_code"] == 3

    streams = [Stream(proxy.port, SHORT_TOKENS if i % 2 else LONG_TOKENS) for i in range(20)]
    assert all(stream.started.wait(10) for stream in streams)
    signalled = time.monotonic()
    assert proxy.stop() == 0, proxy.output()
    assert not is_listening(proxy.port)
    for stream in streams:
        stream.thread.join(10)
        assert stream.is_done or (stream.was_cut and stream.ended >= signalled + GRACE_SECONDS), stream.lines[-1:]
    assert sum(stream.is_done for stream in streams) == 10 and sum(stream.was_cut for stream in streams) == 10
    assert not is_listening(upstream_port), "the supervised ollama must be stopped with the proxy"
    assert _stored_outcomes(tmp_path) == {"completed": 10, "client_gone": 10}


def _restarted(url: str) -> dict | None:
    state = (health(url) or {}).get("ollama_supervisor", {})
    return state if state.get("restarts") == 1 and state.get("state") == "running" else None


class Stream:
    """One streaming /api/generate through the proxy, read line by line in a thread."""

    def __init__(self, port: int, tokens: int) -> None:
        self.port, self.tokens = port, tokens
        self.lines: list[dict] = []
        self.started = threading.Event()
        self.ended = 0.0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"X-Fake-Tokens": str(self.tokens), "X-Fake-Token-Delay": str(TOKEN_DELAY)}
        connection.request("POST", "/api/generate", json.dumps({"model": "llama3.2", "prompt": "hi"}), headers)
        answer = connection.getresponse()
        while line := answer.readline():
            self.lines.append(json.loads(line))
            self.started.set()
        self.ended = time.monotonic()
        connection.close()

    @property
    def is_done(self) -> bool:
        return bool(self.lines) and self.lines[-1].get("done") is True

    @property
    def was_cut(self) -> bool:
        return bool(self.lines) and "shutting down" in self.lines[-1].get("error", "")


def _stored_outcomes(tmp_path) -> dict:
    with sqlite3.connect(tmp_path / "data" / "ollama-proxy.db") as db:
        return dict(db.execute("SELECT outcome, count(*) FROM calls GROUP BY outcome"))


# The stop once raced its own last wake-up (EBADF in the drain thread); 10 runs showed it each time it was tried.
@pytest.mark.parametrize("run", range(10))
def test_service_waitress_stop_from_another_thread(settings, run):
    """What the Windows service does: serve in one thread, stop from another; the listener closes, serve returns."""
    service = WaitressService(create_app({**settings, "PORT": 0, "GRACE_SECONDS": 1}, environ={}))
    serving = threading.Thread(target=service.serve_forever, daemon=True)
    serving.start()
    port = int(service.server.effective_port)
    assert health(service.url)["proxy"] == "up"
    assert service.stop(wait=10) is True
    serving.join(5)
    assert not serving.is_alive() and not is_listening(port)
    assert service.server.trigger._closed and not service.server._map  # pytest fails the test if the drain raised


def test_service_waitress_starts_the_samplers_before_the_first_call(settings):
    """The first call of a process finds the load sampler's first figure instead of waiting for it."""
    app = create_app({**settings, "PORT": 0, "SAMPLE_INTERVAL": "5"}, environ={})  # the fixture turns samplers off
    service = WaitressService(app)
    serving = threading.Thread(target=service.serve_forever, daemon=True)
    serving.start()
    try:
        wait_until(lambda: state_of(app).load_sampler.has_sample, timeout=10, message="the first CPU figure")
    finally:
        assert service.stop(wait=10) is True
        serving.join(5)


def test_service_drain_cuts_streams_only_after_grace():
    in_flight = InFlight()
    drain = Drain(in_flight, grace_seconds=0.2)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        in_flight.enter()  # and never leaves: the stream is still running when the grace period ends
        return iter([b'{"n":1}\n', b'{"n":2}\n', b'{"n":3}\n'])

    body = drain.wrap(app)({}, lambda status, headers, exc_info=None: None)
    chunks = iter(body)
    assert next(chunks) == b'{"n":1}\n'
    started = time.monotonic()
    assert drain.run(settle_seconds=0) == 1 and time.monotonic() - started >= 0.2
    last = next(chunks)
    assert json.loads(last) == {"error": "the proxy is shutting down: stream cut after the 0.2 s grace period"}
    assert list(chunks) == []


def test_service_choose_server_and_client_address():
    assert choose_server("auto", "linux") == "gunicorn" and choose_server("auto", "win32") == "waitress"
    assert choose_server("waitress", "linux") == "waitress"
    assert client_address("0.0.0.0", 11434) == "127.0.0.1:11434"
    assert client_address("::", 8080) == "[::1]:8080" and client_address("10.0.0.2", 1) == "10.0.0.2:1"


def _windows_service_module():
    path = ROOT / "deploy" / "windows" / "ollama_proxy_service.py"
    spec = importlib.util.spec_from_file_location("ollama_proxy_service", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_service_windows_helpers_import_and_work_on_linux(tmp_path):
    module = _windows_service_module()
    assert module.recovery_commands("OllamaProxy") == [
        ["sc.exe", "failure", "OllamaProxy", "reset=", "86400", "actions=", "restart/5000/restart/15000/restart/60000"],
        ["sc.exe", "failureflag", "OllamaProxy", "1"],
    ]
    log_file = module.log_to_data_dir(str(tmp_path / "data"))
    assert log_file == tmp_path / "data" / "service.log" and log_file.parent.is_dir()
