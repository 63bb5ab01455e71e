"""Streams relayed by the front's event loop (service/loop_relay.py, relay/on_loop.py): what arrives is what the
client gets, the loop lets go of the upstream socket at the end, it stops reading while the client does not take
what is sent, and every way a body can end early ends it in the stream's own error shape, recorded.

The proxy runs behind the front ``serve`` runs (``proxy_for``: tests/conftest.py); the upstream is a raw socket
server, so each test decides the exact bytes and their timing.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time

import pytest

from proxy_app import create_app, shutdown
from proxy_app.service.front import Front
from proxy_app.service.loop_relay import OUTBUF_LIMIT, READ_SIZE, LoopTask, Pump
from proxy_app.state import state_of
from tests.conftest import serve_proxy
from tests.processes import wait_until
from tests.raw_upstream import RawUpstream, read_request, reply

STREAM = b'{"model":"llama3.2","prompt":"hi"}'
SOURCE = "127.0.0.3"  # a client address no other test uses (Linux answers on all of 127.0.0.0/8)
# The head and chunks of a stream as Ollama writes them: streamResponse in server/routes.go, one line per flush,
# each framed by Go's net/http/internal/chunked.go (hex size, CRLF, data, CRLF).
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
WHOLE = b'{"model":"llama3.2","response":"t","done":true,"eval_count":1}'  # a stream:false answer


def line(n: int, done: bool = False) -> bytes:
    if done:
        return b'{"model":"llama3.2","response":"","done":true,"prompt_eval_count":3,"eval_count":%d}\n' % n
    return b'{"model":"llama3.2","response":"t%d","done":false}\n' % n


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def pumps(served: Front) -> list[Pump]:
    return [item for item in list(served.map.values()) if isinstance(item, Pump)]


def connect(port: int, source: str | None = None) -> socket.socket:
    """A connection to the proxy, from ``source`` when given (an address of the test's own)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=source and (source, 0))


def ask(port: int, body: bytes = STREAM, source: str | None = None) -> socket.socket:
    sock = connect(port, source)
    sock.sendall(generate_request(body))
    return sock


def generate_request(body: bytes = STREAM, version: bytes = b"1.1", more: bytes = b"") -> bytes:
    return (b"POST /api/generate HTTP/%s\r\nHost: localhost\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (version, more, len(body), body))  # fmt: skip


def read_answer(sock: socket.socket) -> bytes:
    """The de-chunked body of the answer on ``sock`` (read to its last chunk)."""
    return read_head_and_body(sock)[1]


def read_head_and_body(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head (lowered) and the de-chunked body of the answer on ``sock``, read to its last chunk and no further."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += _recv(sock)
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += _recv(sock)
        if size == 0:
            assert rest == b"\r\n", rest  # no trailer, and nothing after the answer
            return head.lower(), body
        body, rest = body + rest[:size], rest[size + 2 :]


def read_whole(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head (lowered) and body of an answer with Content-Length on ``sock``, read to its end and no further."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += _recv(sock)
    assert len(body) == length, body
    return head.lower(), body


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the proxy closed the connection before the last chunk"
    return data


class Replay:
    """A socket whose first ``recv`` gives back ``data`` already read from it."""

    def __init__(self, data: bytes, sock: socket.socket) -> None:
        self.data, self.sock = data, sock

    def recv(self, size: int) -> bytes:
        data, self.data = self.data, b""
        return data or self.sock.recv(size)


def two_lines_or_whole(streamed: bool) -> bytes:
    """Ollama's answer: a stream of two lines (``line(0)``, a done line), or a whole WHOLE with Content-Length."""
    if streamed:
        return HEAD + chunk(line(0)) + chunk(line(1, done=True)) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
    return head % len(WHOLE) + WHOLE


def every_request(answer: bytes, again: list | None = None):
    """Script: ``answer`` each request on the connection; the requests after its first go to ``again``."""

    def script(upstream, conn):  # the connection's first request was read (raw_upstream.py)
        conn.sendall(answer)
        while request := read_request(conn):
            if again is not None:
                again.append(request)
            conn.sendall(answer)

    return script


def paced(*parts: bytes, pause: float = 0.05):
    """Script: send each part apart, then hold the connection until the proxy closes it."""

    def script(upstream, conn):
        for part in parts:
            conn.sendall(part)
            time.sleep(pause)
        reply(b"", then_close=False)(upstream, conn)

    return script


def test_loop_relay_relays_a_stream_on_the_loop_as_it_arrived(proxy_for):
    """Chunks split across reads, several in one read, and a chunk extension: the client gets the data as sent,
    while a pump (not the call's thread) holds the upstream socket; the row has Ollama's counts."""
    lines = [line(n) for n in range(5)] + [line(5, done=True)]
    framed = b"".join(chunk(piece) for piece in lines[:3])
    parts = [HEAD + framed[:7], framed[7:120], framed[120:] + b"%x;ext=1\r\n" % len(lines[3]),
             lines[3] + b"\r\n" + chunk(lines[4]), chunk(lines[5]) + b"0\r\n\r\n"]  # fmt: skip
    raw = RawUpstream(paced(*parts))
    try:
        handle, _, recorder = proxy_for(raw.url)
        sock = ask(handle.port)
        wait_until(lambda: pumps(handle.front), timeout=5, message="a pump relays the stream")
        assert read_answer(sock) == b"".join(lines)
        sock.close()
        call = recorder.wait_for(1)[0]
        assert (call.outcome, call.http_status, call.input_tokens, call.output_tokens) == ("completed", 200, 3, 5)
        assert call.response_size_bytes == len(b"".join(lines))
        assert pumps(handle.front) == []
    finally:
        raw.close()


def test_loop_relay_gives_the_connection_back_for_the_next_call(proxy_for):
    """A stream the loop relayed to its end leaves its upstream connection whole: the next call reuses it."""
    whole = HEAD + chunk(line(0)) + chunk(line(1, done=True)) + b"0\r\n\r\n"
    again = []  # requests that came on a connection which had carried one before
    raw = RawUpstream(every_request(whole, again))
    try:
        handle, _, recorder = proxy_for(raw.url)
        for _ in range(2):
            with ask(handle.port) as sock:
                assert read_answer(sock) == line(0) + line(1, done=True)
        assert [call.outcome for call in recorder.wait_for(2)] == ["completed", "completed"]
        assert len(again) == 1 and again[0].startswith(b"POST /api/generate") and again[0].endswith(STREAM)
        assert pumps(handle.front) == []
    finally:
        raw.close()


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "thread"])
def test_loop_relay_client_keeps_its_connection_after_a_stream(proxy_for, loop):
    """An HTTP/1.1 stream ends with its last chunk, so its client keeps the connection for its next call, as Go's
    server (Ollama) lets it, on the loop and on a thread; a client that asks to close gets the close it asked for."""
    lines = line(0) + line(1, done=True)
    raw = RawUpstream(every_request(two_lines_or_whole(streamed=True)))
    try:
        handle, _, recorder = proxy_for(raw.url, options=None if loop else {})
        with connect(handle.port) as sock:
            for _ in range(3):
                sock.sendall(generate_request())
                head, body = read_head_and_body(sock)
                assert body == lines
                assert b"connection: close" not in head
            sock.sendall(generate_request(more=b"Connection: close\r\n"))
            head, body = read_head_and_body(sock)
            assert body == lines and b"connection: close" in head
            sock.settimeout(5)
            assert sock.recv(1) == b"", "the proxy closes the connection its client asked to close"
        assert [call.outcome for call in recorder.wait_for(4)] == ["completed"] * 4
    finally:
        raw.close()


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "whole"])
def test_loop_relay_a_stopping_server_closes_each_connection_after_its_next_answer(proxy_for, streamed):
    """Once the server stops (``guard.stopping``, set where it stops accepting), a kept-alive connection's next
    answer says ``Connection: close`` and the connection closes after it, as Go's server does on Shutdown: clients
    that keep calling on their connections cannot hold a stop off until its deadline."""
    raw = RawUpstream(every_request(two_lines_or_whole(streamed)))
    try:
        handle, _, recorder = proxy_for(raw.url)
        with connect(handle.port) as sock:
            heads = []
            for stopping in (False, True):
                handle.front.guard.stopping = stopping
                sock.sendall(generate_request())
                head, body = read_head_and_body(sock) if streamed else read_whole(sock)
                assert body == (line(0) + line(1, done=True) if streamed else WHOLE)
                heads.append(head)
            assert [b"connection: close" in head for head in heads] == [False, True]
            sock.settimeout(5)
            assert sock.recv(1) == b"", "the connection closes after the answer"
        assert [call.outcome for call in recorder.wait_for(2)] == ["completed"] * 2
    finally:
        raw.close()


