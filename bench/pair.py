"""This checkout against another one, both served by ``serve`` (on its default settings unless told) and loaded in
alternation.

Both proxies run at once in front of one fast fake upstream. Each slice loads one and then the other (the order
swaps from slice to slice) with CONNECTIONS keep-alive clients making non-streaming calls for SECONDS, so a noisy
moment of a shared machine falls on both. Reported for each: calls per second and the serving processes' CPU per call
in each slice (and their medians), and the largest serving process's resident memory after each slice, so memory
that grows with calls shows as it accumulates.

Run alone: ``python -m bench.pair OTHER_CHECKOUT [--this CHECKOUT] [--server waitress] [--workers N --threads N]``,
where OTHER_CHECKOUT is a source tree of the proxy, e.g. made by ``git worktree add /tmp/other COMMIT``, and
``--this`` puts another tree in this checkout's place (two earlier commits compared); both run with this checkout's
virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import client, load, targets
from bench.measure import MB, rotations

SLICES, SECONDS, CONNECTIONS = 8, 6.0, 64


def run(
    other: Path,
    server: str,
    slices: int = SLICES,
    seconds: float = SECONDS,
    connections: int = CONNECTIONS,
    workers: int | None = None,
    threads: int | None = None,
    this: Path = targets.ROOT,
) -> dict:
    """Slices of load on both proxies, alternating; per proxy: each slice's figures and the medians. ``workers`` and
    ``threads`` None leave those settings at each checkout's own defaults."""
    upstream = targets.start_upstream()
    work = Path(tempfile.mkdtemp(prefix="ollama-proxy-pair-"))
    started = []
    try:
        for checkout in (this, other):
            started.append(targets.start_proxy(server, upstream, work, threads, workers, checkout=checkout))
        for target in started:
            asyncio.run(client.sequential(target.url, 20, stream=False))  # warm up
        slices_of = {target.url: [_memory(target, 0)] for target in started}
        for _, target in rotations(started, slices):
            cpu = target.cpu_seconds()
            result = load.run_load(target.url, connections, seconds)
            rows = slices_of[target.url]
            rows.append({
                **_memory(target, rows[-1]["calls"] + result["calls"]),
                "calls_per_second": round(result["calls_per_second"]),
                "cpu_us_per_call": round((target.cpu_seconds() - cpu) / max(result["calls"], 1) * 1e6),
                "errors": result["non_2xx"] + result["socket_errors"],
            })  # fmt: skip
    finally:
        for target in started + [upstream]:
            target.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {name: _summary(slices_of[target.url]) for name, target in zip(("this", "other"), started, strict=True)}


def _memory(target, calls: int) -> dict:
    return {"calls": calls, "rss_process_mb": round(max(target.worker_rss_bytes()) / MB, 1)}


def _summary(rows: list[dict]) -> dict:
    loaded = rows[1:]
    return {
        "cpu_us_per_call_median": statistics.median(row["cpu_us_per_call"] for row in loaded),
        "calls_per_second_median": statistics.median(row["calls_per_second"] for row in loaded),
        "errors": sum(row["errors"] for row in loaded),
        "slices": rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout's source tree")
    parser.add_argument("--this", type=Path, default=targets.ROOT, help="the tree in this one's place")
    parser.add_argument("--server", choices=("gunicorn", "waitress"), default="gunicorn")
    parser.add_argument("--slices", type=int, default=SLICES)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument(
        "--workers",
        type=int,
        help="gunicorn workers of both (default: each checkout's own default)",
    )
    parser.add_argument("--threads", type=int, help="threads per process of both (default: each checkout's default)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<time>-pair-<other>.json)")
    args = parser.parse_args(argv)
    from bench.__main__ import code_version, machine  # here: bench.__main__ imports the modules it runs

    other, this = args.other.resolve(), args.this.resolve()
    document = {"mode": "pair", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                "code": code_version(this), "other_code": code_version(other), "server": args.server,
                "workers": args.workers or "default", "threads": args.threads or "default",
                "connections": args.connections, "seconds": args.seconds}  # fmt: skip
    document["figures"] = run(other, args.server, args.slices, args.seconds, args.connections, args.workers,
                              args.threads, this)  # fmt: skip
    document["machine"]["load_average_at_end"] = [round(value, 1) for value in os.getloadavg()]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-pair-{args.server}-{document['other_code']}.json"
    output = args.output or targets.ROOT / "bench" / "results" / name
    output.write_text(json.dumps(document, indent=2) + "\n")
    for name, figures in document["figures"].items():
        code = document["code"] if name == "this" else document["other_code"]
        memory = " → ".join(f"{row['rss_process_mb']:g}" for row in figures["slices"])
        print(f"{name} ({code}): {figures['cpu_us_per_call_median']:g} µs CPU per call, "
              f"{figures['calls_per_second_median']:g} calls/s (medians), {figures['errors']} errors; "
              f"RSS MB per process after each slice: {memory}")  # fmt: skip
    print(f"written to {output}")


if __name__ == "__main__":
    main()
