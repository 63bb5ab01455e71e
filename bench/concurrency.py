"""Two figures against ``serve`` with its default settings: 1,000 concurrent streams, and fresh calls while 1,000
connections drip headers or sit silent.

Streams: 1,000 clients each stream 20 tokens 50 ms apart (the upstream needs 1.0 s per stream, 1.05 s for all, as the
start is spread over one token interval), connecting from eight loopback addresses (125 each, under the per-address
cap), as clients on several hosts would. Reported per target: streams complete, wall time, each stream's duration
(request written to last byte) against the upstream's 1.0 s, CPU seconds of the serving processes and of the client,
and resident memory and threads per serving process. ``direct`` (the upstream alone, same client) shows what the
client itself costs, and ``floor`` (bench/floor.py, an asyncio relay that only passes bytes on) what any relay in
Python costs at least.

Slow clients: from 127.0.0.2, 1,000 connections, half dripping a header line every 2 s and half silent, for
ATTACK_SECONDS; meanwhile a fresh connection from 127.0.0.1 makes one call every 0.25 s. Reported: the fresh calls'
latency with and without the attack, errors, and how the attacker connections ended (refused at once, or closed at
the header deadline). Every process here is started and stopped by this module; loops are bounded in time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import select
import socket
import threading
import time
from pathlib import Path

import psutil

from bench import client, targets
from bench.measure import MB, RssWatch, percentile

STREAMS, TOKENS, DELAY = 1000, 20, 0.05
STREAM_SECONDS = TOKENS * DELAY  # what the upstream takes for one stream: its last line comes this long after the first
SOURCES = tuple(f"127.0.0.{number}" for number in range(10, 18))
ATTACKERS, ATTACK_FROM, CALLS_FROM = 1000, "127.0.0.2", "127.0.0.1"
ATTACK_SECONDS, DRIP_SECONDS, CALL_EVERY_SECONDS = 15.0, 2.0, 0.25
SERVERS = ("gunicorn", "waitress")


def run(work: Path, rounds: int = 3) -> dict:
    """Both figures on direct and ``serve`` (gunicorn, the default on Linux, and waitress), default settings."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # 2,000 client sockets at most
    upstream = targets.start_upstream()
    results: dict = {"streams_1000": {}, "slow_clients": {}}
    try:
        results["streams_1000"]["direct"] = streams(upstream, rounds)
        floor = targets.start_floor(upstream)
        try:
            results["streams_1000"]["floor"] = streams(floor, rounds)
        finally:
            floor.stop()
        for server in SERVERS:
            target = targets.start_proxy(server, upstream, work, threads=None, workers=None)
            try:
                asyncio.run(client.sequential(target.url, 20, stream=False))  # warm up
                results["streams_1000"][server] = streams(target, rounds)
                results["slow_clients"][server] = slow_clients(target)
            finally:
                target.stop()
    finally:
        upstream.stop()
    return results


def streams(target, rounds: int) -> dict:
    """``rounds`` times 1,000 concurrent streams; the worst round's figures."""
    runs = []
    idle = {pid: rss / MB for pid, rss in target.rss_bytes().items()}
    for _ in range(rounds):
        cpu_target, cpu_client, load = target.cpu_seconds(), time.process_time(), os.getloadavg()[0]
        with RssWatch(target) as watch:
            started = time.perf_counter()
            replies = asyncio.run(client.concurrent(target.url, STREAMS, 1, True, TOKENS, DELAY, spread_s=DELAY,
                                                    sources=SOURCES))  # fmt: skip
            wall = time.perf_counter() - started
        cpu_target, cpu_client = target.cpu_seconds() - cpu_target, time.process_time() - cpu_client
        complete = [reply for reply in replies if client.is_complete(reply, TOKENS)]
        durations = [(reply.ended_ns - reply.started_ns) / 1e9 for reply in complete]
        runs.append({"complete": len(complete), "wall_s": wall, "durations": durations, "load_average_1m": load,
                     "cpu_s_serving": cpu_target, "cpu_s_client": cpu_client,
                     "rss_peak_process_mb": watch.peak_process / MB,
                     "rss_peak_total_mb": watch.peak_total / MB})  # fmt: skip
    durations = [seconds for one in runs for seconds in one["durations"]]
    worst = max(durations, default=None)
    return {
        "streams": STREAMS,
        "complete": min(one["complete"] for one in runs),
        "wall_s": max(one["wall_s"] for one in runs),
        "upstream_needs_s": STREAM_SECONDS + DELAY,
        "stream_s_p50": percentile(durations, 50),
        "stream_s_p99": percentile(durations, 99),
        "stream_s_max": worst,
        "stream_late_s_max": None if worst is None else worst - STREAM_SECONDS,  # over the upstream's own time
        "all_within_upstream_plus_0_5_s": worst is not None and worst <= STREAM_SECONDS + 0.5,
        "cpu_s_serving_per_round": [round(one["cpu_s_serving"], 2) for one in runs],  # the whole process tree
        "cpu_s_client_per_round": [round(one["cpu_s_client"], 2) for one in runs],
        "rss_idle_mb_by_process": [round(value, 1) for value in idle.values()],
        "rss_peak_process_mb": max(one["rss_peak_process_mb"] for one in runs),
        "rss_peak_total_mb": max(one["rss_peak_total_mb"] for one in runs),
        "threads_per_serving_process": thread_count(target),
        "rounds": [{key: value for key, value in one.items() if key != "durations"} for one in runs],
    }


