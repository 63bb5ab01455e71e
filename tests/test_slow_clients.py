"""Slow and silent clients (finding 4): 1,000 connections from one address that drip a header line every 2 s or send
nothing never stop the proxy. Fresh calls from another address are answered within a second all along, each
connection over the per-address cap is refused long before the header deadline (it waits at most 0.5 s, plus a loop
turn, for its client's closes: service/acceptor.py), and the rest are closed when the header deadline passes.

The attackers connect from 127.0.0.2 and the fresh calls from 127.0.0.1 (all of 127/8 is loopback on Linux), so the
cap is exercised as it would be by a real second host. Each run is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import ipaddress
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from bench.concurrency import ATTACK_FROM, CALLS_FROM, Attack, fresh_call
from proxy_app import config, settings
from proxy_app.service.front import Front
from proxy_app.service.guard import Limits
from tests.conftest import free_port, stop_front
from tests.processes import ROOT, ServeProcess, fake_ollama_env, health, wait_until

ATTACKERS = 1000
CALL_EVERY_SECONDS = 0.25
SETTING = {setting.name: setting for setting in settings.SETTINGS}
HEADER_TIMEOUT = config.parse_setting(SETTING["HEADER_TIMEOUT"], SETTING["HEADER_TIMEOUT"].default)
PER_CLIENT = config.parse_setting(SETTING["MAX_CONNECTIONS_PER_CLIENT"], SETTING["MAX_CONNECTIONS_PER_CLIENT"].default)
WORKERS = config.parse_setting(SETTING["WORKERS"], SETTING["WORKERS"].default)  # the cap holds per process
ATTACK_SECONDS = HEADER_TIMEOUT + 3  # past the deadline, and past gthread's 5 s wait for a first byte
GENERATE = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False})


class GunicornConf:
    """``gunicorn -c`` with the shipped settings, as an installed proxy runs it, on ``port``; ready once it answers."""

    def __init__(self, tmp_path, port: int, env: dict) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:proxy_app.service.gunicorn_conf",
            "proxy_app:create_app()",
        ]
        env = {**env, "OLLAMA_PROXY_PORT": str(port)}
        with open(tmp_path / "gunicorn.log", "ab") as output:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        wait_until(lambda: health(self.url) is not None, timeout=20, message="gunicorn -c")

    def stop(self, timeout: float = 30.0) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(params=["serve", "serve-waitress", "gunicorn-c"])
def proxy(request, upstream, tmp_path):
    """The proxy with default settings: ``serve`` (gunicorn on Linux), ``serve --server waitress``, ``gunicorn -c``."""
    env = fake_ollama_env(tmp_path, UPSTREAM=upstream.url)
    if request.param == "gunicorn-c":
        started = GunicornConf(tmp_path, free_port(), env)
    else:
        started = ServeProcess(
            tmp_path, free_port(), ["--server", "waitress"] if "waitress" in request.param else [], env
        )
    started.processes = 1 if "waitress" in request.param else WORKERS
    yield started
    assert started.stop() == 0


def call(port: int) -> tuple[int | str, float]:
    """A fresh connection from CALLS_FROM, one non-streaming generate: (status or error name, seconds taken)."""
    return fresh_call(port, GENERATE)


@pytest.fixture
def many_files():
    """Room for a thousand sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_slow_clients_cannot_stop_the_proxy(proxy, many_files):
    assert call(proxy.port)[0] == 200
    attack = Attack(proxy.port, ATTACKERS)
    calls = []
    try:
        deadline = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < deadline:
            calls.append(call(proxy.port))
            time.sleep(CALL_EVERY_SECONDS)
        settle = time.monotonic() + 5
        while len(attack.closed) < ATTACKERS and time.monotonic() < settle:
            time.sleep(0.1)
    finally:
        attack.stop()
    slowest = max(seconds for _, seconds in calls)
    assert [status for status, _ in calls] == [200] * len(calls) and slowest < 1.0, calls
    assert len(attack.closed) == ATTACKERS, f"{ATTACKERS - len(attack.closed)} attacker connections still open"
    held = sorted(attack.closed[fileno] - attack.opened[fileno] for fileno in attack.closed)
    refused = sum(seconds < HEADER_TIMEOUT / 2 for seconds in held)
    assert refused >= ATTACKERS - PER_CLIENT * proxy.processes  # over the cap: refused within a second or two
    assert held[-1] < HEADER_TIMEOUT + 3  # the rest: closed once the header deadline passed
    assert call(proxy.port)[0] == 200


# ---- the front's rules one by one, in process ----------------------------------------------------------------------


def hello(environ, start_response):
    """A tiny app: reads the body, answers its length."""
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(str(len(body)))))])
    return [str(len(body)).encode()]


