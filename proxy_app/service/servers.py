"""Run the proxy as a long-lived service: waitress in this process, or gunicorn as a child process, optionally with
a supervised ``ollama serve`` behind it, and the shutdown order a service needs.

On SIGTERM (or the Windows service's stop): stop accepting, let in-flight streams finish for GRACE_SECONDS and cut
the rest (drain.py), flush the analytics store (``proxy_app.shutdown``), and stop the supervised Ollama last.
Used by ``python -m proxy_app serve`` and deploy/windows; it parses no command line and reads no environment.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from proxy_app import config as config_module
from proxy_app.access import is_loopback
from proxy_app.settings import PREFIX
from proxy_app.state import state_of

from . import heap
from .supervisor import (
    Supervisor,
    SupervisorError,
    detach_options,
    find_ollama,
    get_json,
    is_listening,
    ollama_version,
    port_holder,
)

log = logging.getLogger(__name__)

GUNICORN_CONF = "python:proxy_app.service.gunicorn_conf"  # the settings ship in the package
# The folder that holds the proxy_app package (site-packages, or a checkout), for children started from elsewhere.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
WAITRESS_CHANNEL_TIMEOUT = 300  # idle keep-alive connections only: waitress never cuts a running request
THREAD_STOP_SECONDS = 2.0  # after the drain, how long waitress's threads get before the process moves on
START_TIMEOUT_SECONDS = 90.0  # a background `serve` may first have to start Ollama (READY_TIMEOUT is 60 s)


class ServiceError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


def choose_server(setting: str, platform: str = sys.platform) -> str:
    """Return 'gunicorn' or 'waitress' for the SERVER setting: auto means gunicorn except on Windows."""
    if setting != "auto":
        return setting
    return "waitress" if platform == "win32" else "gunicorn"


def as_environ(overrides: Mapping) -> dict[str, str]:
    """Turn setting overrides into OLLAMA_PROXY_* variables, so a child process sees the same settings."""

    def text(value) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)

    return {PREFIX + name: text(value) for name, value in overrides.items()}


def check_proxy_port(host: str, port: int) -> None:
    """Raise ServiceError naming the holder when the proxy's own port is taken (typically by Ollama itself)."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
    if port == 0 or not is_listening(port, probe):
        return
    raise ServiceError(
        f"port {port} is already held by {port_holder(port)}. If that is Ollama, move it behind the proxy "
        "(OLLAMA_HOST=127.0.0.1:11435 ollama serve; for its Linux service see deploy/systemd/ollama.service.d/) "
        "or stop it and use `serve --with-ollama`; otherwise pick another port with --port."
    )


def start_supervisor(settings: Mapping, environ: Mapping[str, str]) -> Supervisor | None:
    """Start and return the Ollama supervisor when WITH_OLLAMA is on; None otherwise."""
    if not settings["WITH_OLLAMA"]:
        return None
    upstream = urlsplit(settings["UPSTREAM"])
    if not is_loopback(upstream.hostname or ""):
        raise ServiceError(f"--with-ollama runs Ollama on this machine, so OLLAMA_PROXY_UPSTREAM must be a loopback "
                           f"address such as http://127.0.0.1:11435, not {settings['UPSTREAM']}")  # fmt: skip
    binary = find_ollama(settings["OLLAMA_BIN"])
    if binary is None:
        where = settings["OLLAMA_BIN"] or "on PATH or in the usual install places"
        raise ServiceError(f"cannot find the ollama executable {where}; install Ollama or set OLLAMA_PROXY_OLLAMA_BIN")
    supervisor = Supervisor(binary, upstream.port or 80, settings["DATA_DIR"], environ)
    try:
        supervisor.start()
    except SupervisorError as exc:
        raise ServiceError(str(exc)) from None
    return supervisor


def serve(settings: Mapping, overrides: Mapping, on_start=None) -> int:
    """Run the proxy (and Ollama, if asked) until SIGTERM or Ctrl-C; return the exit code.

    ``on_start``, when given, receives the WaitressService instead of signal handlers being installed: the Windows
    service stops it from its own thread.
    """
    logging.basicConfig(level=settings["LOG_LEVEL"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    heap.cap_arenas()  # before any thread starts: the supervisor's, the app's, waitress's (gunicorn's arbiter: its own)
    check_proxy_port(settings["HOST"], settings["PORT"])
    environ = config_module.child_environ(as_environ(overrides))
    supervisor = start_supervisor(settings, environ)
    try:
        if choose_server(settings["SERVER"]) == "gunicorn":
            return run_gunicorn(environ)
        from proxy_app import create_app

        service = WaitressService(create_app(dict(overrides)))
        if on_start is None:
            service.handle_signals()
        else:
            on_start(service)
        service.serve_forever()
        return 0
    finally:
        if supervisor is not None:
            supervisor.stop()  # last: the drained streams needed it until now


def run_gunicorn(environ: Mapping[str, str]) -> int:
    """Run gunicorn with the packaged settings as a child; pass it our signals; return its exit code."""
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, "--pythonpath", str(PACKAGE_PARENT)]
    command.append("proxy_app:create_app()")
    child = subprocess.Popen(command, env=dict(environ))

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)  # TERM drains (graceful_timeout), INT/QUIT stop at once, HUP reloads

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    return child.wait()


