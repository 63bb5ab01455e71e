"""The Ollama supervisor with the fake `ollama` executable: start, stop, failures, ports it must leave alone.

Restarts after a crash are tested end to end through `serve` (test_service.py).
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from proxy_app.service.supervisor import (
    Supervisor,
    SupervisorError,
    find_ollama,
    is_listening,
    ollama_version,
    read_state,
)
from tests.conftest import free_port
from tests.fake_ollama import VERSION, FakeOllama, serve
from tests.processes import FAKE_OLLAMA, fake_ollama_env, wait_until


def make_supervisor(tmp_path, port: int, binary: str = str(FAKE_OLLAMA)) -> Supervisor:
    return Supervisor(binary, port, tmp_path / "data", fake_ollama_env(tmp_path), ready_timeout=10)


def test_supervisor_starts_on_loopback_and_stops(tmp_path):
    port = free_port()
    supervisor = make_supervisor(tmp_path, port)
    supervisor.start()
    try:
        assert ollama_version(port) == VERSION
        assert psutil.Process(supervisor.pid).environ()["OLLAMA_HOST"] == f"127.0.0.1:{port}"
        saved = read_state(supervisor.state_path)
        assert (saved["ok"], saved["state"], saved["restarts"], saved["pid"]) == (True, "running", 0, supervisor.pid)
        assert "starting" in (tmp_path / "data" / "ollama.log").read_text()
    finally:
        supervisor.stop()
    assert not is_listening(port)
    assert read_state(supervisor.state_path)["state"] == "stopped"


def test_supervisor_leaves_a_foreign_process_alone(tmp_path):
    port = free_port()
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: is_listening(port), message="the foreign listener")
        expected = rf"port {port} .* held by python.* \(pid {foreign.pid}: .*http.server.*not an Ollama"
        with pytest.raises(SupervisorError, match=expected):
            make_supervisor(tmp_path, port).start()
        assert foreign.poll() is None and is_listening(port)
    finally:
        foreign.kill()
        foreign.wait()


def test_supervisor_uses_an_ollama_it_did_not_start(tmp_path):
    handle = serve(FakeOllama())
    try:
        supervisor = make_supervisor(tmp_path, int(handle.port))
        supervisor.start()
        assert (supervisor.state, supervisor.pid) == ("external", None)
        supervisor.stop()
        assert ollama_version(int(handle.port)) == VERSION  # still serving: we never stop what we did not start
    finally:
        handle.close()


def test_supervisor_start_failure_shows_ollama_output(tmp_path):
    broken = tmp_path / "ollama"
    broken.write_text("#!/bin/sh\necho 'Error: listen tcp 127.0.0.1: bind: permission denied'\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SupervisorError, match="did not answer.*bind: permission denied"):
        make_supervisor(tmp_path, free_port(), binary=str(broken)).start()


def test_supervisor_find_ollama(tmp_path):
    assert find_ollama(str(FAKE_OLLAMA)) == str(FAKE_OLLAMA)
    assert find_ollama(str(tmp_path / "missing")) is None


def test_supervisor_read_state_missing_or_stale(tmp_path):
    assert read_state(tmp_path / "none.json")["ok"] is False
    (tmp_path / "old.json").write_text('{"state": "running", "supervisor_pid": 999999999}')
    assert read_state(tmp_path / "old.json")["state"] == "stale"
