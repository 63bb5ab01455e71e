"""Throughput load from ``wrk`` (C, one thread): fixed-duration runs of non-streaming /api/generate calls.

wrk is used for the calls-per-second figures because a Python client would compete with the proxy for the two
cores. When wrk is missing (``apt-get install wrk``), ``run_load`` falls back to the asyncio client in
bench/client.py and says so in its result. This module only runs load and parses wrk's summary.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import client

WRK = shutil.which("wrk")
SCRIPT = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Fake-Tokens"] = "5"
"""
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _script() -> str:
    path = Path(tempfile.gettempdir()) / "ollama-proxy-bench.lua"
    path.write_text(SCRIPT % client.generate_body(stream=False).decode())
    return str(path)


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict:
    """Pull calls, duration, calls/s, errors and latency percentiles out of wrk's ``--latency`` summary."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    result = {
        "calls": int(done.group(1)),
        "seconds": _seconds(done.group(2) + done.group(3)),
        "calls_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", output)) else 0,
        "socket_errors": 0,
    }
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        result["socket_errors"] = sum(int(value) for value in m.groups())
    for percent in ("50", "99"):
        if m := re.search(rf"^\s+{percent}%\s+([\d.]+(?:us|ms|s|m))\s*$", output, re.M):
            result[f"p{percent}_ms"] = _seconds(m.group(1)) * 1000
    return result


def run_load(url: str, connections: int, seconds: float) -> dict:
    """Keep ``connections`` keep-alive connections busy with non-streaming calls for ``seconds``."""
    if WRK is None:
        return _run_python(url, connections, seconds)
    command = [WRK, "-t1", f"-c{connections}", f"-d{max(int(seconds), 1)}s", "-s", _script(), "--latency",
               url + client.GENERATE]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {**parse_wrk(output), "generator": "wrk"}


def _run_python(url: str, connections: int, seconds: float) -> dict:
    async def run() -> list:
        deadline = time.monotonic() + seconds
        body, headers = client.generate_body(False), client.knobs(5)

        async def one() -> list:
            connection, replies = client.Connection(url), []
            while time.monotonic() < deadline:
                replies.append(await connection.request("POST", client.GENERATE, body, headers))
            await connection.close()
            return replies

        return [reply for batch in await asyncio.gather(*(one() for _ in range(connections))) for reply in batch]

    started = time.perf_counter()
    replies = asyncio.run(run())
    elapsed = time.perf_counter() - started
    return {"calls": len(replies), "seconds": elapsed, "calls_per_second": len(replies) / elapsed,
            "non_2xx": sum(reply.status != 200 for reply in replies), "socket_errors": 0,
            "generator": "python"}  # fmt: skip