@pytest.mark.parametrize("ending", ["closed", "silent", "bad framing"])
def test_loop_relay_ends_a_broken_stream_in_its_shape_and_records_it(proxy_for, ending):
    """The upstream closes mid-body, falls silent past READ_TIMEOUT, or sends invalid framing: the client gets the
    lines that came and an error line, the call is recorded as an upstream error, and the connection is dropped."""
    first = HEAD + chunk(line(0))
    script = {"closed": reply(first), "silent": reply(first, then_close=False),
              "bad framing": reply(first + b"zz\r\n", then_close=False)}[ending]  # fmt: skip
    raw = RawUpstream(script)
    try:
        handle, _, recorder = proxy_for(raw.url, READ_TIMEOUT="0.5")
        with ask(handle.port) as sock:
            body = read_answer(sock)
        assert body.startswith(line(0))
        error = json.loads(body[len(line(0)) :])["error"]
        assert error.startswith("upstream connection lost: ")
        call = recorder.wait_for(1)[0]
        assert (call.outcome, call.http_status) == ("upstream_error", 200)
        assert call.error_message == error
        if ending != "closed":  # the proxy closes it (the upstream closed it itself otherwise)
            wait_until(lambda: raw.closed_at, timeout=3, message="the upstream connection closed")
        assert pumps(handle.front) == []
    finally:
        raw.close()


