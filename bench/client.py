"""The benchmarks' HTTP/1.1 client: asyncio raw sockets, keep-alive, and a timestamp for every body line it reads.

The same client measures every target (direct, nginx, the proxy under gunicorn and under waitress), so its own
cost cancels out of the "added" figures. Throughput runs use ``wrk`` instead (bench/load.py), which costs less
CPU per call than any Python client. This module does not start servers or compute statistics.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .upstream import parse_stamp

GENERATE = "/api/generate"
PROMPT = "Why is the sky blue?"
STAMP_KEY = b'"created_at":"'


def generate_body(stream: bool) -> bytes:
    """The request body every benchmark sends: a short prompt, streaming or not."""
    return json.dumps({"model": "llama3.2", "prompt": PROMPT, "stream": stream}, separators=(",", ":")).encode()


@dataclass
class Reply:
    """One answer: status, body, when its first body byte came and (for streams) when each line completed."""

    status: int
    body: bytes
    started_ns: int  # time.perf_counter_ns() when the request was written
    first_byte_ns: int | None = None  # perf_counter_ns of the first body byte
    ended_ns: int = 0
    line_stamps: list[tuple[int, bytes]] = field(default_factory=list)  # per line: (wall-clock receive ns, created_at)
    chunks: int = 0  # HTTP chunks in a chunked body (one per write the server made)
    keep_alive: bool = True


class Connection:
    """One keep-alive connection to ``base_url``; reopens by itself after the server closes it."""

    def __init__(self, base_url: str, source: str | None = None) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.source = None if source is None else (source, 0)  # a loopback address of its own: another client host
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                      stamps: bool = False) -> Reply:  # fmt: skip
        """Send one request and read the whole answer; ``stamps`` collects each line's transit delay."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22,
                                                                     local_addr=self.source)  # fmt: skip
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()  # fmt: skip
        reply = Reply(0, b"", time.perf_counter_ns())
        self.writer.write(head + body)
        try:
            await self._read(reply, method, stamps)
        except BaseException:
            await self.close()
            raise
        if not reply.keep_alive:
            await self.close()
        return reply

    async def _read(self, reply: Reply, method: str, stamps: bool) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        reply.status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        reply.keep_alive = headers.get("connection", "").lower() != "close"
        if method == "HEAD" or reply.status in (204, 304):
            pass
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            await self._read_chunked(reply, stamps)
        elif "content-length" in headers:
            reply.body = await self.reader.readexactly(int(headers["content-length"]))
            reply.first_byte_ns = time.perf_counter_ns()
        else:
            reply.body = await self.reader.read()
            reply.first_byte_ns, reply.keep_alive = time.perf_counter_ns(), False
        reply.ended_ns = time.perf_counter_ns()

    async def _read_chunked(self, reply: Reply, stamps: bool) -> None:
        parts, carry = [], b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers from any of our targets
                break
            data = (await self.reader.readexactly(size + 2))[:-2]
            now_wall, now = time.time_ns(), time.perf_counter_ns()
            if reply.first_byte_ns is None:
                reply.first_byte_ns = now
            reply.chunks += 1
            parts.append(data)
            if stamps:
                *whole, carry = (carry + data).split(b"\n")
                reply.line_stamps.extend((now_wall, _stamp_of(line)) for line in whole if STAMP_KEY in line)
        reply.body = b"".join(parts)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


def _stamp_of(line: bytes) -> bytes:
    start = line.index(STAMP_KEY) + len(STAMP_KEY)
    return line[start : start + 30]  # parsed after the run, so the client stays cheap while lines arrive


def line_delays_ns(reply: Reply) -> list[int]:
    """Per line of a stamped stream: when the client had it minus when the upstream wrote it (wall clock, ns)."""
    return [received - parse_stamp(sent) for received, sent in reply.line_stamps]


def knobs(tokens: int, delay: float = 0.0) -> dict:
    """The fake upstream's knob headers (the same names tests/fake_ollama.py reads)."""
    return {"X-Fake-Tokens": str(tokens), "X-Fake-Token-Delay": str(delay)}


async def sequential(base_url: str, count: int, stream: bool, tokens: int = 5) -> list[Reply]:
    """``count`` calls one after another on one keep-alive connection (concurrency 1)."""
    connection, replies = Connection(base_url), []
    body, headers = generate_body(stream), knobs(tokens)
    try:
        for _ in range(count):
            replies.append(await connection.request("POST", GENERATE, body, headers))
    finally:
        await connection.close()
    return replies


async def concurrent(base_url: str, clients: int, calls_each: int, stream: bool, tokens: int, delay: float = 0.0,
                     stamps: bool = False, spread_s: float = 0.0, sources: tuple = ()) -> list[Reply]:  # fmt: skip
    """``clients`` connections at once, each making ``calls_each`` calls in turn; every reply is returned.

    ``spread_s`` starts the clients evenly over that many seconds instead of all in the same instant; ``sources``
    are loopback addresses the clients connect from in turn (127.0.0.2, ...), as clients on several hosts would.
    """
    body, headers = generate_body(stream), knobs(tokens, delay)

    async def one_client(number: int) -> list[Reply]:
        connection, replies = Connection(base_url, sources[number % len(sources)] if sources else None), []
        await asyncio.sleep(spread_s * number / clients)
        try:
            for _ in range(calls_each):
                replies.append(await connection.request("POST", GENERATE, body, headers, stamps=stamps))
        finally:
            await connection.close()
        return replies

    results = await asyncio.gather(*(one_client(number) for number in range(clients)), return_exceptions=True)
    replies: list = []
    for result in results:
        replies.extend([result] if isinstance(result, BaseException) else result)
    return replies


def is_complete(reply, tokens: int | None = None) -> bool:
    """True for a 200 whose body ends with Ollama's done line (and, given ``tokens``, has that many tokens)."""
    if isinstance(reply, BaseException) or reply.status != 200:
        return False
    body = reply.body.rstrip(b"\n")
    last = body.rsplit(b"\n", 1)[-1]
    if b'"done":true' not in last:
        return False
    return tokens is None or body.count(b'"done":false') == tokens