class WaitressService:
    """The proxy under waitress in this process. ``stop()`` may be called from any thread or a signal handler."""

    def __init__(self, app) -> None:
        from . import front, guard  # waitress's server, guarded against slow clients and per-address floods

        config = app.config
        self.app = app
        self.front = front.Front(app, guard.Limits.from_settings(config), host=config["HOST"], port=config["PORT"],
                                 threads=config["THREADS"], channel_timeout=WAITRESS_CHANNEL_TIMEOUT,
                                 **front.connection_options(config["THREADS"]))  # fmt: skip
        self.server = self.front.server
        self.url = f"http://{self.server.effective_host}:{self.server.effective_port}"
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._drainer = threading.Thread(target=self._drain, name="waitress-drain", daemon=True)

    def handle_signals(self) -> None:
        """Make SIGTERM and Ctrl-C stop gracefully; a second one cuts the streams at once."""
        signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGBREAK] if sys.platform == "win32" else [])
        for signum in signals:
            signal.signal(signum, lambda signum, frame: self.stop())

    def serve_forever(self) -> None:
        """Serve until ``stop()`` has drained the calls; then flush the store (Ollama is the caller's)."""
        log.info("ollama-proxy (waitress) listening on %s, relaying to %s", self.url, self.app.config["UPSTREAM"])
        from proxy_app import start_background

        start_background(self.app)
        try:
            self.server.run()  # returns once the drain has closed every socket
        finally:
            if self._drainer.is_alive():
                self._drainer.join()  # it is at most finishing the pull that queued the last close
            self._stop_threads()
            from proxy_app import shutdown

            shutdown(self.app)
            self._close_trigger()
            self._stopped.set()

    def stop(self, wait: float | None = None) -> bool:
        """Start the graceful stop (once; a second call cuts streams now); optionally wait for it to finish."""
        if self._stopping.is_set():
            state_of(self.app).drain.cut()
        else:
            self._stopping.set()
            self._drainer.start()
        return self._stopped.wait(wait) if wait else False

    def _drain(self) -> None:
        log.info("stopping: no new connections; waiting up to %g s for %d call(s) in flight",
                 self.app.config["GRACE_SECONDS"], state_of(self.app).in_flight.count)  # fmt: skip
        self._in_loop(self._close_listener)
        left = state_of(self.app).drain.run()
        if left:
            log.warning("%d call(s) still open after the cut; closing their connections", left)
        self._in_loop(self._close_connections)  # empties the loop's map, so server.run() returns

    # ---- waitress's parts ------------------------------------------------------------------------------------------
    # waitress has no public way to stop a server gracefully (create_server() gives run() and close(), and close()
    # shuts the listener and the trigger at once), so the stop uses the server's own parts, as waitress's sibling
    # webtest does: the trigger (runs a function on the loop thread, which owns the sockets), the front's acceptors
    # (which hold the listener), the open connections in active_channels, and the task dispatcher. Only these methods
    # touch them.

    def _in_loop(self, action) -> None:
        """Run ``action`` on waitress's own loop thread, which owns the sockets."""
        self.server.trigger.pull_trigger(action)

    def _close_listener(self) -> None:
        """On the loop thread: stop accepting, and close each connection after its next answer (the front's own stop;
        the server's close() would close the trigger too, which stays open for the pulls still to come)."""
        self.front.stop_accepting()

    def _close_connections(self) -> None:
        """On the loop thread: close every connection and take the trigger out of the loop's map, still open."""
        for channel in list(self.server.active_channels.values()):
            channel.close()
        self.server.trigger.del_channel()

    def _stop_threads(self) -> None:
        self.server.task_dispatcher.shutdown(timeout=THREAD_STOP_SECONDS)

    def _close_trigger(self) -> None:
        """Close the trigger last, when no thread of ours still pulls it or opens files: waitress closes the pipe's
        read end twice, and a closing function on the loop could otherwise run before the pull that queued it."""
        self.server.trigger.close()


def client_address(host: str, port: int) -> str:
    """The host:port a client on this machine uses to reach the proxy (a wildcard listen address means loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_proxy(address: str, timeout: float = 2.0) -> bool:
    """True when our proxy answers /health at ``address`` (a plain Ollama there answers 404)."""
    host, _, port = address.rpartition(":")
    return get_json(int(port), "/health", host.strip("[]"), timeout).get("proxy") == "up"


def ensure_running(settings: Mapping, timeout: float = START_TIMEOUT_SECONDS) -> str:
    """Return the proxy's address; if it is not up, start `serve` in the background (with Ollama if none answers)."""
    address = client_address(settings["HOST"], settings["PORT"])
    if is_proxy(address):
        return address
    check_proxy_port(settings["HOST"], settings["PORT"])
    command = [sys.executable, "-m", "proxy_app", "serve"]
    upstream = urlsplit(settings["UPSTREAM"])
    if is_loopback(upstream.hostname or "") and ollama_version(upstream.port or 80, upstream.hostname) is None:
        command.append("--with-ollama")
    child, log_path = _start_background(command, Path(settings["DATA_DIR"]))
    deadline = time.monotonic() + timeout
    while not is_proxy(address, timeout=1.0):
        if child.poll() is not None or time.monotonic() > deadline:
            raise ServiceError(f"the proxy did not start (exit code {child.poll()}); see {log_path}")
        time.sleep(0.1)
    print(f"started the proxy in the background: pid {child.pid}, log {log_path}; stop it with `kill {child.pid}`",
          file=sys.stderr)  # fmt: skip
    return address


def _start_background(command: list[str], data_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``command`` detached from this terminal, its output appended to DATA_DIR/proxy.log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "proxy.log"
    environ = config_module.child_environ()
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), environ.get("PYTHONPATH")]))
    with open(log_path, "ab") as output:
        child = subprocess.Popen(command, env=environ, stdin=subprocess.DEVNULL, stdout=output,
                                 stderr=subprocess.STDOUT, **detach_options())  # fmt: skip
    return child, log_path
