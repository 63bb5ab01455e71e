r"""The proxy as a native Windows service (pywin32): the same app under waitress, stopped gracefully by Windows.

Run from an administrator prompt, with the project's virtualenv (install.ps1 does all of it):

    .venv\Scripts\python deploy\windows\ollama_proxy_service.py --startup auto install   (also: restart on failure)
    .venv\Scripts\python deploy\windows\ollama_proxy_service.py start | stop | remove | debug

The service runs in the project directory, so settings come from the system environment and the .env file there.
Its log is DATA_DIR\service.log (rotated); Ollama's own output, when supervised (WITH_OLLAMA), is DATA_DIR\ollama.log.
A stop drains like SIGTERM on Linux: no new connections, streams finish for GRACE_SECONDS, the store is flushed,
the supervised Ollama is stopped last. The helpers above the service class need no pywin32 (tested on Linux).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the service host (pythonservice.exe) starts with neither our cwd nor our path

SERVICE_NAME = "OllamaProxy"
DISPLAY_NAME = "Ollama analytics proxy"
DESCRIPTION = "Relays Ollama's API on 127.0.0.1:11434 and records every call (tokens, timings, errors)."
RESTART_DELAYS_MS = (5000, 15000, 60000)  # after the 1st, 2nd and later failures
RESET_SECONDS = 86400  # a day without failure starts the count again
LOG_BYTES, LOG_FILES = 10 * 1024 * 1024, 5
STOP_MARGIN_SECONDS = 15  # on top of the grace and settle time: flushing the store, stopping Ollama


def recovery_commands(name: str = SERVICE_NAME) -> list[list[str]]:
    """The sc.exe commands that make Windows restart the service after a crash or an error exit."""
    actions = "/".join(f"restart/{delay}" for delay in RESTART_DELAYS_MS)
    return [
        ["sc.exe", "failure", name, "reset=", str(RESET_SECONDS), "actions=", actions],
        ["sc.exe", "failureflag", name, "1"],  # a stop with an error code counts as a failure too
    ]


def log_to_data_dir(data_dir: str) -> Path:
    """Send this process's logging to DATA_DIR/service.log (rotated) and return the path; a service has no console."""
    path = Path(data_dir) / "service.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_FILES, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


def run_until_stopped(on_start) -> int:
    """Serve under waitress in this thread until the service is stopped; ``on_start`` gets the WaitressService."""
    from proxy_app import config
    from proxy_app.service import servers

    os.chdir(ROOT)  # .env and a relative DATA_DIR mean the project directory, as for `python -m proxy_app serve`
    overrides = {"SERVER": "waitress"}
    settings = config.merge(overrides)
    logging.getLogger().setLevel(settings["LOG_LEVEL"])
    log_to_data_dir(settings["DATA_DIR"])
    return servers.serve(settings, overrides, on_start=on_start)


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import servicemanager
    import win32service
    import win32serviceutil

    class OllamaProxyService(win32serviceutil.ServiceFramework):
        """The Windows service: SvcDoRun serves, SvcStop drains."""

        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args):
            super().__init__(args)
            self._server = None
            self._stop_requested = threading.Event()
            self._lock = threading.Lock()

        def SvcDoRun(self):
            servicemanager.LogInfoMsg(f"{SERVICE_NAME}: starting")
            code = run_until_stopped(self._started)
            if code:  # an error exit: Windows then applies the recovery actions
                raise SystemExit(code)

        def _started(self, server):
            with self._lock:
                self._server = server
                if self._stop_requested.is_set():
                    server.stop()

        def SvcStop(self):
            from proxy_app.relay.drain import SETTLE_SECONDS

            with self._lock:
                self._stop_requested.set()
                server = self._server
            grace = server.app.config["GRACE_SECONDS"] if server is not None else 0
            wait_hint_ms = int((grace + SETTLE_SECONDS + STOP_MARGIN_SECONDS) * 1000)
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=wait_hint_ms)
            if server is not None:
                server.stop()

        SvcShutdown = SvcStop

    def _set_recovery(options) -> None:
        for command in recovery_commands():
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    if __name__ == "__main__":
        sys.exit(win32serviceutil.HandleCommandLine(OllamaProxyService, customOptionHandler=_set_recovery))
elif __name__ == "__main__":
    sys.exit("This is the Windows service; on Linux use deploy/systemd/ollama-proxy.service.")