def slow_clients(target) -> dict:
    """Fresh calls timed for ATTACK_SECONDS without, then with, 1,000 slow connections."""
    port = int(target.url.rsplit(":", 1)[1])
    quiet = timed_calls(port, ATTACK_SECONDS / 3)
    attack = Attack(port, ATTACKERS)
    try:
        loud = timed_calls(port, ATTACK_SECONDS)
        deadline = time.monotonic() + 5
        while len(attack.closed) < ATTACKERS and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        attack.stop()
    held = sorted(attack.closed[fileno] - attack.opened[fileno] for fileno in attack.closed)
    return {
        "without_attack": summary(quiet),
        "with_attack": summary(loud),
        "attackers": ATTACKERS,
        "attackers_closed": len(held),
        "attackers_closed_within_1_s": sum(seconds < 1 for seconds in held),
        "attacker_held_s_max": held[-1] if held else None,
    }


def timed_calls(port: int, seconds: float) -> list[tuple]:
    """One call on a fresh connection every CALL_EVERY_SECONDS for ``seconds``: (status or error, seconds)."""
    calls, deadline = [], time.monotonic() + seconds
    body = client.generate_body(stream=False)
    while time.monotonic() < deadline:
        calls.append(fresh_call(port, body))
        time.sleep(CALL_EVERY_SECONDS)
    return calls


def fresh_call(port: int, body: bytes | str) -> tuple[int | str, float]:
    """A fresh connection from CALLS_FROM, one non-streaming generate: (status, or the error's name, and seconds)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(CALLS_FROM, 0))
    try:
        connection.request("POST", client.GENERATE, body, {"Content-Type": "application/json"})
        answer = connection.getresponse()
        status = answer.status if json.loads(answer.read()).get("done") else "not done"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        status = type(exc).__name__
    finally:
        connection.close()
    return status, time.monotonic() - started


def summary(calls: list[tuple]) -> dict:
    latencies = [seconds * 1000 for status, seconds in calls if status == 200]
    return {"calls": len(calls), "errors": len(calls) - len(latencies), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "max_ms": max(latencies, default=None)}  # fmt: skip


class Attack:
    """``count`` connections from ATTACK_FROM: even ones drip a header line every DRIP_SECONDS, odd ones stay silent.

    A thread sends the drips and notes when the server closes each connection (EOF or reset); ``stop`` ends it.
    """

    def __init__(self, port: int, count: int) -> None:
        self.sockets: list[socket.socket] = []
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}  # fileno -> when the server closed it
        self._sent: dict[int, int] = {}
        self._stop = threading.Event()
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((ATTACK_FROM, 0))
            sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: the handshake completes in the kernel
            self.sockets.append(sock)
            self.opened[sock.fileno()] = time.monotonic()
        self._by_fileno = {sock.fileno(): sock for sock in self.sockets}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_drip = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_drip:
                next_drip = time.monotonic() + DRIP_SECONDS
                for sock in self.sockets[::2]:
                    self._drip(sock)
            self._note_closed(timeout=0.1)

    def _drip(self, sock: socket.socket) -> None:
        if sock.fileno() in self.closed:
            return
        sent = self._sent.get(sock.fileno(), 0)
        line = b"GET /api/version HTTP/1.1\r\n" if sent == 0 else b"X-Drip-%d: x\r\n" % sent
        try:
            sock.send(line)
            self._sent[sock.fileno()] = sent + 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset, or not connected yet because the server never accepted
            if sent:
                self.closed.setdefault(sock.fileno(), time.monotonic())

    def _note_closed(self, timeout: float) -> None:
        poller = select.poll()
        for sock in self.sockets:
            if sock.fileno() not in self.closed:
                poller.register(sock, select.POLLIN)
        for fileno, _ in poller.poll(timeout * 1000):
            try:
                data = self._by_fileno[fileno].recv(4096)  # an answer (a refused one gets a 429), then EOF
            except BlockingIOError:
                continue
            except OSError:  # reset
                data = b""
            if not data:
                self.closed.setdefault(fileno, time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


def thread_count(target) -> list[int]:
    """Threads in each serving process."""
    counts = []
    for proc in target.workers():
        try:
            counts.append(proc.num_threads())
        except psutil.Error:
            pass
    return counts
