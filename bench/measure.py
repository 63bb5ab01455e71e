"""The figures of issue 7, each measured on every target in the same run, targets interleaved round by round.

Every function takes the running targets (``direct`` first) and returns ``{target name: {figure: value}}``. Ratios
and "added" figures are computed later (bench/report.py) from these raw numbers. Process CPU and memory come from
psutil over each target's process tree (bench/targets.py). Nothing here starts or stops a process.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import client, load

MB = 1024 * 1024


def percentile(values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))]


def rotations(targets: list, rounds: int):
    """Yield (round, target) with the order rotated every round, so slow moments of a noisy machine spread out."""
    for number in range(rounds):
        shift = number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            yield number, target


def latency_c1(targets: list, rounds: int, calls: int) -> dict:
    """(1) Non-streaming /api/generate one at a time on a keep-alive connection: p50 and p99 in ms."""
    samples: dict[str, list[float]] = {target.name: [] for target in targets}
    for _, target in rotations(targets, rounds):
        asyncio.run(client.sequential(target.url, 20, stream=False))  # warm the connection pools
        replies = asyncio.run(client.sequential(target.url, calls, stream=False))
        samples[target.name].extend((r.ended_ns - r.started_ns) / 1e6 for r in replies if r.status == 200)
    return {name: {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "calls": len(values)}
            for name, values in samples.items()}  # fmt: skip


def throughput(targets: list, rounds: int, seconds: float, connections: int) -> dict:
    """(2)+(3) Calls per second at ``connections`` (median of rounds), and server CPU per call in µs."""
    runs: dict[str, list[dict]] = {target.name: [] for target in targets}
    for _, target in rotations(targets, rounds):
        cpu_before = target.cpu_seconds()
        result = load.run_load(target.url, connections, seconds)
        result["cpu_us_per_call"] = (target.cpu_seconds() - cpu_before) / max(result["calls"], 1) * 1e6
        runs[target.name].append(result)
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "calls_per_second": statistics.median(r["calls_per_second"] for r in results),
            "cpu_us_per_call": statistics.median(r["cpu_us_per_call"] for r in results),
            "p50_ms": statistics.median(r.get("p50_ms") or 0 for r in results),
            "p99_ms": statistics.median(r.get("p99_ms") or 0 for r in results),
            "errors": sum(r["non_2xx"] + r["socket_errors"] for r in results),
            "rounds": [round(r["calls_per_second"]) for r in results],
            "generator": results[0]["generator"],
        }
    return summary


def cpu_per_token(targets: list, rounds: int, streams: int, tokens: int = 64, clients: int = 8) -> dict:
    """(3) Streams of ``tokens`` tokens with no delay: server CPU µs per relayed token, and chunks the client saw."""
    runs: dict[str, list[tuple]] = {target.name: [] for target in targets}
    for _, target in rotations(targets, rounds):
        cpu_before = target.cpu_seconds()
        replies = asyncio.run(client.concurrent(target.url, clients, streams // clients, True, tokens))
        cpu = target.cpu_seconds() - cpu_before
        complete = [r for r in replies if client.is_complete(r, tokens)]
        runs[target.name].append((cpu, len(replies), len(complete), sum(r.chunks for r in complete)))
    summary = {}
    for name, results in runs.items():
        cpu = sum(r[0] for r in results)
        calls, complete, chunks = (sum(r[i] for r in results) for i in (1, 2, 3))
        summary[name] = {
            "cpu_us_per_token": cpu / max(complete * tokens, 1) * 1e6,
            "cpu_us_per_chunk": cpu / max(chunks, 1) * 1e6,
            "chunks_per_stream": chunks / max(complete, 1),
            "streams": calls,
            "incomplete": calls - complete,
        }
    return summary


class RssWatch:
    """Samples a target's per-process resident memory every ``interval`` s in a thread; keeps the peak."""

    def __init__(self, target, interval: float = 0.1) -> None:
        self.target, self.interval = target, interval
        self.peak_process = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sizes = self.target.rss_bytes()
            if sizes:
                self.peak_process = max(self.peak_process, max(self.target.worker_rss_bytes() or [0]))
                self.peak_total = max(self.peak_total, sum(sizes.values()))


def many_streams(targets: list, rounds: int, streams: int = 256, tokens: int = 20, delay: float = 0.05) -> dict:
    """(4)+(6) ``streams`` concurrent streams: all complete?, wall time, per-line transit p50/p99, peak RSS.

    The streams start spread over one token interval (as independent clients would), not in one instant: 256
    lines written in the same millisecond would measure how fast one Python client drains a burst, not the proxy.
    The upstream therefore needs ``tokens * delay + delay`` seconds for all of them (1.05 s by default).
    """
    runs: dict[str, list] = {target.name: [] for target in targets}
    for _, target in rotations(targets, rounds):
        with RssWatch(target) as watch:
            started = time.perf_counter()
            replies = asyncio.run(client.concurrent(target.url, streams, 1, True, tokens, delay, True, spread_s=delay))
            wall = time.perf_counter() - started
        delays = [d / 1e6 for r in replies if not isinstance(r, BaseException) for d in client.line_delays_ns(r)]
        complete = sum(client.is_complete(r, tokens) for r in replies)
        runs[target.name].append((complete, wall, delays, watch.peak_process, watch.peak_total))
    summary = {}
    for name, results in runs.items():
        delays = [d for r in results for d in r[2]]
        summary[name] = {
            "complete": min(r[0] for r in results),
            "streams": streams,
            "wall_s": max(r[1] for r in results),
            "upstream_needs_s": tokens * delay + delay,
            "transit_p50_ms": percentile(delays, 50),
            "transit_p99_ms": percentile(delays, 99),
            "lines": len(delays),
            "rss_peak_process_mb": max(r[3] for r in results) / MB,
            "rss_peak_total_mb": max(r[4] for r in results) / MB,
        }
    return summary


