"""The processes a benchmark run measures: the fast fake upstream, nginx, and the proxy under gunicorn and waitress.

Each ``Target`` knows its base URL and its process tree, so a benchmark can read the CPU time and resident memory of
exactly the processes that serve it (psutil). ``direct`` is the upstream itself. Every process is started by this
module, on a free loopback port, and stopped by it (by its own pid). Nothing here measures anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from proxy_app import config

ROOT = Path(__file__).resolve().parent.parent
_DEFAULTS = config.load({}, env_file=None)
# What a user gets from `serve`, and so what the bench measures unless told otherwise.
SERVE_WORKERS, SERVE_THREADS = _DEFAULTS["WORKERS"], _DEFAULTS["THREADS"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_CONF = """worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream ollama {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://ollama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"""


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Target:
    """One thing the client can talk to: a name, a base URL and the process whose tree serves it."""

    name: str
    url: str
    process: subprocess.Popen
    data_dir: Path | None = None
    _procs: dict = field(default_factory=dict)

    def processes(self) -> list[psutil.Process]:
        """The serving process and all its descendants (gunicorn: serve -> arbiter -> workers)."""
        try:
            root = psutil.Process(self.process.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for proc in found:  # keep one Process object per pid: psutil caches per object
            self._procs.setdefault(proc.pid, proc)
        return [self._procs[proc.pid] for proc in found]

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the whole tree so far."""
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_bytes(self) -> dict[int, int]:
        """Resident memory of each process in the tree, by pid (gunicorn: its serve and arbiter processes too)."""
        sizes = {}
        for proc in self.processes():
            try:
                sizes[proc.pid] = proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return sizes

    def workers(self) -> list[psutil.Process]:
        """The processes that serve requests (the leaves of the tree)."""
        return [proc for proc in self.processes() if not _has_children(proc)]

    def worker_rss_bytes(self) -> list[int]:
        """Resident memory of each serving process."""
        return [proc.memory_info().rss for proc in self.workers()]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM this target's root process (which stops its children) and wait; kill it if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _has_children(proc: psutil.Process) -> bool:
    try:
        return bool(proc.children())
    except psutil.NoSuchProcess:
        return False


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once ``port`` accepts connections; raise if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def start_upstream() -> Target:
    """The fast fake Ollama (bench/upstream.py) on a free port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(port)], cwd=ROOT)
    wait_listening(port, process)
    return Target("direct", f"http://127.0.0.1:{port}", process)


def start_nginx(upstream: Target, work_dir: Path) -> Target:
    """nginx as a plain reverse proxy (no buffering, keep-alive upstream): the zero-cost reference."""
    port, conf_dir = free_port(), work_dir / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    upstream_port = upstream.url.rsplit(":", 1)[1]
    (conf_dir / "nginx.conf").write_text(NGINX_CONF.format(dir=conf_dir, upstream=upstream_port, port=port))
    command = [NGINX, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"), "-g", "daemon off;"]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    wait_listening(port, process)
    return Target("nginx", f"http://127.0.0.1:{port}", process)


def start_floor(upstream: Target) -> Target:
    """bench/floor.py: an asyncio relay that passes bytes through and does nothing else (the Python floor)."""
    port = free_port()
    command = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream-port",
               upstream.url.rsplit(":", 1)[1]]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT)
    wait_listening(port, process)
    return Target("floor", f"http://127.0.0.1:{port}", process)


def start_hello(server: str, threads: int = 64) -> Target:
    """bench/hello.py (a fixed answer) under gunicorn gthread (1 worker) or waitress: the servers' own cost."""
    port, bin_dir = free_port(), Path(sys.executable).parent
    if server == "gunicorn":
        command = [str(bin_dir / "gunicorn"), "-k", "gthread", "-w", "1", "--threads", str(threads), "--keep-alive",
                   "75", "--log-level", "warning", "-b", f"127.0.0.1:{port}", "bench.hello:app"]  # fmt: skip
    else:
        command = [str(bin_dir / "waitress-serve"), f"--threads={threads}", f"--listen=127.0.0.1:{port}",
                   "bench.hello:app"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    wait_listening(port, process)
    return Target(f"{server}-hello", f"http://127.0.0.1:{port}", process)


def start_proxy(server: str, upstream: Target, work_dir: Path, threads: int | None, workers: int | None = 1,
                extra_env: dict | None = None, checkout: Path = ROOT) -> Target:  # fmt: skip
    """``python -m proxy_app serve`` under ``server`` with full analytics (SQLite, CSV, metrics) in a fresh dir.

    ``threads`` and ``workers`` None leave those settings at their defaults; ``checkout`` is the source tree served.
    """
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix=f"{server}-", dir=work_dir))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OLLAMA_PROXY_", "PROMETHEUS_"))}
    env.update(OLLAMA_PROXY_LOG_LEVEL="WARNING", PYTHONPATH=str(checkout), **(extra_env or {}))
    command = [sys.executable, "-m", "proxy_app", "serve", "--server", server, "--port", str(port),
               "--upstream", upstream.url, "--data-dir", str(data_dir)]  # fmt: skip
    command += ["--threads", str(threads)] if threads is not None else []
    command += ["--workers", str(workers)] if workers is not None else []
    if workers is None:  # the served checkout's own default, which another checkout's may differ from
        code = "import os; from proxy_app import config; print(config.load(os.environ, env_file=None)['WORKERS'])"
        workers = int(subprocess.check_output([sys.executable, "-c", code], cwd=work_dir, env=env))
    with open(data_dir / "serve.log", "ab") as log:  # cwd is not the repo, so no .env there changes the settings
        process = subprocess.Popen(command, cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_listening(port, process)
    if server == "gunicorn":
        wait_workers_ready(workers, process)
    return Target(server, f"http://127.0.0.1:{port}", process, data_dir=data_dir)


def wait_workers_ready(workers: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once every gunicorn worker has loaded the app (each holds its own Prometheus counter file open then).

    gunicorn listens before its workers have loaded the app; clients that connect in that gap all go to the first
    worker ready, and keep-alive keeps them there (a soak once ran on 43 / 39 / 4 threads' worth of connections).
    """
    deadline = time.monotonic() + timeout
    while _ready_workers(process.pid) < workers:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{workers} gunicorn workers were not ready after {timeout} s")
        time.sleep(0.05)
    time.sleep(0.2)  # from loading the app to polling the listener


def _ready_workers(serve_pid: int) -> int:
    """How many processes under ``serve_pid`` hold a Prometheus counter file open (gunicorn workers with the app)."""
    ready = 0
    for proc in psutil.Process(serve_pid).children(recursive=True):
        try:
            ready += any(Path(opened.path).name.startswith("counter_") for opened in proc.open_files())
        except psutil.Error:
            pass
    return ready
