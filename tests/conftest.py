"""Shared fixtures: the fake Ollama on a real port, our app, its test client, and the app on a real port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests

from proxy_app import create_app, shutdown
from proxy_app.service import front
from proxy_app.service.guard import Limits
from proxy_app.state import state_of
from tests.fake_ollama import FakeOllama, ServerHandle, serve

ROOT = Path(__file__).resolve().parent.parent
# The README's test server; another can be named for a run (the tests add a throwaway schema to it).
POSTGRES = os.environ.get("OLLAMA_PROXY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# CI sets this so that tests needing PostgreSQL, Chromium or Prometheus fail rather than skip when the part is missing.
REQUIRE_ALL = os.environ.get("OLLAMA_PROXY_TEST_REQUIRE_ALL") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip a test whose external part is missing, except in CI where that is a failure."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required test dependency missing: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_schema(prefix: str):
    """Yield a PostgreSQL URL whose tables live in a fresh schema, dropped afterwards (runs never collide)."""
    try:
        connection = psycopg2.connect(POSTGRES, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        need(False, f"PostgreSQL at {POSTGRES} is unreachable: {exc}")
    connection.autocommit = True
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}options=-csearch_path%3D{schema}"
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP SCHEMA {schema} CASCADE")
        connection.close()


class CallRecorder:
    """A call sink that keeps every finished Call and lets a test wait for them (no sleeps)."""

    def __init__(self) -> None:
        self.calls: list = []
        self._changed = threading.Condition()

    def __call__(self, call) -> None:
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list:
        """Return the calls once at least ``count`` have finished; fail after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"expected {count} finished calls, got {len(self.calls)}")
            return list(self.calls)


@pytest.fixture
def fake():
    """A fresh fake Ollama (knobs at their defaults)."""
    return FakeOllama()


@pytest.fixture
def upstream(fake):
    """The fake Ollama served on an ephemeral port."""
    handle = serve(fake)
    yield handle
    handle.close()


