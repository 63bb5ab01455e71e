"""``python -m bench``: every figure of issue 7 in one run, written to bench/results/<time>-<mode>.json.

Starts the fast fake upstream (direct), nginx (the zero-cost reference) and the proxy under gunicorn and under
waitress, all with full analytics (SQLite, CSV mirror, Prometheus), then measures them interleaved. ``--quick`` is
a run of about three minutes; the default full run takes about 8, plus a 10-minute soak (``--soak-seconds``).
``python -m bench.report FILE`` prints the README table of a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench import breakdown, concurrency, keycost, load, measure, soak, targets

RESULTS = Path(__file__).resolve().parent / "results"

# Per mode: rounds and sizes of each measurement (quick about 3 min, full about 8 min before the soak).
PLANS = {
    "quick": {"latency": (3, 300), "throughput": (2, 3), "tokens": (2, 400), "streams": 1, "ttfb": (3, 100),
              "memory_calls": 10_000, "writer_rows": 20_000, "soak_seconds": 0, "breakdown_calls": 1000,
              "key_checks": 5000},
    "full": {"latency": (6, 1000), "throughput": (3, 6), "tokens": (3, 800), "streams": 2, "ttfb": (6, 200),
             "memory_calls": 100_000, "writer_rows": 100_000, "soak_seconds": 600, "breakdown_calls": 3000,
             "key_checks": 20_000},
}  # fmt: skip
SHARED_TARGETS = ("latency", "throughput", "tokens", "streams", "ttfb", "memory", "writer")  # one set of targets
FIGURES = ("latency", "throughput", "tokens", "streams", "ttfb", "memory", "writer", "breakdown", "server",
           "concurrency", "keys")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 3 minutes)")
    parser.add_argument("--soak-seconds", type=float, help="soak duration (full: 600, quick: 0 = no soak)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: serve's own WORKERS)")
    parser.add_argument("--threads", type=int, help="threads per proxy process (default: serve's own THREADS)")
    parser.add_argument("--only", help="comma-separated, from: " + ",".join(FIGURES))
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<time>-<mode>.json)")
    args = parser.parse_args(argv)
    args.workers, args.threads = args.workers or targets.SERVE_WORKERS, args.threads or targets.SERVE_THREADS
    return args


def start_all(work: Path, workers: int, threads: int) -> list[targets.Target]:
    """direct, nginx, gunicorn, waitress: in that order (direct first, the figures' reference)."""
    upstream = targets.start_upstream()
    started = [upstream]
    try:
        started.append(targets.start_nginx(upstream, work))
        started.append(targets.start_proxy("gunicorn", upstream, work, threads, workers))
        started.append(targets.start_proxy("waitress", upstream, work, threads))
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(started: list[targets.Target]) -> None:
    for target in reversed(started):
        target.stop()


def run(args: argparse.Namespace) -> dict:
    """Run the chosen measurements and return the results document."""
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    wanted = set(args.only.split(",") if args.only else FIGURES)
    soak_seconds = plan["soak_seconds"] if args.soak_seconds is None else args.soak_seconds
    document = {"mode": mode, "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                "code": code_version(),
                "settings": {"gunicorn_workers": args.workers, "threads": args.threads, "generator": load.WRK or
                             "python (wrk not found)"}, "figures": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="ollama-proxy-bench-"))
    started = start_all(work, args.workers, args.threads) if wanted & set(SHARED_TARGETS) else []
    everyone, proxies = started, [t for t in started if t.name in ("gunicorn", "waitress")]
    figures = document["figures"]
    try:
        if everyone:
            step("idle memory", lambda: figures.__setitem__("idle_memory", measure.idle_memory(everyone)))
        if "latency" in wanted:
            step("latency c1", lambda: figures.__setitem__(
                "latency_c1", measure.latency_c1(everyone, *plan["latency"])))  # fmt: skip
        if "ttfb" in wanted:
            step("ttfb", lambda: figures.__setitem__("ttfb", measure.ttfb(everyone, *plan["ttfb"])))
        if "throughput" in wanted:
            rounds, seconds = plan["throughput"]
            for connections in (8, 64):
                step(f"throughput c{connections}", lambda c=connections: figures.__setitem__(
                    f"throughput_c{c}", measure.throughput(everyone, rounds, seconds, c)))  # fmt: skip
        if "tokens" in wanted:
            rounds, streams = plan["tokens"]
            step("cpu per token", lambda: figures.__setitem__(
                "cpu_per_token", measure.cpu_per_token(everyone[1:], rounds, streams)))  # fmt: skip
        if "streams" in wanted:
            step("256 streams", lambda: figures.__setitem__(
                "streams_256", measure.many_streams(everyone, plan["streams"])))  # fmt: skip
        if "memory" in wanted:
            step("memory after calls", lambda: figures.__setitem__(
                "memory_growth", measure.memory_growth(proxies, plan["memory_calls"], 4)))  # fmt: skip
        if "writer" in wanted:
            step("writer rows/s", lambda: figures.__setitem__("writer", measure.writer_rows(plan["writer_rows"])))
    finally:
        stop_all(started)
    if proxies:
        document["rows_stored"] = {t.name: soak.count_rows(t.data_dir) for t in proxies}  # after SIGTERM's flush
    if "concurrency" in wanted:  # its own targets: serve with default settings
        step("1,000 streams and slow clients", lambda: figures.update(concurrency.run(work, plan["streams"] + 1)))
    if "server" in wanted:
        step("servers alone", lambda: figures.__setitem__("server_only", servers_alone(plan)))
    if "breakdown" in wanted:
        step("in-process breakdown", lambda: figures.__setitem__("breakdown", breakdown.run(plan["breakdown_calls"])))
    if "keys" in wanted:
        step("API key cost", lambda: figures.__setitem__("keys", keycost.run(plan["key_checks"])))
    if soak_seconds:
        step(f"soak {soak_seconds:g} s", lambda: document.__setitem__(
            "soak", soak.run_soak(work, soak_seconds, args.workers, args.threads)))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    document["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    document["machine"]["load_average_at_end"] = [round(value, 1) for value in os.getloadavg()]
    return document


def servers_alone(plan: dict) -> dict:
    """gunicorn and waitress serving bench/hello.py, with a fresh direct upstream as the latency reference."""
    upstream = targets.start_upstream()
    servers = [upstream, targets.start_hello("gunicorn"), targets.start_hello("waitress")]
    try:
        rounds, calls = plan["latency"]
        return measure.server_only(servers, rounds, calls, plan["throughput"][1])
    finally:
        stop_all(servers)


def step(label: str, action) -> None:
    started = time.perf_counter()
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    action()
    print(f"[bench] {label}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def code_version(checkout: Path = targets.ROOT) -> str:
    """The commit of ``checkout`` measured, with "+changes" when its work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict:
    return {"cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "load_average_at_start": [round(value, 1) for value in os.getloadavg()]}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    document = run(args)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"{stamp}-{document['mode']}.json"
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written to {output}", file=sys.stderr)
    from .report import table

    print(table(document))


if __name__ == "__main__":
    main()
