"""Time the dashboard on a big SQLite store: ``python -m bench.dashboard_bench [--rows 1000000] [--store PATH]``.

Fills the store with ``bench.make_store`` and builds the read model. Then, for each server (gunicorn with one
gthread worker as deploy/ runs it, and waitress), starts the proxy in a separate process and times over HTTP: the
page's first render and later renders for 7 days, /analytics/stats for 7 days, /analytics/search with text queries
(common, rare, very common), and the CSV export of every row (rows/s, and the server's peak memory meanwhile).
Writes bench/results/dashboard.json and prints a summary. It does not touch the proxy's own data or settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests

from bench.make_store import fill
from bench.targets import free_port
from proxy_app.dashboard import readmodel
from proxy_app.store import models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "dashboard.json"
TARGETS = {"page_ms": 500, "stats_ms": 500, "search_ms": 300, "export_rows_per_second": 50_000}
SEARCHES = {"common (1 in 100 rows)": "invoice", "rare (1 in 10,000)": "zanzibar", "very common (1 in 7)": "summarise"}


def count_rows(path: Path) -> int:
    """Rows in the store at ``path`` (0 when there is no store)."""
    if not path.exists():
        return 0
    db = models.open_database(f"sqlite:///{path}")
    try:
        return db.execute_sql("SELECT count(*) FROM calls").fetchone()[0]
    finally:
        db.close()


def build_read_model(path: Path) -> float:
    """Fold every row into the rollup and the text index (what the refresher does in the background)."""
    db = models.open_database(f"sqlite:///{path}")
    started = time.perf_counter()
    readmodel.ensure_read_model(db)
    while readmodel.catch_up(db):
        pass
    db.close()
    return time.perf_counter() - started


def start_server(server: str, path: Path, data_dir: str) -> tuple[subprocess.Popen, str]:
    """The proxy under gunicorn (one gthread worker, deploy/gunicorn.conf.py) or waitress, in its own process,
    reading the store at ``path``; return the process and its URL."""
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_PROXY_DATABASE_URL": f"sqlite:///{path}",
        "OLLAMA_PROXY_DATA_DIR": data_dir,
        "OLLAMA_PROXY_RETENTION_DAYS": "0",
        "OLLAMA_PROXY_LOG_LEVEL": "WARNING",
        "OLLAMA_PROXY_PORT": str(port),
        "OLLAMA_PROXY_WORKERS": "1",
        "OLLAMA_PROXY_THREADS": "8",
        "OLLAMA_PROXY_UPSTREAM": "http://127.0.0.1:9",
    }
    if server == "gunicorn":
        command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
    else:
        command = [
            sys.executable,
            "-m",
            "waitress",
            f"--listen=127.0.0.1:{port}",
            "--threads=8",
            "--call",
            "proxy_app:create_app",
        ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/analytics/static/dashboard.js", timeout=5).raise_for_status()
            return process, url
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the proxy did not start under {server}")


def serving_process(process: subprocess.Popen) -> psutil.Process:
    """The process that answers: gunicorn's worker, or waitress itself."""
    parent = psutil.Process(process.pid)
    return (parent.children() or [parent])[0]


def timed(session: requests.Session, url: str) -> float:
    """Milliseconds for one GET, body included; fail on anything but 200."""
    started = time.perf_counter()
    answer = session.get(url, timeout=60)
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000


def series(session: requests.Session, url: str, repeat: int) -> dict:
    """The first time and the median of ``repeat`` more."""
    first = timed(session, url)
    later = [timed(session, url) for _ in range(repeat)]
    return {
        "first_ms": round(first, 1),
        "median_ms": round(statistics.median(later), 1),
        "max_ms": round(max(later), 1),
    }


