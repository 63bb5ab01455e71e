"""The floor for 1,000 concurrent streams in Python: an asyncio relay that passes bytes through and nothing more.

No accounting, no checks, no recording, a new upstream connection per call: the least any event-loop relay written
in Python does for a call. Beside nginx (the zero-cost reference) it says what the 1,000-stream target leaves for a
Python relay on this machine, once the client and the upstream have taken their share of the cores. It relays only
what the bench sends and the bench's upstream answers (requests with a Content-Length; answers with one, or chunked
as Go frames them, ending in the last chunk with no trailer). Run by bench.targets.start_floor.
"""

from __future__ import annotations

import argparse
import asyncio

_LAST_CHUNK = b"0\r\n\r\n"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _relay_call(reader, writer, upstream_port: int) -> bool:
    """One call on a client connection; False once the client has closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    body = await reader.readexactly(_content_length(head))
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    try:
        upstream_writer.write(head + body)
        answer_head = await upstream_reader.readuntil(b"\r\n\r\n")
        writer.write(answer_head)
        if b"chunked" not in answer_head.lower():
            writer.write(await upstream_reader.readexactly(_content_length(answer_head)))
            return True
        tail = b""
        while not tail.endswith(_LAST_CHUNK):
            piece = await upstream_reader.read(65536)
            if not piece:
                return False
            writer.write(piece)  # as it arrives, as the proxy relays each piece
            tail = (tail + piece)[-len(_LAST_CHUNK) :]
        return True
    finally:
        upstream_writer.close()


async def _serve_connection(reader, writer, upstream_port: int) -> None:
    try:
        while await _relay_call(reader, writer, upstream_port):
            pass
    finally:
        writer.close()


async def serve(port: int, upstream_port: int) -> None:
    server = await asyncio.start_server(
        lambda reader, writer: _serve_connection(reader, writer, upstream_port), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