def test_loop_relay_stops_reading_while_the_client_takes_nothing(proxy_for):
    """A client that reads nothing holds at most about OUTBUF_LIMIT of its stream in the proxy; the rest waits in
    the upstream's socket, and the whole body still arrives intact once the client reads, even after a pause longer
    than READ_TIMEOUT (the upstream was not silent: the proxy was not reading)."""
    lines = [b'{"n":%d,"pad":"%s","done":false}\n' % (n, b"x" * 4000) for n in range(2500)]  # about 10 MB
    lines.append(line(2500, done=True))
    body = HEAD + b"".join(chunk(piece) for piece in lines) + b"0\r\n\r\n"
    sent = []

    def big(upstream, conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        for at in range(0, len(body), 65536):
            conn.sendall(body[at : at + 65536])
            sent.append(at)
        reply(b"", then_close=False)(upstream, conn)

    raw = RawUpstream(big)
    try:
        handle, _, recorder = proxy_for(raw.url, READ_TIMEOUT="0.5")
        sock = ask(handle.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        wait_until(lambda: pumps(handle.front), timeout=5, message="a pump relays the stream")
        held = []
        for _ in range(20):
            time.sleep(0.05)
            held.append(max((channel.total_outbufs_len for channel in handle.front.channels()), default=0))
        assert max(held) <= OUTBUF_LIMIT + READ_SIZE + 64 * 1024
        assert sent[-1] < len(body) - 4 * 1024 * 1024, "the upstream could send it all: nothing held it back"
        assert read_answer(sock) == b"".join(lines)
        sock.close()
        assert recorder.wait_for(1)[0].outcome == "completed"
    finally:
        raw.close()


def test_loop_relay_not_offered_where_the_loop_uses_select(tmp_path):
    """A front whose loop uses select() (Windows: about 512 sockets in all) keeps every stream on its thread, so
    pumps never crowd out the clients' own sockets; the stream still arrives whole."""
    lines = [line(n) for n in range(3)] + [line(3, done=True)]
    raw = RawUpstream(paced(HEAD, *(chunk(piece) for piece in lines), b"0\r\n\r\n"))
    app = create_app({"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}, environ={})
    handle = serve_proxy(app, threads=4, options={})
    assert not handle.front.server.adj.asyncore_use_poll
    seen = []
    try:
        with ask(handle.port) as sock:
            watcher = threading.Thread(target=lambda: seen.extend(_pumps_for(handle.front, 0.3)), daemon=True)
            watcher.start()
            assert read_answer(sock) == b"".join(lines)
            watcher.join()
        assert seen == []
    finally:
        handle.close()
        raw.close()
        shutdown(app)


def _pumps_for(served: Front, seconds: float) -> list[Pump]:
    """Every pump seen in ``served``'s map over ``seconds``."""
    found, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        found += pumps(served)
        time.sleep(0.01)
    return found


def test_loop_relay_leaves_nothing_for_the_garbage_collector(proxy_for):
    """A relayed stream's task, environ and request body are freed when the call ends, not at some later collection
    of reference cycles (a long stream's would have aged into the oldest generation, collected least often)."""
    lines = [line(0), line(1, done=True)]
    raw = RawUpstream(every_request(HEAD + b"".join(chunk(piece) for piece in lines) + b"0\r\n\r\n"))
    gc.collect()
    gc.disable()
    try:
        handle, _, recorder = proxy_for(raw.url)
        for _ in range(3):
            with ask(handle.port) as sock:
                assert read_answer(sock) == b"".join(lines)
        recorder.wait_for(3)
        wait_until(lambda: not [item for item in gc.get_objects() if isinstance(item, LoopTask)], timeout=3,
                   message="every task freed")  # fmt: skip
    finally:
        gc.enable()
        raw.close()


def test_loop_relay_pumps_do_not_count_as_client_connections(tmp_path):
    """The connection limit counts clients: the pumps of streams in progress (and the listener and the trigger,
    also in the loop's map) leave room for as many clients as the limit says."""
    lines = [line(0), line(1, done=True)]
    whole = HEAD + b"".join(chunk(piece) for piece in lines) + b"0\r\n\r\n"
    connections = []

    def script(upstream, conn):  # the first two streams stay open while a third client asks
        connections.append(conn)
        held = len(connections) <= 2
        (paced(HEAD, chunk(lines[0]), pause=3.0) if held else every_request(whole))(upstream, conn)

    raw = RawUpstream(script)
    app = create_app({"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR"}, environ={})
    handle = serve_proxy(app, threads=4, options={"connection_limit": 3, "asyncore_use_poll": True})
    held = []
    try:
        held = [ask(handle.port) for _ in range(2)]
        wait_until(lambda: len(pumps(handle.front)) == 2, timeout=5, message="a pump for each stream")
        with ask(handle.port) as sock:
            sock.settimeout(2)
            assert read_answer(sock) == b"".join(lines)
    finally:
        for sock in held:
            sock.close()
        handle.close()
        raw.close()
        shutdown(app)


ERROR_LINE = b'{"error":"an error was encountered while running the model"}\n'  # how Ollama ends a failed stream


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "thread"])
@pytest.mark.parametrize(
    ("last", "recorded"),
    [(line(1, done=True), ("completed", None, 3, 1)),
     (ERROR_LINE, ("upstream_error", "an error was encountered while running the model", None, None))],
    ids=["done", "error"],
)  # fmt: skip
def test_loop_relay_client_leaving_after_the_last_line_leaves_what_ollama_did(proxy_for, loop, last, recorded):
    """A client that closes once it has a stream's last line, before the body's closing chunk (Go's net/http writes
    it when the handler returns, after the last line's flush), had the whole answer: the call is recorded as Ollama
    ended it, completed with its counts or failed with its error line's message (the ollama client raises on that
    line and closes), on the loop and on a thread alike. Its upstream connection is closed, not reused."""
    lines = [line(0), last]
    raw = RawUpstream(reply(HEAD + b"".join(chunk(piece) for piece in lines), then_close=False))  # no last chunk yet
    try:
        handle, app, recorder = proxy_for(raw.url, options=None if loop else {})
        with ask(handle.port) as sock:
            received = b""
            while last not in received:
                received += _recv(sock)
        call = recorder.wait_for(1)[0]
        assert call.http_status == 200
        assert (call.outcome, call.error_message, call.input_tokens, call.output_tokens) == recorded
        wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")
        assert not state_of(app).upstream_pool._idle
    finally:
        raw.close()


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "whole"])
def test_loop_relay_a_client_at_its_connection_cap_is_never_refused_for_connections_it_closed(proxy_for, streamed):
    """A client that calls from as many connections as its cap allows, and closes each one and opens another after
    every answer (streamed or whole: the proxy keeps both open), never gets a 429: the connections it closed no longer
    count, although the loop may read their end after it has accepted the new connection."""
    raw = RawUpstream(every_request(two_lines_or_whole(streamed)))
    handle, _, _ = proxy_for(raw.url, MAX_CONNECTIONS_PER_CLIENT=4)
    heads: list[bytes] = []

    def client() -> None:
        for _ in range(40):
            head = b""
            try:
                with ask(handle.port, source=SOURCE) as sock:  # an address of its own: no other test's connections
                    head = sock.recv(65536)
                    while b"\r\n\r\n" not in head and (piece := sock.recv(65536)):
                        head += piece
                    if head.startswith(b"HTTP/1.1 200 ") and streamed:  # read to the end before connecting again
                        read_answer(Replay(head, sock))
                    elif head.startswith(b"HTTP/1.1 200 "):
                        while not head.endswith(WHOLE):
                            head += _recv(sock)
            except OSError as exc:  # a refused connection may be closed before the request is sent
                head = head or repr(exc).encode()
            heads.append(head.split(b"\r\n", 1)[0])

    try:
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(30)
        assert len(heads) == 160 and set(heads) == {b"HTTP/1.1 200 OK"}, sorted(set(heads))
    finally:
        raw.close()