def app_settings(upstream_url: str, data_dir: Path) -> dict:
    """Settings for a test app relaying to ``upstream_url`` and keeping its data in ``data_dir``. No load sampling:
    a process's first call would wait for the first CPU figure (tests of the sampler and of the rows it fills set
    SAMPLE_INTERVAL themselves)."""
    return {"UPSTREAM": upstream_url, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING", "SAMPLE_INTERVAL": "0"}


@pytest.fixture
def settings(upstream, tmp_path) -> dict:
    """``app_settings`` for the fake upstream and a temporary directory."""
    return app_settings(upstream.url, tmp_path)


@pytest.fixture
def app(settings):
    """Our app, configured only from ``settings`` (the environment and .env are ignored)."""
    application = create_app(settings, environ={})
    yield application
    shutdown(application)


@pytest.fixture
def recorder(app) -> CallRecorder:
    """Collects every Call the app finishes."""
    sink = CallRecorder()
    state_of(app).call_sinks.append(sink)
    return sink


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def live_proxy(app):
    """Our app under waitress on an ephemeral port, as a real client sees it."""
    handle = serve_proxy(app, threads=96)
    yield handle
    handle.close()


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another connection holding a SQLite store's write lock, as a long transaction in another process would."""
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def release(holder: sqlite3.Connection) -> None:
    """End what ``hold_write_lock`` began."""
    holder.execute("ROLLBACK")
    holder.close()


def free_port() -> int:
    """Return a port that was free a moment ago (for servers that cannot report an ephemeral port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_front(served) -> None:
    """Stop a Front whose loop a test turns itself (once that loop has stopped): listeners, connections, threads."""
    served.stop_accepting()
    served.close_connections()
    served.task_dispatcher.shutdown(timeout=2)
    served.server.trigger.close()


class GunicornProxy:
    """The proxy under gunicorn with deploy/gunicorn.conf.py, as a subprocess on a free port."""

    def __init__(self, env: dict, workers: int = 1, threads: int = 32) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "OLLAMA_PROXY_PORT": str(self.port), "OLLAMA_PROXY_WORKERS": str(workers),
                    "OLLAMA_PROXY_THREADS": str(threads), "OLLAMA_PROXY_LOG_LEVEL": "WARNING"}  # fmt: skip
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        # A file, not a pipe: a pipe nobody reads fills up, and then every worker that logs blocks in the write.
        self.log = tempfile.TemporaryFile(mode="a+b")  # appending: reading it never moves where gunicorn writes
        self.process = subprocess.Popen(
            [gunicorn, "-c", "deploy/gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=full_env,
            stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        self._wait_ready()

    def stderr(self) -> bytes:
        """What the arbiter and its workers have written to stderr so far."""
        self.log.seek(0)
        return self.log.read()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.stderr().decode(errors='replace')}")
            try:
                requests.get(self.url + "/health", timeout=2)
                return
            except (requests.ConnectionError, requests.Timeout):  # a worker still booting on a busy machine
                time.sleep(0.05)
        raise RuntimeError("gunicorn did not answer in time")

    @property
    def metrics_dir(self) -> Path:
        """The directory of the workers' Prometheus files (the arbiter chooses it): where they hold them open."""
        for worker in psutil.Process(self.process.pid).children():
            for opened in worker.open_files():
                if Path(opened.path).name.startswith("counter_"):
                    return Path(opened.path).parent
        raise AssertionError("no worker holds a Prometheus counter file open")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the arbiter and wait for it to exit; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def gunicorn_proxy(upstream, tmp_path):
    """Factory: start the proxy under gunicorn against the fake upstream; stopped after the test."""
    started: list[GunicornProxy] = []

    def start(workers: int = 1, threads: int = 32, **env) -> GunicornProxy:
        base = {"OLLAMA_PROXY_UPSTREAM": upstream.url, "OLLAMA_PROXY_DATA_DIR": str(tmp_path / "data")}
        proxy = GunicornProxy({**base, **env}, workers=workers, threads=threads)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        proxy.log.close()  # an open file would be a ResourceWarning (an error) in the next test


class FrontHandle(ServerHandle):
    """A running front (``front``: its loop's map, its channels), stopped as any ServerHandle."""

    def __init__(self, served: front.Front) -> None:
        super().__init__(served.server)
        self.front = served


def serve_proxy(app, threads: int = 64, options: dict | None = None) -> FrontHandle:
    """Our app on an ephemeral port behind the front ``serve`` runs (service/front.py): guarded as there, and its
    streams relayed by the loop. ``options`` replace the platform's connection options (poll() and its limits)."""
    options = front.connection_options(threads) if options is None else options
    served = front.Front(app, Limits.from_settings(app.config), host="127.0.0.1", port=0, threads=threads, **options)
    handle = FrontHandle(served)
    handle.wait_ready()
    return handle


@pytest.fixture
def proxy_for(tmp_path):
    """Factory: our app (with a CallRecorder) under waitress, in front of ``url``; all stopped after the test.
    ``options`` replace the front's connection options as in ``serve_proxy`` (``{}``: select(), no loop relay)."""
    started: list = []

    def start(url: str, options: dict | None = None, **settings):
        app = create_app({"UPSTREAM": url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR", **settings}, environ={})
        recorder = CallRecorder()
        state_of(app).call_sinks.append(recorder)
        handle = serve_proxy(app, threads=16, options=options)
        started.append((handle, app))
        return handle, app, recorder

    start.started = started  # a test that must stop its proxies early pops them from here
    yield start
    for handle, app in started:
        handle.close()
        shutdown(app)


@pytest.fixture
def proxy_with(upstream, tmp_path):
    """Factory: our app with extra settings, served on a real port; returns (app, handle, recorder)."""
    started = []

    def start(**overrides):
        settings = {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path / f"data{len(started)}"), "LOG_LEVEL": "WARNING"}
        app = create_app({**settings, **overrides}, environ={})
        recorder = CallRecorder()
        state_of(app).call_sinks.append(recorder)
        handle = serve_proxy(app)
        started.append((app, handle))
        return app, handle, recorder

    yield start
    for app, handle in started:
        handle.close()
        shutdown(app)


@pytest.fixture
def closing():
    """Register API clients (ollama, openai) to be closed after the test, so no socket leaks into the next one."""
    opened: list = []

    def register(client):
        opened.append(client)
        return client

    yield register
    for client in opened:
        client.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs mounted for the test (a data disk to fill); needs mount rights, as CI has."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    need(mounted.returncode == 0, f"a full disk is a 1 MB tmpfs, which needs mount rights: {mounted.stderr!r}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> int:
    """Take every byte left on ``directory``'s file system; return how many were written."""
    written = 0
    with open(directory / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                written += filler.write(b"\0" * 65536)
        except OSError:  # no space left
            return written
