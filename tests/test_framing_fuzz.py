"""The chunk decoder (framing.Framing) against h11 as an oracle: for any bytes, split anywhere, then the end of the
connection, it accepts exactly what h11 accepts and yields the same data and the same bytes after the body.

h11 also checks the values of Content-Length and Transfer-Encoding fields sent as trailers; the decoder does not (it
drops every trailer), so those two names are left out of the generated trailers.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy_app.relay import framing

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def read_with_h11(pieces: list[bytes]) -> tuple:
    """("ended", data, rest) when h11 reads a whole chunked body from ``pieces`` and a close; else ("refused",)."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=framing.MAX_FRAMING_BYTES)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(HEAD)
    assert isinstance(connection.next_event(), h11.Response)
    data, ended = [], False
    try:
        for piece in [piece for piece in pieces if piece] + [b""]:  # b"": the upstream closes the connection
            connection.receive_data(piece)
            while (event := connection.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Data):
                    data.append(event.data)
                ended = ended or isinstance(event, h11.EndOfMessage)
                if isinstance(event, h11.ConnectionClosed):
                    break
    except h11.RemoteProtocolError:
        return ("refused",)
    return ("ended", b"".join(data), connection.trailing_data[0]) if ended else ("refused",)


def read_with_framing(pieces: list[bytes]) -> tuple:
    """The same for framing.Framing: a body not ended when the connection closes is refused, as pieces() does."""
    decoder, data = framing.Framing(), []
    try:
        for piece in pieces:
            data.append(decoder.feed(piece))
    except framing.BrokenBody:
        return ("refused",)
    return ("ended", b"".join(data), decoder.rest) if decoder.ended else ("refused",)


def split(data: bytes, cuts) -> list[bytes]:
    points = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[start:stop] for start, stop in zip(points, points[1:], strict=False)]


# Pieces of framing, right and wrong, that random bytes would seldom hit.
TOKENS = [b"0", b"1", b"5", b"a", b"F", b"00", b"ffffffffffffffffffff", b"\r\n", b"\r\n", b"\n", b"\r", b" ", b"\t",
          b";", b";ext=1", b'"q"', b"hello", b"X-Trailer: yes", b"X-Trailer:", b": v", b"\x00", b"\x7f", b"\xff",
          b"\x0b", b"\r\r\n", b"0\r\n\r\n", b"5\r\nhello\r\n", b"-"]  # fmt: skip
TRAILER_NAMES = st.text(alphabet="-!#$%&'*+.^_`|~0123456789AZaz", max_size=5).map(str.encode)
VALUES = st.one_of(
    st.text(alphabet=" \tab:;\xe9", max_size=8).map(lambda text: text.encode("latin-1")), st.binary(max_size=4)
)
RIGHT_OR_WRONG = [b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n", b"", b" \r\n", b"\t\r\n", b"\n\r"]
LINE_ENDS = st.sampled_from(RIGHT_OR_WRONG)


@st.composite
def chunked_bodies(draw) -> bytes:
    """Mostly well-framed chunked bodies, each part now and then a little wrong."""
    body = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4)):
        size = b"%x" % (len(data) + draw(st.sampled_from([0] * 30 + [-1, 1])))
        size = draw(st.sampled_from([size] * 10 + [size.upper(), b"0" + size, b" " + size, size + b" ", size + b";a"]))
        body += size + draw(LINE_ENDS) + data + draw(LINE_ENDS)
    body += draw(st.sampled_from([b"0"] * 5 + [b"000", b"0;x", b"0 "])) + draw(LINE_ENDS)
    for _ in range(draw(st.integers(0, 3))):
        fold = draw(st.sampled_from([b""] * 6 + [b" ", b"\t"]))
        colon = draw(st.sampled_from([b": "] * 6 + [b":", b" : ", b""]))
        body += fold + draw(TRAILER_NAMES) + colon + draw(VALUES) + draw(LINE_ENDS)
    return body + draw(LINE_ENDS) + draw(st.binary(max_size=6))


BODIES = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from(TOKENS), max_size=16).map(b"".join),
    chunked_bodies(),
    chunked_bodies(),  # twice as often: most of what h11 accepts comes from here
)


@settings(max_examples=3000, deadline=None, database=None)
@given(data=BODIES, cuts=st.lists(st.integers(0, 1000), max_size=6))
@example(data=b"5\r\nhello\r\n0\r\n\r\n", cuts=[])
@example(data=b"5\nhello\r\n0\r\n\r\n", cuts=[])  # bare LF after the size
@example(data=b"5\r\r\nhello\r\n0\r\n\r\n", cuts=[])
@example(data=b"5 5\r\nhello\r\n0\r\n\r\n", cuts=[])  # a space inside the size
@example(data=b" 5\r\nhello\r\n0\r\n\r\n", cuts=[])
@example(data=b"5 \t\r\nhello\r\n0\r\n\r\n", cuts=[2])  # blanks before the CRLF: accepted
@example(data=b"5;a\rb\r\r\nhello\r\n0\r\n\n", cuts=[4])
@example(data=b"5\r\nhello\n0\r\n\r\n", cuts=[])  # LF alone after the data
@example(data=b"0\r\nA: 1\nB:2\r\n  folded\r\n\nrest", cuts=[9])
def test_framing_accepts_exactly_what_h11_accepts(data, cuts):
    pieces = split(data, cuts)
    assert read_with_framing(pieces) == read_with_h11(pieces)


LONG = 20_000  # longer than MAX_FRAMING_BYTES


@pytest.mark.parametrize(
    ("data", "piece", "expected"),
    [
        (b"5;" + b"x" * LONG + b"\r\nhello\r\n0\r\n\r\n", 1 << 20, ("ended", b"hello", b"")),  # whole: nothing held
        (b"5;" + b"x" * LONG + b"\r\nhello\r\n0\r\n\r\n", 1000, ("refused",)),  # held incomplete past the limit
        (b"0\r\n" + b"X: y\r\n" * (LONG // 6) + b"\r\n", 1 << 20, ("ended", b"", b"")),
        (b"0\r\n" + b"X: y\r\n" * (LONG // 6) + b"\r\n", 1000, ("refused",)),
    ],
    ids=["long-extension-at-once", "long-extension-in-pieces", "long-trailers-at-once", "long-trailers-in-pieces"],
)
def test_framing_holds_as_much_incomplete_framing_as_h11(data, piece, expected):
    pieces = [data[at : at + piece] for at in range(0, len(data), piece)]
    assert read_with_h11(pieces) == expected
    assert read_with_framing(pieces) == expected
