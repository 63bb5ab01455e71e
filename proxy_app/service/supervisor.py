"""Start, watch and restart a local ``ollama serve`` behind the proxy, and say who holds a busy port.

The child listens on 127.0.0.1 only (never 0.0.0.0), writes its output to a log file (never an unread pipe) and is
restarted with exponential backoff when it dies. Its state goes to a small JSON file so that every server process
can show it in ``/health``. This module imports nothing from Flask, and it never signals a process it did not start:
an Ollama already serving on the port is used as it is, and anything else there is only named.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import psutil

from proxy_app.ops.probe import probe_upstream
from proxy_app.state import state_of

log = logging.getLogger(__name__)

# Where the official installers put the binary when it is not on PATH (a service's PATH is often minimal).
USUAL_PLACES = (
    "/usr/local/bin/ollama",
    "/usr/bin/ollama",
    "/opt/homebrew/bin/ollama",
    "/Applications/Ollama.app/Contents/Resources/ollama",
    str(Path.home() / "AppData" / "Local" / "Programs" / "Ollama" / "ollama.exe"),
)
FIRST_BACKOFF_SECONDS = 0.5  # first restart is quick: most crashes are one-off
MAX_BACKOFF_SECONDS = 30.0  # a crash loop still retries twice a minute
STABLE_SECONDS = 60.0  # a child that ran this long before dying starts the backoff afresh
READY_TIMEOUT_SECONDS = 60.0  # first start on a cold disk can take a while
STOP_TIMEOUT_SECONDS = 10.0  # Ollama unloads models on shutdown; give it that long before killing it
POLL_SECONDS = 0.1


class SupervisorError(RuntimeError):
    """Ollama cannot be started; the message says why and what to do."""


def find_ollama(configured: str = "") -> str | None:
    """Return the ollama executable: the configured path, else PATH, else the usual install places."""
    if configured:
        return configured if Path(configured).is_file() else None
    found = shutil.which("ollama")
    if found:
        return found
    return next((place for place in USUAL_PLACES if Path(place).is_file()), None)


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def get_json(port: int, path: str, host: str = "127.0.0.1", timeout: float = 2.0) -> dict:
    """GET a JSON object from host:port (no proxies from the environment); {} on any failure or other answer."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        document = json.loads(connection.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return {}
    finally:
        connection.close()
    return document if isinstance(document, dict) else {}


