"""A full-speed fake Ollama for the benchmarks: asyncio, one thread, Ollama's exact framing for /api/generate.

Why not tests/fake_ollama.py: it runs under waitress and costs about as much CPU per call as the proxy does, so on
two cores it would be the bottleneck of every throughput figure. This one answers the few shapes the benchmarks
need, with the same wire bytes and the same knob headers (``X-Fake-Tokens``, ``X-Fake-Token-Delay``):

- ``POST /api/generate`` with ``"stream": false``: one compact JSON body with ``Content-Length`` (as Go does for
  bodies under its 2 KiB buffer), no trailing newline.
- ``POST /api/generate`` streaming: ``Transfer-Encoding: chunked``, one chunk per NDJSON line, the final line with
  ``done``, counts and durations. Each line's ``created_at`` is the wall-clock time it was written (ns), so a client
  can tell how late a line reached it compared with the upstream's schedule.
- ``GET /api/version`` and ``GET /api/tags`` for the proxy's health probes, ``GET /api/ps`` for its residency
  poller; anything else is Go's 404.

It does not validate models, run anything, or implement other endpoints. Run: ``python -m bench.upstream --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from email.utils import formatdate
from functools import lru_cache

MODEL = "llama3.2"
DEFAULT_TOKENS = 5
CONTEXT = ",".join(str(128000 + i) for i in range(30))  # a real generate reply carries its context token ids


def stamp(ns: int) -> str:
    """Format a wall-clock time in ns like Go's RFC3339Nano (always nine digits here, so clients parse it fixed)."""
    seconds, fraction = divmod(ns, 10**9)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{fraction:09d}Z"


def parse_stamp(text: bytes) -> int:
    """Inverse of ``stamp`` (the benchmarks' clients use it on each line's created_at)."""
    return _whole_seconds(text[:19]) * 10**9 + int(text[20:29])


@lru_cache(maxsize=4096)
def _whole_seconds(text: bytes) -> int:
    return int(datetime.strptime(text.decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())


def token_line(index: int) -> bytes:
    """One intermediate NDJSON line, stamped now."""
    word = "tok" if index == 0 else " tok"
    return b'{"model":"%s","created_at":"%s","response":"%s","done":false}\n' % (
        MODEL.encode(),
        stamp(time.time_ns()).encode(),
        word.encode(),
    )


def final_object(tokens: int, delay: float, full_text: bool) -> bytes:
    """The done line (stream) or the whole body (stream:false): counts and durations as Ollama reports them."""
    text = ("tok" + " tok" * (tokens - 1)) if full_text and tokens else ""
    eval_ns = tokens * (int(delay * 1e9) or 10_000_000)
    return (
        f'{{"model":"{MODEL}","created_at":"{stamp(time.time_ns())}","response":"{text}","done":true,'
        f'"done_reason":"stop","context":[{CONTEXT}],"total_duration":{eval_ns + 61_500_000},'
        f'"load_duration":1000000,"prompt_eval_count":17,"prompt_eval_duration":60000000,'
        f'"eval_count":{tokens},"eval_duration":{eval_ns}}}'
    ).encode()


_date = [0, ""]  # (second, Date header value): formatted once a second, as Go's net/http caches it


def _head(status: str, content_type: str, extra: str) -> bytes:
    now = int(time.time())
    if _date[0] != now:
        _date[:] = [now, formatdate(now, usegmt=True)]
    return f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nDate: {_date[1]}\r\n{extra}\r\n".encode()


class _Connection(asyncio.Protocol):
    """One client connection: requests are answered in order; a stream holds the connection until it ends."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve_buffered()

    def connection_lost(self, exc) -> None:
        self.transport = None

    def _serve_buffered(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, target = lines[0].split(" ")[:2]
            self._answer(method, target.split("?")[0], headers, body)

    def _answer(self, method: str, path: str, headers: dict, body: bytes) -> None:
        if method == "POST" and path == "/api/generate":
            tokens = int(headers.get("x-fake-tokens") or DEFAULT_TOKENS)
            delay = float(headers.get("x-fake-token-delay") or 0)
            try:
                streaming = json.loads(body).get("stream") is not False
            except (ValueError, AttributeError):
                streaming = True
            if streaming:
                self.busy = True
                asyncio.get_running_loop().create_task(self._stream(tokens, delay))
                return
            self._whole("200 OK", "application/json; charset=utf-8", final_object(tokens, delay, full_text=True))
        elif method == "GET" and path == "/api/version":
            self._whole("200 OK", "application/json; charset=utf-8", b'{"version":"0.12.6"}')
        elif method == "GET" and path in ("/api/tags", "/api/ps"):  # nothing installed, nothing loaded
            self._whole("200 OK", "application/json; charset=utf-8", b'{"models":[]}')
        else:
            self._whole("404 Not Found", "text/plain", b"404 page not found")

    def _whole(self, status: str, content_type: str, body: bytes) -> None:
        self.transport.write(_head(status, content_type, f"Content-Length: {len(body)}\r\n") + body)

    async def _stream(self, tokens: int, delay: float) -> None:
        """Write one chunk per line, like gin's per-object flush; a delay passes between lines (first one at once)."""
        try:
            head = _head("200 OK", "application/x-ndjson", "Transfer-Encoding: chunked\r\n")
            for index in range(tokens + 1):
                if index and delay:
                    await asyncio.sleep(delay)
                elif index:
                    await asyncio.sleep(0)  # let other streams in, as goroutines would
                if self.transport is None:
                    return
                line = token_line(index) if index < tokens else final_object(tokens, delay, full_text=False) + b"\n"
                self.transport.write(head + b"%x\r\n%s\r\n" % (len(line), line))
                head = b""
            self.transport.write(b"0\r\n\r\n")
        finally:
            self.busy = False
            if self.transport is not None:
                self._serve_buffered()


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    server = await asyncio.get_running_loop().create_server(_Connection, host, port, backlog=2048, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
