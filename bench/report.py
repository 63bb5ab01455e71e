"""Markdown tables from a results file: ``python -m bench.report bench/results/<file>.json``.

Each proxy figure is shown with what it adds to direct access (or its ratio to direct), next to nginx's, and
checked against the issue's target. Only figures present in the file are shown; nothing is estimated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROXIES = ("gunicorn", "waitress")
ALL = ("direct", "nginx", *PROXIES)


def _get(document: dict, figure: str, target: str, key: str):
    return document.get("figures", {}).get(figure, {}).get(target, {}).get(key)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ratios(document, figure, key, target, value, digits: int) -> str:
    """For a proxy's cell: its value as a multiple of direct's and of nginx's, e.g. "18.4× direct, 10.8× nginx"."""
    parts = []
    for name in ("direct", "nginx"):
        reference = _get(document, figure, name, key)
        if target in PROXIES and reference:
            parts.append(f"{value / reference:.{digits}f}× {name}")
    return ", ".join(parts)


def _added_row(document, label, figure, key, limit=None, digits=2) -> list[str] | None:
    """A latency-like row: each target's value and what it adds to direct; the target checks the added part."""

    def shown(value, direct, ratios):
        added = value - direct
        return f"{'+' if added >= 0 else '−'}{_fmt(abs(added), digits)}" + (f"; {ratios}" if ratios else "")

    verdict = None if limit is None else (f"≤ {limit} added", lambda value, direct: value - direct <= limit)
    return _compared_row(document, label, figure, key, digits, 1, shown, verdict)


def _ratio_row(document, label, figure, key, at_least=None, digits=0) -> list[str] | None:
    """A rate row: each value with its ratio to direct; the target checks the proxy's own value."""

    def shown(value, direct, ratios):
        return ratios or f"{value / direct:.2f}× direct"

    verdict = None if at_least is None else (f"≥ {at_least:,}", lambda value, direct: value >= at_least)
    return _compared_row(document, label, figure, key, digits, 2, shown, verdict)


def _compared_row(document, label, figure, key, digits, ratio_digits, shown, verdict) -> list[str] | None:
    """One table row: direct's value, then each other target's as "value (shown(...))"; ``verdict`` is
    (target text, passes(value, direct)) for the proxies, or None for a row without a target."""
    direct = _get(document, figure, "direct", key)
    if direct is None:
        return None
    cells, verdicts = [], []
    for target in ALL:
        value = _get(document, figure, target, key)
        if value is None:
            cells.append("–")
            continue
        if target == "direct":
            cells.append(_fmt(value, digits))
            continue
        ratios = _ratios(document, figure, key, target, value, ratio_digits)
        cells.append(f"{_fmt(value, digits)} ({shown(value, direct, ratios)})")
        if verdict is not None and target in PROXIES:
            verdicts.append(f"{target} {'met' if verdict[1](value, direct) else 'missed'}")
    return [label, *cells, f"{verdict[0]}: " + ", ".join(verdicts) if verdict is not None else ""]


def _plain_row(document, label, figure, key, at_most=None, digits=1, vs_nginx=True) -> list[str] | None:
    """An absolute row (CPU, memory): the value as measured; the target checks the proxies."""
    values = {target: _get(document, figure, target, key) for target in ALL}
    if all(value is None for value in values.values()):
        return None
    cells = [_fmt(values[t], digits) for t in ALL]
    if vs_nginx and values["nginx"]:  # the zero-cost proxy's figure is the yardstick for the proxies' CPU and memory
        cells = [cell + (f" ({values[t] / values['nginx']:.0f}× nginx)" if t in PROXIES and values[t] else "")
                 for t, cell in zip(ALL, cells, strict=True)]  # fmt: skip
    if at_most is None:
        return [label, *cells, ""]
    verdicts = [f"{t} {'met' if values[t] <= at_most else 'missed'}" for t in PROXIES if values[t] is not None]
    return [label, *cells, f"≤ {at_most}: " + ", ".join(verdicts)]


def rows(document: dict) -> list[list[str]]:
    """Every row the document has data for."""
    candidates = [
        _added_row(document, "(1) non-stream latency c1, p50 ms", "latency_c1", "p50_ms", 0.8),
        _added_row(document, "(1) non-stream latency c1, p99 ms", "latency_c1", "p99_ms"),
        _ratio_row(document, "(2) calls/s at c8", "throughput_c8", "calls_per_second"),
        _ratio_row(document, "(2) calls/s at c64", "throughput_c64", "calls_per_second", 1500),
        _plain_row(document, "(3) server CPU µs per call (c8)", "throughput_c8", "cpu_us_per_call", 800, 0),
        _plain_row(document, "(3) server CPU µs per call (c64)", "throughput_c64", "cpu_us_per_call", 800, 0),
        _plain_row(
            document, "(3) server CPU µs per relayed token (64-token streams)", "cpu_per_token", "cpu_us_per_token", 20
        ),
        _plain_row(document, "(3) server CPU µs per chunk written to the client", "cpu_per_token", "cpu_us_per_chunk"),
        _plain_row(
            document,
            "(3) chunks per 64-token stream, as received",
            "cpu_per_token",
            "chunks_per_stream",
            vs_nginx=False,
        ),
        _plain_row(
            document,
            "(4) 256 streams × 20 tokens @ 50 ms: complete",
            "streams_256",
            "complete",
            digits=0,
            vs_nginx=False,
        ),
        _plain_row(document, "(4) 256 streams: wall s (upstream needs 1.05)", "streams_256", "wall_s", 1.5, 2, False),
        _added_row(document, "(4) per-line transit p50 ms", "streams_256", "transit_p50_ms", 0.5),
        _added_row(document, "(4) per-line transit p99 ms", "streams_256", "transit_p99_ms"),
        _added_row(document, "(5) stream TTFB at idle, p50 ms", "ttfb", "p50_ms", 1.0),
        _added_row(document, "(5) stream TTFB at idle, p99 ms", "ttfb", "p99_ms"),
        _plain_row(document, "(6) RSS per serving process, idle, MB", "idle_memory", "rss_process_mb", 60),
        _plain_row(document, "(6) RSS per serving process, 256 streams, MB", "streams_256", "rss_peak_process_mb"),
    ]
    return [row for row in candidates if row is not None]