def ollama_version(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> str | None:
    """Return the version an Ollama on host:port reports, or None when nothing Ollama-like answers there."""
    address = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    return probe_upstream(f"http://{address}:{port}", timeout=timeout)["version"]


def port_holder(port: int) -> str:
    """Describe the process listening on ``port`` (name, pid, command line) as well as we are allowed to see."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return "a process this user may not inspect (run as root/administrator to see which)"
    pids = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    if not pids:
        return "an unknown process"
    if None in pids:
        return "a process of another user (run as root/administrator to see which)"
    return ", ".join(_describe_process(pid) for pid in sorted(pids))


def _describe_process(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        command = " ".join(process.cmdline()) or process.name()
        return f"{process.name()} (pid {pid}: {command[:200]})"
    except psutil.Error:
        return f"pid {pid}"


def read_state(path: str | os.PathLike) -> dict:
    """Return the supervisor state saved at ``path`` for /health; ``ok`` is False when it is missing or stale."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"ok": False, "state": "unknown", "error": f"no supervisor state at {path}"}
    if not psutil.pid_exists(state.get("supervisor_pid", -1)):
        return {**state, "ok": False, "state": "stale", "error": "the supervising process is gone"}
    return {**state, "ok": state.get("state") in ("running", "external")}


def state_path(data_dir: str | os.PathLike) -> Path:
    """Where the supervisor keeps its state: one file in the data directory."""
    return Path(data_dir) / "ollama-supervisor.json"


def init_app(app) -> None:
    """Show the supervisor's state in /health when `serve` supervises Ollama (WITH_OLLAMA)."""
    if app.config["WITH_OLLAMA"]:
        path = state_path(app.config["DATA_DIR"])
        state_of(app).health_checks["ollama_supervisor"] = lambda: read_state(path)


class Supervisor:
    """One supervised ``ollama serve`` on 127.0.0.1:``port``: ``start()``, then ``stop()`` at shutdown."""

    def __init__(
        self,
        binary: str,
        port: int,
        data_dir: str | os.PathLike,
        environ: Mapping[str, str],
        first_backoff: float = FIRST_BACKOFF_SECONDS,
        ready_timeout: float = READY_TIMEOUT_SECONDS,
    ) -> None:
        self.binary, self.port = binary, port
        self.log_path = Path(data_dir) / "ollama.log"
        self.state_path = state_path(data_dir)
        self.environ = {**environ, "OLLAMA_HOST": f"127.0.0.1:{port}"}  # loopback only, whatever the caller had
        self.first_backoff, self.ready_timeout = first_backoff, ready_timeout
        self.restarts, self.last_exit_code, self.state = 0, None, "stopped"
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the child we started, while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start Ollama and wait until it answers; use an Ollama already there; raise SupervisorError otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if is_listening(self.port):
            self._adopt_or_refuse()
            return
        self._spawn()
        if not self._wait_ready():
            self.stop()
            raise SupervisorError(f"ollama serve did not answer on 127.0.0.1:{self.port}; {self._log_tail()}")
        self._watcher = threading.Thread(target=self._watch, name="ollama-supervisor", daemon=True)
        self._watcher.start()

    def _adopt_or_refuse(self) -> None:
        version = ollama_version(self.port)
        holder = port_holder(self.port)
        if version is None:
            raise SupervisorError(
                f"port {self.port} (the upstream port) is held by {holder}, which is not an Ollama. It was not "
                "started by the proxy, so it is left alone. Stop it, or choose another port with "
                "OLLAMA_PROXY_UPSTREAM=http://127.0.0.1:<free port>."
            )
        log.warning("Ollama %s is already serving on 127.0.0.1:%d (%s); using it without supervising it",
                    version, self.port, holder)  # fmt: skip
        self._set_state("external")

    def _spawn(self) -> None:
        """Start the child with its output appended to the log file (caller holds no lock)."""
        with open(self.log_path, "ab") as output:
            output.write(f"\n--- {_now()} starting {self.binary} serve on 127.0.0.1:{self.port}\n".encode())
            output.flush()
            self._process = subprocess.Popen(
                [self.binary, "serve"], env=self.environ, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, **detach_options(),
            )  # fmt: skip
        self._started_at = time.monotonic()
        log.info("started ollama serve (pid %d) on 127.0.0.1:%d, output in %s", self._process.pid, self.port,
                 self.log_path)  # fmt: skip
        self._set_state("starting")

    def _wait_ready(self) -> bool:
        """Poll until the child answers (state 'running'); False if it exits, we stop, or time runs out."""
        deadline = time.monotonic() + self.ready_timeout
        process = self._process
        while time.monotonic() < deadline and not self._stopping.is_set():
            if process.poll() is not None:
                return False
            if ollama_version(self.port, timeout=1.0) is not None:
                self._set_state("running")
                return True
            self._stopping.wait(POLL_SECONDS)
        return False

    def _watch(self) -> None:
        """Restart the child whenever it exits, until ``stop()``; waits grow 0.5 s, 1 s, 2 s ... 30 s."""
        failures = 0
        while True:
            code = self._process.wait()
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - self._started_at > STABLE_SECONDS else failures + 1
            delay = min(self.first_backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS)
            self.last_exit_code = code
            log.warning("ollama serve exited with code %s; restarting in %.1f s. %s", code, delay, self._log_tail())
            self._set_state("restarting")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                try:
                    self._spawn()
                except OSError as exc:  # e.g. the binary was removed: keep trying, with the backoff
                    log.error("cannot start %s: %s", self.binary, exc)
                    self._started_at = time.monotonic()  # a start that failed counts as a crash: the backoff grows
                    continue  # the old process is still the current one, so its wait() returns at once
            self._wait_ready()

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the child we started (interrupt, then kill after ``timeout``); never touches any other process."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            _interrupt(process)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ollama serve (pid %d) did not stop in %.0f s; killing it", process.pid, timeout)
                process.kill()
                process.wait()
            log.info("stopped ollama serve (pid %d)", process.pid)
        if self._watcher is not None:
            self._watcher.join(timeout)
        self._set_state("stopped")

    def health(self) -> dict:
        """The state shown in /health: running, starting, restarting, stopped or external."""
        return {
            "ok": self.state in ("running", "external"), "state": self.state, "pid": self.pid,
            "upstream": f"127.0.0.1:{self.port}", "restarts": self.restarts, "last_exit_code": self.last_exit_code,
            "log": str(self.log_path), "supervisor_pid": os.getpid(),
        }  # fmt: skip

    def _set_state(self, state: str) -> None:
        self.state = state
        document = self.health()
        document.pop("ok")
        temporary = self.state_path.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(document))
            os.replace(temporary, self.state_path)  # readers never see half a file
        except OSError:
            log.exception("cannot save the supervisor state to %s", self.state_path)

    def _log_tail(self, lines: int = 5) -> str:
        """The last lines Ollama wrote, for error messages."""
        try:
            with open(self.log_path, "rb") as output:
                output.seek(max(output.seek(0, os.SEEK_END) - 4096, 0))
                tail = output.read().decode(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return f"See {self.log_path}."
        return f"Last output ({self.log_path}): " + " | ".join(tail)


def detach_options() -> dict:
    """Popen options that keep a terminal's Ctrl-C away from a child, so that we decide when it stops."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _interrupt(process: subprocess.Popen) -> None:
    """Ask our child to shut down cleanly: SIGTERM, or CTRL_BREAK (its process group) on Windows."""
    if sys.platform == "win32":
        process.send_signal(signal.CTRL_BREAK_EVENT)
    else:
        process.terminate()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
