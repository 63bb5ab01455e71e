"""The soak: 64 concurrent clients mixing streams and short calls through the proxy under gunicorn for a while.

Reports how long it ran, calls and errors, rows stored versus calls sent (after a SIGTERM, which flushes the
writer), and every ``SAMPLE_SECONDS`` the serving processes' resident memory and the writer's queue depth and drops
(from ``/metrics``); the proxy's warnings are kept in the result, so a lost row comes with its reason. Run it
alone with ``python -m bench.soak --seconds 1800`` (30 minutes), or via ``python -m bench --soak-seconds N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sqlite3
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import client, targets

CLIENTS = 64
STREAM_SHARE = 0.25  # a quarter of the calls stream 20 tokens at 10 ms each; the rest are short stream:false calls
SAMPLE_SECONDS = 10.0
MB = 1024 * 1024
WRITER_METRICS = re.compile(rb"^ollama_analytics_(queue_depth|rows_dropped_total|rows_written_total) (\S+)$", re.M)
KEPT_LOG_LINES = 50


def writer_figures(url: str) -> dict:
    """The writer's queue depth, rows written and rows dropped, summed over the workers, from ``/metrics``."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
            text = reply.read()
    except OSError as exc:
        return {"error": repr(exc)}
    return {name.decode(): int(float(value)) for name, value in WRITER_METRICS.findall(text)}


def warnings_in(data_dir: Path | None) -> list[str]:
    """The first warnings and errors the proxy logged (drop reasons among them)."""
    path = data_dir / "serve.log" if data_dir else None
    if path is None or not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if "WARNING" in line or "ERROR" in line][:KEPT_LOG_LINES]


def count_rows(data_dir: Path | None) -> int | None:
    """Rows in a stopped proxy's SQLite store (None when there is none)."""
    path = data_dir / "ollama-proxy.db" if data_dir else None
    if path is None or not path.exists():
        return None
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


async def _clients(url: str, seconds: float, tally: dict) -> None:
    deadline = time.monotonic() + seconds
    short, streamed = client.generate_body(False), client.generate_body(True)

    async def one(seed: int) -> None:
        rng, connection = random.Random(seed), client.Connection(url)
        while time.monotonic() < deadline:
            is_stream = rng.random() < STREAM_SHARE
            tokens = 20 if is_stream else 5
            headers = client.knobs(tokens, 0.01 if is_stream else 0.0)
            tally["sent"] += 1
            try:
                reply = await connection.request("POST", client.GENERATE, streamed if is_stream else short, headers)
            except (OSError, asyncio.IncompleteReadError) as exc:
                tally["errors"] += 1
                tally["last_error"] = repr(exc)
                continue
            ok = client.is_complete(reply, tokens if is_stream else None)
            tally["streams" if is_stream else "short"] += 1
            tally["errors"] += not ok
        await connection.close()

    await asyncio.gather(*(one(seed) for seed in range(CLIENTS)))


def run_soak(work: Path, seconds: float, workers: int, threads: int, settings: dict | None = None) -> dict:
    """Soak a fresh gunicorn proxy for ``seconds``; return the tally, rows stored and the memory trend."""
    upstream = targets.start_upstream()
    proxy = targets.start_proxy("gunicorn", upstream, work, threads, workers, extra_env=settings)
    tally = {"sent": 0, "short": 0, "streams": 0, "errors": 0, "last_error": None}
    samples: list[dict] = []
    try:
        started = time.monotonic()

        async def main() -> None:
            async def sample() -> None:
                while True:
                    workers = proxy.workers()
                    rss = [round(proc.memory_info().rss / MB, 1) for proc in workers]
                    threads = [proc.num_threads() for proc in workers]  # gthread starts threads as calls need them
                    writer = await asyncio.to_thread(writer_figures, proxy.url)
                    samples.append({"seconds": round(time.monotonic() - started), "rss_process_mb": rss,
                                    "threads": threads, **writer})  # fmt: skip
                    await asyncio.sleep(SAMPLE_SECONDS)

            sampler = asyncio.create_task(sample())
            await _clients(proxy.url, seconds, tally)
            sampler.cancel()

        asyncio.run(main())
        duration = time.monotonic() - started
        last = [round(size / MB, 1) for size in proxy.worker_rss_bytes()]
        samples.append({"seconds": round(duration), "rss_process_mb": last})
    finally:
        proxy.stop()
        upstream.stop()
    rows = count_rows(proxy.data_dir)
    return {**tally, "seconds": round(duration, 1), "clients": CLIENTS, "calls_per_second": tally["sent"] / duration,
            "rows": rows, "rows_equal_calls": rows == tally["sent"], "memory": samples,
            "log": warnings_in(proxy.data_dir)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--workers", type=int, default=targets.SERVE_WORKERS)
    parser.add_argument("--threads", type=int, default=targets.SERVE_THREADS)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a proxy setting for this soak, e.g. --set OLLAMA_PROXY_CSV_MAX_BYTES=10000000",
    )
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="ollama-proxy-soak-") as work:
        print(json.dumps(run_soak(Path(work), args.seconds, args.workers, args.threads, settings), indent=2))


if __name__ == "__main__":
    main()