def table(document: dict) -> str:
    """The main table plus the memory-growth, writer and soak lines."""
    machine, settings = document.get("machine", {}), document.get("settings", {})
    load = f"load average {machine.get('load_average_at_start')} at start, {machine.get('load_average_at_end')} at end"
    if document.get("mode") == "keycost":  # python -m bench.keycost --output: in-process, no servers
        started = f"{document['code']} started {document['started']}: {machine.get('cpus')} CPUs, {load}"
        return f"keycost run of {started}.\n\n{key_cost(document['figures']['keys'])}"
    workers, threads = settings.get("gunicorn_workers"), settings.get("threads")
    lines = [
        f"{document.get('mode')} run of {document.get('code')} started {document.get('started')}: "
        f"{machine.get('cpus')} CPUs, {load}; gunicorn {workers} workers × {threads} threads, waitress "
        f"{threads} threads; load generator {settings.get('generator')}.\n",
        "| figure | direct | nginx | proxy (gunicorn) | proxy (waitress) | target |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(document)]
    growth = document.get("figures", {}).get("memory_growth", {})
    for name, data in growth.items():
        points = ", ".join(f"{p['calls']:,}: {p['rss_process_mb']:.1f}" for p in data["points"])
        lines.append(f"\n(6) {name}: RSS MB per serving process after N calls — {points}")
    writer = document.get("figures", {}).get("writer")
    if writer:
        burst = writer["burst_rows_per_second"]
        if "alone_cpu_us_per_row" in writer:
            alone = (f"a row arriving alone: {writer['alone_cpu_us_per_row']:,.0f} µs CPU, stored "
                     f"{writer['alone_ms_to_stored_p50']:.1f} ms after it was handed over (p50)")  # fmt: skip
        else:  # results files from before the writer's linger
            alone = f"{writer['one_by_one_rows_per_second']:,.0f} rows/s one by one"
        lines.append(f"\n(7) writer (SQLite + CSV): {burst:,.0f} rows/s in a burst; {alone}")
    if servers := document.get("figures", {}).get("server_only"):
        shown = "; ".join(f"{name}: c1 p50 {v['p50_ms']:.2f} ms, {v['calls_per_second_c8']:,.0f} calls/s at c8, "
                          f"{v['cpu_us_per_call_c8']:,.0f} µs CPU per call" for name, v in servers.items())  # fmt: skip
        lines.append(f"\nservers alone (bench/hello.py): {shown}")
    if parts := document.get("figures", {}).get("breakdown"):
        shown = ", ".join(f"{name.replace('_', ' ')} {value['thread_us']} µs" for name, value in parts.items())
        process = parts["full_analytics"]["process_us"]
        lines.append(
            f"\nin-process CPU per call (calling thread): {shown}; full analytics incl. the writer thread {process} µs"
        )
    if keys := document.get("figures", {}).get("keys"):
        lines.append(f"\n{key_cost(keys)}")
    if soak := document.get("soak"):
        first, last = soak["memory"][min(1, len(soak["memory"]) - 1)], soak["memory"][-1]
        lines.append(
            f"\nsoak: {soak['seconds']:g} s, {soak['clients']} clients, {soak['sent']:,} calls "
            f"({soak['streams']:,} streams), {soak['errors']} errors, rows {soak['rows']:,} "
            f"({'equal to' if soak['rows_equal_calls'] else 'NOT equal to'} calls), RSS MB per worker "
            f"{first['rss_process_mb']} at {first['seconds']} s -> {last['rss_process_mb']} at {last['seconds']} s"
        )
    return "\n".join(lines)


def key_cost(keys: dict) -> str:
    """The API key line: what a key with limits far from reached adds to a call, against the issue's 50 µs."""
    checks = ", ".join(f"{name.replace('_', ' ')} +{value['added_thread_us']:.1f}"
                       for name, value in keys["check"].items() if name != "anonymous")  # fmt: skip
    in_call, call = keys["in_call"]["total_thread_us"], keys["call"]["rpm_and_tokens"]
    return (
        f"API keys ({keys['store']}), calling-thread CPU µs per call: key check alone {checks}; inside a whole call "
        f"{in_call:.0f} ({'met' if in_call <= 50 else 'missed'}: ≤ 50); a whole keyed call {call['thread_us']:.0f} "
        f"(+{call['added_thread_us']:.0f}, {call['per_anonymous']:.2f}× anonymous in process CPU); one request lease "
        f"{keys['lease_transaction_us']} µs per {keys['lease_max']} requests"
    )


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    print(table(json.loads(Path(args[0]).read_text())))


if __name__ == "__main__":
    main()
