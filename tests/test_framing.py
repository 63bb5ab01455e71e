"""Reading the upstream in pieces (framing.py): lines already here go out together, a line alone goes out at once."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from proxy_app.relay import framing
from proxy_app.relay.upstream import Pool
from tests.raw_upstream import RawUpstream, chunked, read_request, reply, response

NDJSON = "application/x-ndjson"
LINES = [b'{"response":"w%d","done":false}\n' % n for n in range(10)]


_answers: list = []  # every answer a test opened, closed when it ends (its connection with it)


@pytest.fixture
def raw():
    made: list[tuple[RawUpstream, Pool]] = []

    def start(script) -> Pool:
        upstream = RawUpstream(script)
        made.append((upstream, Pool(f"http://127.0.0.1:{upstream.port}", 5, 5, keep=10)))
        return made[-1][1]

    yield start
    while _answers:
        answer = _answers.pop()
        answer.close()
        answer.connection.close()
    for upstream, pool in made:
        pool.close()
        upstream.close()


def open_body(pool: Pool):
    _answers.append(pool.request("POST", "/api/generate", b"{}", {"Content-Length": "2"}))
    return _answers[-1]


def test_chunks_lines_already_here_make_one_piece_and_a_late_line_is_not_waited_for(raw):
    release = threading.Event()

    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES)[: -len(b"0\r\n\r\n")])
        release.wait(5)
        conn.sendall(chunked(b'{"done":true}\n'))

    body = framing.pieces(open_body(raw(script)), 65536)
    started = time.monotonic()
    first = next(body)
    assert first == b"".join(LINES)  # ten chunks that arrived together: one piece, one write to the client
    assert time.monotonic() - started < 1  # and it did not wait for the line that had not arrived
    release.set()
    assert list(body) == [b'{"done":true}\n']


def test_chunks_piece_never_exceeds_the_size(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES))

    pieces = list(framing.pieces(open_body(raw(script)), 100))
    assert b"".join(pieces) == b"".join(LINES)
    assert all(len(piece) <= 100 for piece in pieces) and len(pieces) > 1


def test_chunks_upstream_dying_mid_piece_relays_what_came_then_raises(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES[:3])[:-5] + b"40\r\npart")

    got = []
    with pytest.raises(framing.BrokenBody):
        for piece in framing.pieces(open_body(raw(script)), 65536):
            got.append(piece)
    assert b"".join(got).startswith(b"".join(LINES[:3]))  # every whole line that arrived reached the client


def test_chunks_sized_body_is_one_piece_and_ends_without_waiting(raw):
    body = b'{"response":"hello","done":true}'
    script = reply(response(body), then_close=False)  # the end of the body is its length, not a close
    started = time.monotonic()
    assert list(framing.pieces(open_body(raw(script)), 65536)) == [body]
    assert time.monotonic() - started < 1


def test_chunks_sized_body_cut_short_raises_after_relaying_what_came(raw):
    body = framing.pieces(open_body(raw(reply(response(b'{"response":"hel', length=40)))), 65536)
    assert next(body) == b'{"response":"hel'
    with pytest.raises(framing.BrokenBody, match="24 body bytes still to come"):
        next(body)


def test_chunks_body_without_length_ends_when_the_upstream_closes(raw):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    assert b"".join(framing.pieces(open_body(raw(reply(head + b"until the end"))), 65536)) == b"until the end"


def test_chunks_connection_is_reused_after_a_whole_chunked_body(raw):
    def script(upstream, conn: socket.socket) -> None:
        conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES))
        while read_request(conn):  # every later request on this connection gets the same answer
            conn.sendall(response(framing="chunked", content_type=NDJSON) + chunked(*LINES))

    pool, sockets = raw(script), set()
    for _ in range(3):
        answer = open_body(pool)
        assert b"".join(framing.pieces(answer, 65536)) == b"".join(LINES)
        sockets.add(answer.connection.sock)
        pool.release(answer)
    assert len(sockets) == 1 and None not in sockets  # one connection, open, carried all three


def test_chunks_bytes_after_the_body_close_the_connection(raw):
    pool = raw(reply(response(framing="chunked", content_type=NDJSON) + chunked(LINES[0]) + b"junk", False))
    answer = open_body(pool)
    assert list(framing.pieces(answer, 65536)) == [LINES[0]]
    pool.release(answer)
    assert not pool._idle and answer.connection.sock is None  # closed, not handed to the next request


FRAMED = b"5;name=value\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: yes\r\n\r\nnext"


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(FRAMED)])
def test_chunks_framing_split_anywhere_gives_the_same_data(step):
    decoder = framing.Framing()
    data = b"".join(decoder.feed(FRAMED[at : at + step]) for at in range(0, len(FRAMED), step))
    assert data == b"hello" + b"x" * 26
    assert decoder.ended and decoder.rest.endswith(b"next")  # extensions and trailers skipped, the rest kept


@pytest.mark.parametrize(
    "data, message",
    [
        (b"zz\r\n", "invalid chunk size"),
        (b"-5\r\nhello\r\n", "invalid chunk size"),
        (b"0x5\r\nhello\r\n", "invalid chunk size"),
        (b"5\nhello\r\n", "invalid chunk size"),  # bare LF
        (b"5\r\r\nhello\r\n", "invalid chunk size"),
        (b"5 5\r\nhello\r\n", "invalid chunk size"),
        (b" 5\r\nhello\r\n", "invalid chunk size"),
        (b"1" * 21 + b"\r\n", "invalid chunk size"),
        (b"3\r\nhello\r\n", "does not end where its size says"),
        (b"5\r\nhello\n0\r\n\r\n", "does not end where its size says"),
        (b"0\r\nno colon\r\n\r\n", "invalid trailer line"),
        (b"0\r\n folded\r\n\r\n", "continuation line"),
        (b"1" * 20000, "does not end"),
    ],
)
def test_chunks_framing_refuses_what_is_not_chunked(data, message):
    with pytest.raises(framing.BrokenBody, match=message):
        framing.Framing().feed(data)