def ttfb(targets: list, rounds: int, calls: int) -> dict:
    """(5) One stream at a time at idle: request written to first body byte, p50 and p99 in ms."""
    samples: dict[str, list[float]] = {target.name: [] for target in targets}
    for _, target in rotations(targets, rounds):
        replies = asyncio.run(client.sequential(target.url, calls, stream=True, tokens=5))
        samples[target.name].extend((r.first_byte_ns - r.started_ns) / 1e6 for r in replies if r.first_byte_ns)
    return {name: {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "calls": len(values)}
            for name, values in samples.items()}  # fmt: skip


def memory_growth(targets: list, total_calls: int, slices: int, connections: int = 64) -> dict:
    """(6) Resident memory of each serving process after every slice of ``total_calls`` non-streaming calls."""
    summary = {}
    for target in targets:
        points = [{"calls": 0, "rss_process_mb": max(target.worker_rss_bytes()) / MB}]
        done = 0
        while done < total_calls:
            rate = summary.get("_rate", 1000.0)
            result = load.run_load(target.url, connections, max(1.0, (total_calls / slices) / rate))
            done += result["calls"]
            summary["_rate"] = max(result["calls_per_second"], 100.0)
            points.append({"calls": done, "rss_process_mb": max(target.worker_rss_bytes()) / MB})
        summary.pop("_rate")
        growth = points[-1]["rss_process_mb"] - points[1]["rss_process_mb"] if len(points) > 2 else None
        summary[target.name] = {"points": points, "growth_after_first_slice_mb": growth}
    return summary


def idle_memory(targets: list) -> dict:
    """(6) Resident memory per serving process, and of the whole tree, before any load (after a few warm-up calls)."""
    summary = {}
    for target in targets:
        asyncio.run(client.sequential(target.url, 5, stream=False))
        sizes = target.rss_bytes()
        summary[target.name] = {
            "rss_process_mb": max(target.worker_rss_bytes()) / MB,
            "rss_total_mb": sum(sizes.values()) / MB,
            "processes": len(sizes),
        }
    return summary


def server_only(servers: list, rounds: int, calls: int, seconds: float) -> dict:
    """The servers alone (bench/hello.py): latency at c1 and CPU per call at c8, to set the proxy's figures against."""
    latency = latency_c1(servers, rounds, calls)
    load_c8 = throughput(servers, rounds, seconds, 8)
    return {server.name: {"p50_ms": latency[server.name]["p50_ms"], "calls_per_second_c8":
                          load_c8[server.name]["calls_per_second"], "cpu_us_per_call_c8":
                          load_c8[server.name]["cpu_us_per_call"]} for server in servers}  # fmt: skip


def writer_rows(rows: int) -> dict:
    """(7) Rows per second the analytics writer stores (SQLite + CSV mirror) in a burst; the cost of a row alone."""
    from proxy_app.calls import Call
    from proxy_app.store import models, schema
    from proxy_app.store.csvlog import CsvLog
    from proxy_app.store.writer import Writer

    def sample_call(number: int) -> Call:
        return Call(
            timestamp=datetime.now(UTC), request_id=f"{number:032x}", ip_source="127.0.0.1", user_agent="bench",
            http_method="POST", endpoint="/api/generate", session_id="127.0.0.1", model="llama3.2", input_tokens=17,
            output_tokens=5, total_tokens=22, model_parameters=None, stream_mode=False, request_size_bytes=68,
            response_size_bytes=500, queue_time_ms=0.0, processing_time_ms=0.4, total_time_ms=0.6, http_status=200,
            error_message=None, system_load_cpu=10.0, system_load_memory=20.0, concurrent_requests=1,
            outcome="completed", ttft_ms=0.5, tokens_per_second=100.0, load_duration_ms=1.0,
            prompt_eval_duration_ms=60.0, eval_duration_ms=50.0, done_reason="stop", api="native",
            prompt="Why is the sky blue?", response_preview="tok tok tok tok tok", cached_input_tokens=None,
            remote_model=None, remote_host=None,
        )  # fmt: skip

    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        database = models.open_database(f"sqlite:///{Path(scratch) / 'bench.db'}")
        models.database.initialize(database)
        schema.create_tables(database)
        writer = Writer(database, CsvLog(str(Path(scratch) / "bench.csv"), 0), maxsize=0)
        writer.submit(sample_call(0))
        writer.flush(30)  # thread started, schema ready
        calls = [sample_call(n) for n in range(rows)]
        started = time.perf_counter()
        for call in calls:
            writer.submit(call)
        writer.flush(120)
        result["burst_rows_per_second"] = rows / (time.perf_counter() - started)
        # Rows that arrive alone: each is stored on its own after the writer's linger (LINGER_SECONDS), so what
        # matters is what one costs (CPU of the whole process, writer thread included) and how late it is stored.
        trickle = max(rows // 100, 100)
        cpu, waits = time.process_time(), []
        for call in calls[:trickle]:
            started = time.perf_counter()
            writer.submit(call)
            writer.flush(30)
            waits.append((time.perf_counter() - started) * 1000)
        result["alone_cpu_us_per_row"] = (time.process_time() - cpu) / trickle * 1e6
        result["alone_ms_to_stored_p50"] = statistics.median(waits)
        result["written"], result["dropped"] = writer.written, writer.dropped
        writer.close()
        database.close()
    return result
