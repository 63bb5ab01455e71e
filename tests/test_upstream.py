"""The upstream pool (upstream.py): connections reused only when whole, closed when not, and clear errors."""

from __future__ import annotations

import http.client
import io
import itertools
import socket

import pytest
from urllib3.util.wait import wait_for_read

from proxy_app.relay import framing
from proxy_app.relay import upstream as upstream_module
from proxy_app.relay.upstream import Pool, Unreachable, read_head
from tests.conftest import free_port
from tests.processes import wait_until
from tests.raw_upstream import TLS, RawUpstream, chunked, read_request, reply, response, tls_upstream

# http.client refuses a head of more than 100 lines, the empty line that ends it included.
MAX_HEADER_FIELDS = 99


def answer_every_request(head_only: bool = False):
    """Script: answer each request on the connection with a small JSON body (or a bodiless 204)."""

    def script(upstream, conn: socket.socket) -> None:
        request = True
        while request:
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n" if head_only else response(b'{"ok":true}'))
            request = read_request(conn)

    return script


@pytest.fixture
def upstream():
    made: list[tuple[RawUpstream, Pool]] = []

    def start(script) -> tuple[RawUpstream, Pool]:
        raw = RawUpstream(script)
        made.append((raw, Pool(raw.url, 5, 5, keep=2)))
        return made[-1]

    yield start
    for raw, pool in made:
        pool.close()
        raw.close()


def call(pool: Pool, method: str = "POST", body: bytes | None = b"{}"):
    headers = {} if body is None else {"Content-Length": str(len(body))}
    return pool.request(method, "/api/generate", body, headers)


def test_pool_reuses_a_connection_whose_body_was_read_to_the_end(upstream):
    raw, pool = upstream(answer_every_request())
    for _ in range(3):
        answer = call(pool)
        assert b"".join(framing.pieces(answer, 65536)) == b'{"ok":true}'
        pool.release(answer)
    assert raw.accepted == 1


def test_pool_closes_a_connection_released_before_its_end_so_the_upstream_sees_it(upstream):
    raw, pool = upstream(answer_every_request())
    answer = call(pool)  # body never read: a client that left
    pool.release(answer, reusable=False)
    assert answer.connection.sock is None and not pool._idle
    pool.release(call(pool))  # also not whole (unread), so not kept either
    assert not pool._idle and raw.accepted == 2


def test_pool_keeps_at_most_keep_connections(upstream):
    raw, pool = upstream(answer_every_request())
    answers = [call(pool) for _ in range(3)]  # three at once: three connections
    for answer in answers:
        assert b"".join(framing.pieces(answer, 65536)) == b'{"ok":true}'
        pool.release(answer)
    assert len(pool._idle) == 2 and raw.accepted == 3  # keep=2: the third is closed
    pool.close()
    assert not pool._idle


def test_pool_closes_a_connection_released_after_the_pool_was_closed(upstream):
    raw, pool = upstream(answer_every_request(head_only=True))
    answer = call(pool, "GET", None)  # in use while the pool closes: a call still streaming at shutdown
    pool.close()
    pool.release(answer)
    assert answer.connection.sock is None and not pool._idle


def test_pool_sends_no_content_length_for_a_get_without_body(upstream):
    raw, pool = upstream(answer_every_request())
    pool.release(call(pool, "GET", None), reusable=False)
    assert b"content-length" not in raw.wait_for_requests(1)[0].lower()


