"""Reading the upstream in pieces (chunks.py): lines already here go out together, a line alone goes out at once."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import urllib3

from proxy_app import chunks
from tests.raw_upstream import RawUpstream, chunked, response

NDJSON = "application/x-ndjson"
LINES = [b'{"response":"w%d","done":false}\n' % n for n in range(10)]


@pytest.fixture
def raw():
    made: list[RawUpstream] = []

    def start(script) -> urllib3.HTTPConnectionPool:
        upstream = RawUpstream(script)
        made.append(upstream)
        return urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, retries=False, timeout=5)

    yield start
    for upstream in made:
        upstream.close()


def open_body(pool: urllib3.HTTPConnectionPool):
    return pool.urlopen("POST", "/api/generate", body=b"{}", preload_content=False, decode_content=False)


def test_chunks_lines_already_here_make_one_piece_and_a_late_line_is_not_waited_for(raw):
    release = threading.Event()

    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES)[: -len(b"0\r\n\r\n")])
        release.wait(5)
        conn.sendall(chunked(b'{"done":true}\n'))

    body = chunks.pieces(open_body(raw(script)), 65536)
    started = time.monotonic()
    first = next(body)
    assert first == b"".join(LINES)  # ten chunks that arrived together: one piece, one write to the client
    assert time.monotonic() - started < 1  # and it did not wait for the line that had not arrived
    release.set()
    assert list(body) == [b'{"done":true}\n']


def test_chunks_piece_never_exceeds_the_size(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES))

    pieces = list(chunks.pieces(open_body(raw(script)), 100))
    assert b"".join(pieces) == b"".join(LINES)
    assert all(len(piece) <= 100 for piece in pieces) and len(pieces) > 1


def test_chunks_upstream_dying_mid_piece_relays_what_came_then_raises(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES[:3])[:-5] + b"40\r\npart")

    got = []
    with pytest.raises((urllib3.exceptions.HTTPError, OSError)):
        for piece in chunks.pieces(open_body(raw(script)), 65536):
            got.append(piece)
    assert b"".join(got).startswith(b"".join(LINES[:3]))  # every whole line that arrived reached the client


def test_chunks_sized_body_is_one_piece_and_ready_is_false_at_its_end(raw):
    body = b'{"response":"hello","done":true}'

    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(body))
        time.sleep(2)  # keep the connection open: ready() must not wait for bytes that will never come

    answer = open_body(raw(script))
    started = time.monotonic()
    assert list(chunks.pieces(answer, 65536)) == [body]
    assert not chunks.ready(answer) and time.monotonic() - started < 1


def test_chunks_ready_keeps_the_socket_timeout(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(LINES[0])[:-5])
        time.sleep(1)

    answer = open_body(raw(script))
    assert answer.read1(65536) == LINES[0]
    assert not chunks.ready(answer)  # nothing more yet, and no wait for it
    assert answer._fp.fp.raw._sock.gettimeout() == 5