def test_loop_relay_a_connection_whose_answer_is_not_taken_counts_until_it_closes(tmp_path):
    """A client that asks for an answer after which the connection closes and does not read it holds that connection
    until waitress gives up on it: it keeps counting towards its cap, so a client cannot hold more than its cap."""
    big = b'{"model":"llama3.2","response":"' + b"x" * (8 * 1024 * 1024) + b'","done":true}'
    raw = RawUpstream(every_request(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                    % (len(big), big)))  # fmt: skip
    settings = {"UPSTREAM": raw.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "ERROR", "MAX_CONNECTIONS_PER_CLIENT": 2}
    app = create_app(settings, environ={})
    handle = serve_proxy(app, threads=4)
    body = b'{"model":"llama3.2","prompt":"hi","stream":false}'
    unread = connect(handle.port, SOURCE)
    opened = [unread]
    try:
        unread.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_until(lambda: any(channel.close_when_flushed for channel in handle.front.channels()), timeout=10,
                   message="the answer ended, with its bytes not taken")  # fmt: skip
        second = connect(handle.port, SOURCE)
        opened.append(second)
        second.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert second.recv(4096).startswith(b"HTTP/1.1 200 ")
        third = connect(handle.port, SOURCE)
        opened.append(third)
        assert third.recv(4096).startswith(b"HTTP/1.1 429 ")
    finally:
        for sock in opened:
            sock.close()
        # the loop closes the channels, and with them the file waitress spilled the unsent answer to
        wait_until(lambda: not handle.front.channels(), timeout=10, message="the connections closed")
        handle.close()
        raw.close()
        shutdown(app)