def time_export(session: requests.Session, url: str, server: psutil.Process) -> dict:
    """Stream the whole export; return rows, rows/s and the server's memory before and at its peak."""
    before = server.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak.append(server.memory_info().rss)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started, lines, size = time.perf_counter(), 0, 0
    with session.get(url, stream=True, timeout=600) as answer:
        answer.raise_for_status()
        for piece in answer.iter_content(1 << 20):
            lines += piece.count(b"\r\n")
            size += len(piece)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    rows = lines - 1  # the header; the generated rows hold no line breaks
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "bytes": size,
        "server_rss_before_mb": round(before / 2**20, 1),
        "server_rss_peak_mb": round(max(peak) / 2**20, 1),
    }


def measure(url: str, server: psutil.Process, repeat: int) -> dict:
    """Every timing, over HTTP with one keep-alive session."""
    with requests.Session() as session:
        figures = {"page_7d": series(session, url + "/analytics?since=7d", repeat)}
        figures["stats_7d"] = series(session, url + "/analytics/stats?since=7d", repeat)
        figures["page_24h"] = series(session, url + "/analytics?since=24h", repeat)
        figures["search_7d_no_text"] = series(session, url + "/analytics/search?since=7d", repeat)
        for label, text in SEARCHES.items():
            figures[f"search_7d_q={text}"] = {
                "kind": label,
                **series(session, f"{url}/analytics/search?since=7d&q={text}", repeat),
            }
        figures["stats_7d_q=invoice"] = series(session, url + "/analytics/stats?since=7d&q=invoice", repeat)
        figures["stats_7d_model"] = series(session, url + "/analytics/stats?since=7d&model=gemma2:9b", repeat)
        figures["stats_7d_client"] = series(session, url + "/analytics/stats?since=7d&client=10.0.1.12", repeat)
        figures["export_all"] = time_export(session, url + "/analytics/export.csv?since=all", server)
        figures["calls_in_7d"] = session.get(url + "/analytics/stats?since=7d", timeout=60).json()["cards"]["calls"]
    return figures


def verdict(figures: dict) -> dict:
    """Each target and whether this run met it."""
    measured = {
        "page_ms": figures["page_7d"]["first_ms"],
        "stats_ms": figures["stats_7d"]["first_ms"],
        "search_ms": figures["search_7d_q=invoice"]["first_ms"],
        "export_rows_per_second": figures["export_all"]["rows_per_second"],
    }
    passed = {
        name: (value >= TARGETS[name] if name.endswith("second") else value < TARGETS[name])
        for name, value in measured.items()
    }
    return {"targets": TARGETS, "measured": measured, "passed": passed}


def main(argv=None) -> None:
    """Command line: --rows, --store, --reuse, --repeat, --server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "ollama-proxy-dashboard-bench.db")
    parser.add_argument("--reuse", action="store_true", help="keep an existing store that holds --rows rows")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--server", action="append", choices=("gunicorn", "waitress"), help="default: both")
    args = parser.parse_args(argv)
    document = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    if not (args.reuse and count_rows(args.store) == args.rows):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.store}{suffix}").unlink(missing_ok=True)
        document["fill_seconds"] = round(fill(args.store, args.rows), 1)
    document["read_model_build_seconds"] = round(build_read_model(args.store), 1)
    document["store_mb"] = round(args.store.stat().st_size / 2**20)
    document["servers"] = {}
    for server in args.server or ["gunicorn", "waitress"]:
        with tempfile.TemporaryDirectory() as data_dir:
            process, url = start_server(server, args.store, data_dir)
            try:
                figures = measure(url, serving_process(process), args.repeat)
            finally:
                process.terminate()
                process.wait(30)
        document["servers"][server] = {"figures": figures, **verdict(figures)}
    document["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    summary = {
        server: {"measured": found["measured"], "passed": found["passed"]}
        for server, found in document["servers"].items()
    }
    print(
        json.dumps(
            {**summary, "load_average": [document["load_average_before"], document["load_average_after"]]}, indent=2
        )
    )


if __name__ == "__main__":
    main()
