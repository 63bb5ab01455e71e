"""gunicorn settings for the proxy: ``gunicorn -c python:proxy_app.service.gunicorn_conf 'proxy_app:create_app()'``.

Each worker is a FrontWorker (worker.py): waitress's event loop reads whole requests, so a slow or silent client holds
a socket rather than a thread, with a per-address cap and header and body deadlines (front.py). A call in progress
holds one of THREADS threads, and no setting here can cut a long generation: the worker ``timeout`` is a heartbeat
between the worker and the arbiter, not a limit on a request (wsgi-stack.md 2.1). Bind address, workers and threads
come from the same OLLAMA_PROXY_* settings as everything else.
"""

import os
import re
from pathlib import Path

from proxy_app import config as _config
from proxy_app.service import heap as _heap
from proxy_app.service import metrics_dir as _metrics_dirs

_settings = _config.load()
_heap.cap_arenas()  # in the arbiter, before any worker is forked: each worker starts with the cap (heap.py)

# Prometheus multiprocess mode (wsgi-stack.md rule 11). prometheus_client chooses file-backed values when it is first
# imported, so the variable is set here, in the arbiter, before any worker loads the app. A directory exported by the
# launcher wins (on_starting empties it); otherwise each run makes its own on a tmpfs, off the data disk, whose
# filling would kill the workers (metrics_dir.py), and on_exit removes it. child_exit marks dead workers.
_launcher_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _launcher_metrics_dir:
    _metrics_dir = Path(_launcher_metrics_dir)
    _metrics_dir.mkdir(parents=True, exist_ok=True)
else:
    _metrics_dir = _metrics_dirs.create_run_dir(os.environ, _settings["DATA_DIR"])
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
_METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")  # prometheus_client's names only

from proxy_app.relay import drain as _drain  # noqa: E402  (only now: the app's modules may import prometheus_client)
from proxy_app.service import front as _front  # noqa: E402

bind = f"{_settings['HOST']}:{_settings['PORT']}"
worker_class = "proxy_app.service.worker.FrontWorker"
workers = _settings["WORKERS"]
threads = _settings["THREADS"]
worker_connections = _front.POSIX_CONNECTION_LIMIT  # per worker; every stream is one, idle keep-alive ones too
timeout = 120  # heartbeat only: the worker's loop turns every second whatever its threads do
# On SIGTERM streams may finish for GRACE_SECONDS; then each worker cuts the rest itself (post_worker_init) and
# stores their rows (worker_exit) before the arbiter's hard kill at graceful_timeout.
graceful_timeout = max(int(_settings["GRACE_SECONDS"] + _drain.SETTLE_SECONDS), 1)
keepalive = 75  # clients such as ollama-python reuse connections; keep idle ones open a while
accesslog = None


def on_starting(server):
    """Delete the last run's metric files, so its counts are not summed into this run's."""
    for path in _metrics_dir.iterdir():
        if _METRICS_FILE.fullmatch(path.name):
            path.unlink()


def on_exit(server):
    """Remove this run's metric files, unless a re-executed arbiter (USR2) goes on with them."""
    if not _launcher_metrics_dir and not server.reexec_pid:
        _metrics_dirs.remove_run_dir(_metrics_dir)


def child_exit(server, worker):
    """Drop a dead worker's live gauges (in flight, memory); its counters stay, so totals never go down."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Run the app's shutdown hooks once a worker stops serving: the writer stores every answered call first."""
    # Runs in the worker after its last request (SIGTERM, HUP, max_requests), inside graceful_timeout.
    app = getattr(worker, "wsgi", None)
    if hasattr(app, "extensions"):
        from proxy_app import shutdown

        shutdown(app)


def post_worker_init(worker):
    """Arm the drain: on SIGTERM this worker lets streams run GRACE_SECONDS, then cuts them (relay/drain.py)."""
    _drain.arm(worker.wsgi)
