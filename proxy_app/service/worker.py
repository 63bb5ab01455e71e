"""A gunicorn worker that serves through front.py: ``worker_class = "proxy_app.service.worker.FrontWorker"``.

gunicorn keeps what it is good at (the arbiter, several workers, Prometheus multiprocess files, HUP, TERM with a
graceful timeout, replacing dead workers); each worker runs the same guarded waitress front as ``serve --server
waitress``, so a client that drips its headers or sends nothing holds a socket, never one of the THREADS threads,
and the workers share new connections evenly (balance.py). The worker's loop turns at least once a second to tell
the arbiter it is alive. It does not support TLS (terminate it in a reverse proxy) or max_requests.
"""

from __future__ import annotations

import os
import time

from gunicorn.workers.base import Worker

from proxy_app import config

from . import balance, front, guard

LOOP_SECONDS = 1.0  # longest wait for an event: how often the heartbeat and the stop flag are looked at
THREAD_STOP_SECONDS = 2.0  # after the last answer, how long the threads get to end before the process moves on
# Why: a connection accepted just before a stop (TERM, HUP) may have its request on the way; it is served, not cut.
STOP_LINGER_SECONDS = 2.0


class FrontWorker(Worker):
    """Serves the app on gunicorn's listeners with waitress's loop and threads, behind front.py's guard; takes its
    share of new connections among its peers (balance.py)."""

    table: balance.Table | None = None  # made by the arbiter at its first worker, before any fork: shared by all

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # in the arbiter, which spawns one worker at a time
        if FrontWorker.table is None:
            FrontWorker.table = balance.Table()
        self.share = balance.Share(FrontWorker.table, FrontWorker.table.claim())

    @classmethod
    def check_config(cls, cfg, log) -> None:
        """Refuse settings this worker cannot honour."""
        if cfg.is_ssl:
            raise RuntimeError("FrontWorker serves plain HTTP; terminate TLS in a reverse proxy in front of it")

    def run(self) -> None:
        """Serve until TERM (or the arbiter goes), then stop accepting and let the answers in progress finish."""
        settings = _settings_of(self.wsgi)
        options = front.connection_options(self.cfg.threads, self.cfg.worker_connections)
        self.front = front.Front(self.wsgi, guard.Limits.from_settings(settings),
                                 sockets=[listener.sock for listener in self.sockets], threads=self.cfg.threads,
                                 backlog=self.cfg.backlog, channel_timeout=max(int(self.cfg.keepalive), 1),
                                 share=self.share, **options)  # fmt: skip
        if hasattr(self.wsgi, "extensions"):  # the proxy's app: start its samplers before its first call
            from proxy_app import start_background

            start_background(self.wsgi)
        while self.alive:
            self.notify()
            self.front.poll(LOOP_SECONDS)
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
        self.stop_gracefully(time.monotonic() + self.cfg.graceful_timeout)

    def stop_gracefully(self, deadline: float) -> None:
        """Close the listeners; serve what is in progress until ``deadline``; then close every connection."""
        self.front.stop_accepting()
        linger = time.monotonic() + STOP_LINGER_SECONDS
        while time.monotonic() < deadline and self.front.is_busy(fresh_too=time.monotonic() < linger):
            self.notify()  # the drain cuts streams before the deadline
            self.front.poll(0.1)
        self.front.close_connections()
        self.front.task_dispatcher.shutdown(timeout=THREAD_STOP_SECONDS)


def _settings_of(app) -> dict:
    """The proxy's settings: the app's own config when it is our app, else the environment's."""
    app_config = getattr(app, "config", {})
    return app_config if "MAX_CONNECTIONS_PER_CLIENT" in app_config else config.load()