@pytest.fixture
def front_for():
    """Factory: a Front for ``hello`` with the given limits, its loop in a thread; stopped after the test."""
    started = []

    def start(**limits) -> Front:
        running = threading.Event()
        running.set()
        served = Front(hello, Limits(**limits), host="127.0.0.1", port=0, threads=4)
        thread = threading.Thread(target=lambda: _loop(served, running), daemon=True)
        thread.start()
        started.append((served, running, thread))
        served.port = int(served.server.effective_port)
        return served

    yield start
    for served, running, thread in started:
        running.clear()
        thread.join(5)
        stop_front(served)


def _loop(served: Front, running: threading.Event) -> None:
    while running.is_set():
        served.poll(0.05)


def connect(port: int, source: str = ATTACK_FROM) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock``, if it closed it within ``seconds``; None if it is still open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_slow_clients_cap_refuses_with_429_and_spares_trusted_proxies(front_for, closing):
    served = front_for(per_client=2)
    kept = [connect(served.port), connect(served.port)]
    refused = connect(served.port)
    for sock in [*kept, refused]:
        closing(sock)  # closed even when an assertion fails
    answer = closed_within(refused, 2)
    assert answer.startswith(b"HTTP/1.1 429 ") and b'"error": "too many connections from this address' in answer
    other = connect(served.port, CALLS_FROM)  # another address has its own count
    other.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    answer = other.recv(4096)
    while not answer.endswith(b"\r\n\r\n3"):  # the head and the body may come in two reads
        answer += other.recv(4096) or pytest.fail(f"closed after {answer!r}")
    kept[0].close()  # a slot frees up when a connection closes
    wait_until(lambda: sum(served.guard.open.values()) == 2, timeout=2, message="the closed connection forgotten")
    again = connect(served.port)
    again.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert again.recv(4096).startswith(b"HTTP/1.1 200 ")
    for sock in [*kept, refused, other, again]:
        sock.close()
    proxy_network = front_for(per_client=2, exempt=(ipaddress.ip_network("127.0.0.2/32"),))
    many = [connect(proxy_network.port) for _ in range(5)]  # a trusted reverse proxy speaks for many clients
    assert all(closed_within(sock, 0.3) is None for sock in many)
    for sock in many:
        sock.close()


def test_slow_clients_header_deadline_counts_from_a_request_start_not_from_idling(front_for):
    served = front_for(header_seconds=2.0)
    silent, late = connect(served.port), connect(served.port)  # a new connection owes its request at once
    time.sleep(1.5)
    late.sendall(b"GET / HTTP/1.1\r\n")  # and its first byte does not restart the clock
    assert closed_within(late, 1.5) == b"" and closed_within(silent, 0.5) == b""
    kept = connect(served.port)
    kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200 ")
    assert closed_within(kept, 2.5) is None  # idle between requests: keep-alive's own timeout applies
    kept.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")  # a next request begins, and stalls
    assert closed_within(kept, 3) == b""
    for sock in (silent, late, kept):
        sock.close()


def test_slow_clients_body_silence_closes_the_connection(front_for):
    served = front_for(header_seconds=0.5, body_seconds=1.0)
    slow = connect(served.port)
    slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(4):  # a steady body, however slow, is not cut (four pauses of 0.5 s: past the header deadline)
        time.sleep(0.5)
        slow.sendall(b"x" * 10)
    assert closed_within(slow, 0.1) is None
    assert closed_within(slow, 3) == b""  # then 60 bytes never come: closed once the body is silent for 1 s
    slow.close()
    assert served.guard.closed_slow == 1 and not served.guard.open


def test_slow_clients_gunicorn_hup_replaces_workers_and_no_call_fails(gunicorn_proxy):
    """A reload (HUP) under the front worker: new workers start, the old ones finish what they accepted."""
    proxy = gunicorn_proxy(workers=2, threads=8)
    arbiter = psutil.Process(proxy.process.pid)
    old = {child.pid for child in arbiter.children()}
    results: list = []
    stop = threading.Event()

    def calls() -> None:
        while not stop.is_set() and len(results) < 2000:
            results.append(call(proxy.port)[0])  # a fresh connection each: some land on a worker as it stops

    threads = [threading.Thread(target=calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(results) >= 20, timeout=10, message="calls before the reload")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: not old & {child.pid for child in arbiter.children()}, timeout=20, message="old workers gone"
        )
        counted = len(results)
        wait_until(lambda: len(results) >= counted + 20, timeout=10, message="calls after the reload")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert len({child.pid for child in arbiter.children()}) == 2
    assert [status for status in results if status != 200] == []