class SendRecorder:
    """A socket that notes the data of each ``sendall`` and leaves everything else to the real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sends = sock, []

    def sendall(self, data) -> None:
        self.sends.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize(("size", "sends"), [(2, 1), (upstream_module.COALESCE_BYTES, 1),
                                             (upstream_module.COALESCE_BYTES + 1, 2)])  # fmt: skip
def test_connection_sends_the_head_and_a_small_body_at_once(upstream, size, sends):
    raw, _ = upstream(answer_every_request())
    connection = upstream_module.HTTPConnection("127.0.0.1", raw.port, timeout=5)
    connection.read_timeout = 5
    connection.connect()
    connection.sock = recorder = SendRecorder(connection.sock)
    body = b"x" * size
    try:
        connection.request("POST", "/api/generate", body=body, headers={"Content-Length": str(size)})
        answer = connection.getresponse()
        assert answer.status == 200 and answer.read() == b'{"ok":true}'
    finally:
        connection.close()
    assert raw.wait_for_requests(1)[0].endswith(b"\r\n\r\n" + body)
    assert len(recorder.sends) == sends
    assert recorder.sends[0].startswith(b"POST /api/generate HTTP/1.1\r\n") and recorder.sends[-1].endswith(body)


def test_pool_refused_connection_is_unreachable():
    pool = Pool(f"http://127.0.0.1:{free_port()}", 5, 5, keep=2)
    with pytest.raises(Unreachable, match="refused"):
        call(pool)


def test_pool_replaces_a_connection_the_upstream_closed_while_idle(upstream):
    raw, pool = upstream(lambda raw, conn: conn.sendall(response(b"{}")))  # answers once, then closes
    for _ in range(2):
        answer = call(pool)
        assert b"".join(framing.pieces(answer, 65536)) == b"{}"
        pool.release(answer)
        assert wait_for_read(pool._idle[-1].sock, 5)  # kept, and then closed by the upstream
    assert raw.accepted == 2  # the dead one was noticed before use, not sent a request that would fail


def test_pool_https_upstream_relays_a_stream_and_checks_its_certificate(monkeypatch):
    lines = [b'{"model":"m","created_at":"t","response":"hi","done":false}\n', b'{"model":"m","done":true}\n']
    answer = response(framing="chunked", content_type="application/x-ndjson") + chunked(*lines)
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "cert.pem"))  # trust the test certificate, as a CA bundle would
    with tls_upstream(answer) as url:
        pool = Pool(url, 5, 5, keep=2)
        streamed = pool.request("POST", "/api/generate", b"{}", {"Content-Length": "2"})
        assert b"".join(framing.pieces(streamed, 65536)) == b"".join(lines)
        pool.release(streamed)
        pool.close()
    monkeypatch.delenv("SSL_CERT_FILE")
    with tls_upstream(answer) as url, pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
        call(Pool(url, 5, 5, keep=2))  # an unknown certificate is refused, not trusted


def test_read_head_keeps_names_and_values_as_sent_and_joins_folded_lines():
    head = b"Content-Type: application/json\r\nX-Folded: one\r\n\t two\r\nx-empty:\r\nSet-Cookie: a\r\n"
    head += b"Set-Cookie: b\r\nX-Spaces:  padded value \t\r\n\r\nbody"
    reader = io.BytesIO(head)
    headers = read_head(http.client.parse_headers(reader))
    assert list(headers.items()) == [
        ("Content-Type", "application/json"), ("X-Folded", "one two"), ("x-empty", ""), ("Set-Cookie", "a"),
        ("Set-Cookie", "b"), ("X-Spaces", "padded value"),
    ]  # fmt: skip
    assert headers.get("content-type") == "application/json" and "X-EMPTY" in headers
    assert (headers.get("SET-COOKIE"), headers.get("X-Missing"), headers.get("X-Missing", "")) == ("a", None, "")
    assert "Content-Length" not in headers and len(headers) == 6
    assert reader.read() == b"body"  # not a byte of the body was read


@pytest.mark.parametrize(
    "line",
    [b"no colon here", b"Bad Name: x", b": no name", b"X-Bare-CR: a\rb", b"\r", b"X-Long: " + b"a" * 70000],
    ids=["no colon", "space in name", "empty name", "bare CR", "only CR", "too long"],
)
def test_read_head_refuses_lines_that_are_no_header_field(line):
    with pytest.raises(http.client.HTTPException):
        read_head(http.client.parse_headers(io.BytesIO(b"X-Ok: 1\r\n" + line + b"\r\n\r\n")))


def test_read_head_refuses_more_headers_than_http_client_allows():
    head = b"".join(b"X-%d: %d\r\n" % (n, n) for n in range(MAX_HEADER_FIELDS + 1)) + b"\r\n"
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        read_head(http.client.parse_headers(io.BytesIO(head)))
    assert len(read_head(http.client.parse_headers(io.BytesIO(head[head.index(b"X-1:") :])))) == MAX_HEADER_FIELDS


def test_pool_takes_a_content_length_with_blanks_around_it_as_its_length(upstream):
    raw, pool = upstream(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2 \t\r\n\r\n{}", then_close=False))
    answer = call(pool)
    assert answer.length == 2 and b"".join(framing.pieces(answer, 65536)) == b"{}"
    pool.release(answer)
    assert len(pool._idle) == 1  # the body ended at its length, so the connection takes the next request


@pytest.mark.parametrize("line", [b"no colon here", b"Bad Name: x", b": no name", b"From someone"])
def test_pool_refuses_an_answer_with_a_line_that_is_no_header_field(upstream, line):
    # http.client's email parser alone would drop this line and every field after it, Content-Length included.
    head = b"HTTP/1.1 200 OK\r\nX-Ok: 1\r\n" + line + b"\r\nContent-Length: 2\r\nX-After: 1\r\n\r\n{}"
    raw, pool = upstream(reply(head, then_close=False))
    with pytest.raises(http.client.HTTPException, match="invalid header line from the upstream"):
        call(pool)
    assert not pool._idle


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", True),
    ],
    ids=["after 100 Continue", "Connection: close", "HTTP/1.0", "HTTP/1.0 keep-alive"],
)
def test_pool_keeps_a_connection_only_when_the_answer_allows_it(upstream, head, kept):
    raw, pool = upstream(reply(head + b"{}", then_close=False))
    answer = call(pool)
    assert answer.status == 200 and b"".join(framing.pieces(answer, 65536)) == b"{}"
    pool.release(answer)
    assert len(pool._idle) == int(kept)


@pytest.mark.parametrize("status_line", [b"HTTP/2 200 OK", b"SPDY/3 200 OK", b"HTTP/1.1 abc OK"])
def test_pool_refuses_an_answer_that_is_no_http_1(upstream, status_line):
    raw, pool = upstream(reply(status_line + b"\r\nContent-Length: 2\r\n\r\n{}"))
    with pytest.raises(http.client.HTTPException):
        call(pool)


# ---- an upstream's answers must never reach another call (pool poisoning) -------------------------------------------

OWN = response(b'{"own":true}')
STRAY = response(b'{"evil":true}')  # an answer that belongs to no call: no later call may ever get it
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


def numbered_answers(*interim: bytes):
    """Script: answer every request with the ``interim`` (1xx) heads, then a 200 whose body numbers the request."""
    served = itertools.count(1)

    def script(upstream, conn: socket.socket) -> None:
        request = True
        while request:
            conn.sendall(b"".join(interim) + response(b'{"n":%d}' % next(served)))
            request = read_request(conn)

    return script


@pytest.mark.parametrize(
    "interim",
    [[EARLY_HINTS], [b"HTTP/1.1 102 Processing\r\n\r\n", EARLY_HINTS], [b"HTTP/1.1 100 Continue\r\n\r\n", EARLY_HINTS,
     b"HTTP/1.1 199 Whatever\r\nX-A: 1\r\n\r\n"]],
    ids=["103", "102-103", "100-103-199"],
)  # fmt: skip
def test_pool_skips_interim_answers_so_each_call_gets_its_own(upstream, interim):
    raw, pool = upstream(numbered_answers(*interim))
    for n in range(1, 4):
        answer = call(pool)
        assert (answer.status, b"".join(framing.pieces(answer, 65536))) == (200, b'{"n":%d}' % n)
        pool.release(answer)
    assert raw.accepted == 1  # the interim answers left the connection clean, so it carried all three


def test_pool_refuses_more_interim_answers_than_any_server_sends(upstream):
    raw, pool = upstream(reply(EARLY_HINTS * (upstream_module.MAX_INTERIM_ANSWERS + 1) + OWN, then_close=False))
    with pytest.raises(http.client.HTTPException, match="interim answers"):
        call(pool)
    assert not pool._idle


def test_pool_refuses_a_switch_of_protocols_and_closes_the_connection(upstream):
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"
    raw, pool = upstream(reply(switch, then_close=False))
    with pytest.raises(http.client.HTTPException, match="101"):  # the proxy relays no upgrades: 502 for the client
        call(pool)
    assert not pool._idle
    wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")


BODILESS = {
    "204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    "304": ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
    "HEAD": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"),
}


def stray_after_bodiless(first: bytes, late: bool):
    """Script: a POST gets its own answer; any other request gets ``first`` (an answer without a body) followed by
    a stray answer, at once or ``late``: only once the next request is in, as bytes delayed on the network are."""

    def script(upstream, conn: socket.socket) -> None:
        request, owed = upstream.requests[-1], b""
        while request:
            if request.startswith(b"POST"):
                conn.sendall(owed + OWN)
                owed = b""
            else:
                conn.sendall(first if late else first + STRAY)
                owed = STRAY if late else b""
            request = read_request(conn)

    return script


@pytest.mark.parametrize("late", [False, True], ids=["at-once", "late"])
@pytest.mark.parametrize("case", BODILESS)
def test_pool_never_hands_on_the_connection_of_an_answer_without_body(upstream, case, late):
    method, first = BODILESS[case]
    raw, pool = upstream(stray_after_bodiless(first, late))
    answer = pool.request(method, "/", None, {})
    assert answer.status == int(first[9:12])
    pool.release(answer)  # what forward.py does with an answer that has no body
    second = call(pool)
    assert (second.status, b"".join(framing.pieces(second, 65536))) == (200, b'{"own":true}')
    pool.release(second)


# ---- framing a bad upstream announces (RFC 9112 6.3) -------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 2\r\nContent-Length: 3", b"Content-Length: 2, 3", b"Content-Length: +2", b"Content-Length: 2_0",
     b"Content-Length: -2", b"Content-Length: 0x2", b"Content-Length: \xc2\xb2", b"Content-Length: 1 2",
     b"Content-Length: ", b"Content-Length: " + b"9" * 5000],
    ids=["two-fields", "two-values", "plus", "underscore", "negative", "hex", "superscript", "space", "empty",
         "5000-digits"],
)  # fmt: skip
def test_pool_refuses_an_answer_with_conflicting_or_invalid_content_length(upstream, lengths):
    raw, pool = upstream(reply(b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\n\r\n{}", then_close=False))
    with pytest.raises(http.client.HTTPException, match="Content-Length"):
        call(pool)
    assert not pool._idle
    wait_until(lambda: raw.closed_at, timeout=5, message="the upstream connection closed")


@pytest.mark.parametrize(
    "lengths", [b"Content-Length: 2, 2", b"Content-Length: 2\r\nContent-Length: 2", b"Content-Length: 2 \t"]
)
def test_pool_takes_repeated_equal_content_lengths_as_one(upstream, lengths):
    raw, pool = upstream(reply(b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\n\r\n{}"))
    answer = call(pool)
    assert answer.length == 2 and b"".join(framing.pieces(answer, 65536)) == b"{}"
    pool.release(answer)


def test_pool_drops_a_content_length_sent_beside_transfer_encoding(upstream):
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = b'{"response":"longer than the stale length","done":true}'
    raw, pool = upstream(reply(head + chunked(body), then_close=False))
    answer = call(pool)
    assert [name for name, _ in answer.head.items()] == ["Content-Type", "Transfer-Encoding"]  # never relayed
    assert b"".join(framing.pieces(answer, 65536)) == body  # framed by the chunks, not by the stale length
    pool.release(answer)
    assert not pool._idle  # an answer framed two ways is no connection to trust with another call


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2",
     b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked"],
    ids=["gzip-chunked", "gzip", "chunked-twice", "two-fields", "identity", "http-1.0"],
)  # fmt: skip
def test_pool_refuses_a_transfer_encoding_other_than_chunked(upstream, head):
    raw, pool = upstream(reply(head + b"\r\n\r\n" + chunked(b"{}"), then_close=False))
    with pytest.raises(http.client.HTTPException, match="Transfer-Encoding"):
        call(pool)
    assert not pool._idle


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x00b", b"\x7f", b"a\x1bb", b"a\x0bb", b"a\x0cb", b"a\x1cb"])
def test_read_head_refuses_a_control_character_in_a_value(value):
    with pytest.raises(http.client.HTTPException, match="control character"):
        read_head(http.client.parse_headers(io.BytesIO(b"X-Ok: 1\r\nX-Bad: " + value + b"\r\n\r\n")))


def test_read_head_keeps_tabs_and_obs_text_in_a_value():
    head = read_head(http.client.parse_headers(io.BytesIO(b"X-Tab: a\tb\r\nX-Latin: caf\xe9 \x85\xff\r\n\r\n")))
    assert list(head.items()) == [("X-Tab", "a\tb"), ("X-Latin", "caf\xe9 \x85\xff")]  # RFC 9110 field-vchar
