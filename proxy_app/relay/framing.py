"""Reading the upstream body in pieces: each piece is everything that has arrived, never waiting for more.

Ollama writes one chunk per token. Each read here takes whatever the socket holds, one line or fifty, in one call,
and strips the chunked framing itself; relaying what arrived together as one piece costs one write to the client
instead of one per line, as nginx does, and a line that is alone goes out at once (http.client's own chunked reader
costs three reads per line). This module does not parse what it reads (usage.py) or decide what happens to it
(forward.py).
"""

from __future__ import annotations

import http.client
import io
import re
from collections.abc import Iterator

# Why: the most of one incomplete chunk-size line or trailer section held while more arrives; h11's default.
MAX_FRAMING_BYTES = 16 * 1024
_CRLF = b"\r\n"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*\r")  # size [extension] [blanks] CR, up to the LF
NO_BODY_STATUSES = frozenset({204, 304})
_LENGTH = re.compile(r"[0-9]{1,18}")  # RFC 9110 8.6 allows digits only; 18 of them are more than any body
_PLAIN_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")  # how Go (Ollama) frames every chunk
# A trailer line: a token, a colon, and a value of visible bytes (obs-text included) with blanks only between them.
_TRAILER_FIELD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[ \t]*(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?[ \t]*")
_FOLDED = re.compile(rb"[ \t]+")  # a trailer line that continues the one before it (obs-fold)
_SECTION_END = re.compile(rb"\n\r?\n")  # the empty line that ends a trailer section


class BrokenBody(http.client.HTTPException):
    """The body ended early or was no valid chunked framing."""

    data = b""  # chunk data that arrived before invalid framing, for the client still


def pieces(response: http.client.HTTPResponse, size: int, wait=None) -> Iterator[bytes]:
    """Yield the body of an http.client response whose head was read, until its end, up to ``size`` bytes a piece.

    A body cut short raises ``BrokenBody`` after everything that did arrive has been yielded. At the end the response
    is closed; its connection can take the next request unless ``is_reusable`` says otherwise. ``wait``, if given, is
    called before each read that finds nothing buffered (whatever it raises ends the body).
    """
    reader, chunked, length = _framing_of(response)
    if reader is None:  # no body, or it was closed already
        return
    if chunked:
        leftover = yield from _dechunked(reader, size, wait)
    else:
        leftover = yield from _sized(reader, size, length, wait)
    end_of_body(response, leftover)  # leftover: bytes after the body, which make the connection unfit for reuse


# ---- what http.client decided about the body ------------------------------------------------------------------------
# http.client has no public read that returns "whatever of the body has arrived": read() waits for the whole body (or
# for ``amt`` bytes) and read1() stops at every chunk boundary. So ``pieces`` reads from the response's own buffered
# socket reader, framed as HTTPResponse.begin() decided. Those attributes (fp, chunked, length, will_close) are set by
# begin() and used by http.client's own readers, but its documentation does not name them: this package reads and
# writes them here and nowhere else.


def _framing_of(response: http.client.HTTPResponse) -> tuple[io.BufferedReader | None, bool, int | None]:
    """The body's reader (None once closed), whether it is chunked, and its length (None: it ends at the close)."""
    return response.fp, response.chunked, response.length


def _keep_from_reuse(response: http.client.HTTPResponse) -> None:
    response.will_close = True


def is_chunked(response: http.client.HTTPResponse) -> bool:
    """True when the body still to read is chunked."""
    return response.fp is not None and bool(response.chunked)


def buffered_body(response: http.client.HTTPResponse, size: int) -> bytes:
    """What the response's reader holds of the body (at most ``size`` bytes, its buffer's size); read without
    waiting once the socket no longer blocks (on_loop.py reads the rest from the socket itself)."""
    return response.fp.read1(size) or b""


def end_of_body(response: http.client.HTTPResponse, rest: bytes | None) -> None:
    """Close a body read to its end outside ``pieces``; ``rest``, what followed it, keeps the connection from
    reuse. None: the body did not end, and the connection is closed when it is released."""
    if rest is None:
        return
    response.close()
    if rest:
        _keep_from_reuse(response)


def has_no_body(response: http.client.HTTPResponse) -> bool:
    """True when the answer has no body to read (HEAD, 204, 304, Content-Length: 0)."""
    return response.length == 0 and not response.chunked


def is_reusable(response: http.client.HTTPResponse) -> bool:
    """True when the answer was read to its end and its connection may take another request."""
    return response.isclosed() and not response.will_close


def check_framing(response: http.client.HTTPResponse, method: str) -> None:
    """Check the body framing an answer's head (``response.head``, upstream.Head) announces (RFC 9112 6.3) and have
    its body read by it; raise HTTPException, for a 502, on framing no proxy may guess at: a transfer coding other
    than chunked, one in an HTTP/1.0 answer, or Content-Length values that differ or are no plain number.

    An answer that has no body whatever it announces (to HEAD, 204, 304) keeps its connection from the next call:
    bytes that follow it, at once or late, belong to no call. So does an answer framed both ways, whose Content-Length
    is ignored (and never relayed: ``read_head``).
    """
    codings = response.head.codings
    lengths = {value.strip(" \t") for field in response.head.lengths for value in field.split(",")}
    if codings and (_coding_names(codings) != ["chunked"] or response.version == 10):
        raise http.client.HTTPException(f"unsupported Transfer-Encoding from the upstream: {', '.join(codings)[:60]!r}")
    if not codings and len(lengths) > 1:
        raise http.client.HTTPException(f"different Content-Length values from the upstream: {sorted(lengths)[:4]}")
    if not codings and lengths and not _LENGTH.fullmatch(declared := next(iter(lengths))):
        raise http.client.HTTPException(f"invalid Content-Length from the upstream: {declared[:20]!r}")
    if method == "HEAD" or response.status in NO_BODY_STATUSES:
        response.chunked, response.length = False, 0
        _keep_from_reuse(response)
    elif codings:
        response.chunked, response.length = True, None
        if lengths:
            _keep_from_reuse(response)
    elif lengths and response.length is None:  # "2, 2": one length, which http.client does not read
        response.length = int(declared)


def _coding_names(fields: list[str]) -> list[str]:
    return [name.strip(" \t").lower() for field in fields for name in field.split(",")]


def _sized(reader, size: int, length: int | None, wait=None) -> Iterator[bytes]:
    """A body with a Content-Length (``length`` bytes), or one that ends when the upstream closes (None)."""
    read = _reads(reader, size, wait)
    while length is None or length > 0:
        piece = read(size if length is None else min(size, length))
        if not piece:
            if length is None:
                return b""
            raise BrokenBody(f"the upstream closed the connection with {length} body bytes still to come")
        if length is not None:
            length -= len(piece)
        yield piece
    return b""


def _dechunked(reader, size: int, wait=None) -> Iterator[bytes]:
    """A chunked body: the data of every chunk that has arrived (whole or in part), framing removed.

    Returns whatever was read past the end of the body (nothing, from a well-behaved upstream).
    """
    framing, read = Framing(), _reads(reader, size, wait)
    while not framing.ended:
        data = read(size)
        if not data:
            raise BrokenBody("the upstream closed the connection before the end of the chunked body")
        try:
            piece = framing.feed(data)
        except BrokenBody as exc:
            if exc.data:  # the chunks before the fault were framed well
                yield exc.data
            raise
        if piece:
            yield piece
    return framing.rest


def _reads(reader, size: int, wait=None):
    """Return ``read(n)``: like ``reader.read1(n)``, but into one buffer kept for the whole body; ``wait()`` first
    when the last read came back short, which means it emptied the reader's buffer.

    ``read1`` allocates all ``n`` bytes for each read and then shrinks them to what arrived (a token line: about 100
    bytes); that allocate-and-shrink, once per piece, leaves freed holes all over glibc's heap. Here each piece is
    copied out at its own size instead, from Python's small-object allocator when it is small.
    """
    # Never more than http.client's read buffer: asked for more, readinto1 copies out what is buffered and then also
    # waits in a raw read for the rest (read1 would return at once).
    view = memoryview(bytearray(min(size, io.DEFAULT_BUFFER_SIZE)))
    drained = False  # unknown at first: the head's last read may have brought body bytes too

    def read(n: int) -> bytes:
        nonlocal drained
        if drained and wait is not None:
            wait()
        count = reader.readinto1(view[:n])
        drained = count < n
        return bytes(view[:count])

    return read


class Framing:
    """Strips HTTP/1.1 chunked framing (RFC 9112 7.1) from bytes fed in any pieces; ``ended`` after the last chunk
    and its trailer section, with any bytes after them in ``rest``.

    It accepts what h11 accepts (tests/test_framing_fuzz.py holds it to that): a size of at most 20 hex digits, any
    extension, blanks only before the CRLF that ends the size line, exactly CRLF after each chunk's data, trailer lines
    that are header fields (ending in CRLF or LF), and at most MAX_FRAMING_BYTES of one incomplete size line or trailer
    section. Trailer fields are checked and dropped, never relayed.
    """

    def __init__(self) -> None:
        self.ended = False
        self.rest = b""
        self._left = 0  # data bytes still to come in the current chunk
        self._footer = b""  # what is still to come of the CRLF that closes a chunk's data
        self._in_trailers = False  # the last (zero-size) chunk was read; the trailer section is next
        self._pending = b""  # the start of a size line or trailer section not yet complete

    def feed(self, data: bytes) -> bytes:
        """Return the chunk data in ``data``; raise BrokenBody on bytes that are no chunked framing (the data of the
        chunks before them in its ``data``)."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        out: list[bytes] = []
        at, end = 0, len(data)
        try:
            while at < end and not self.ended:
                if not (self._left or self._footer or self._in_trailers) and (head := _PLAIN_SIZE.match(data, at)):
                    start = head.end()
                    stop = start + int(head[1], 16)
                    if stop > start and data[stop : stop + 2] == _CRLF:  # a whole chunk, framed the usual way
                        out.append(data[start:stop])
                        at = stop + 2
                        continue
                at = self._step(data, at, out)
        except BrokenBody as exc:
            exc.data = b"".join(out)
            raise
        if self.ended:
            self.rest += data[at:]
        return b"".join(out)

    def _step(self, data: bytes, at: int, out: list[bytes]) -> int:
        """Read the data or framing at ``at``; return where what follows begins (the end, once the rest is held)."""
        if self._left:
            part = data[at : at + self._left]
            out.append(part)
            self._left -= len(part)
            self._footer = b"" if self._left else _CRLF
            return at + len(part)
        if self._footer:
            return self._footer_at(data, at)
        if self._in_trailers:
            return self._trailers_at(data, at)
        line_end = data.find(b"\n", at)
        if line_end < 0:
            self._hold(data[at:])
            return len(data)
        self._size_line(data[at:line_end])
        return line_end + 1

    def _hold(self, partial: bytes) -> None:
        if len(partial) > MAX_FRAMING_BYTES:
            raise BrokenBody("the upstream sent chunk framing that does not end")
        self._pending = partial

    def _size_line(self, line: bytes) -> None:
        size = _SIZE_LINE.fullmatch(line)
        if size is None:
            raise BrokenBody(f"the upstream sent an invalid chunk size: {line[:40]!r}")
        self._left = int(size[1], 16)
        self._in_trailers = not self._left

    def _footer_at(self, data: bytes, at: int) -> int:
        part = data[at : at + len(self._footer)]
        if part != self._footer[: len(part)]:
            raise BrokenBody("the upstream sent chunk data that does not end where its size says")
        self._footer = self._footer[len(part) :]
        return at + len(part)

    def _trailers_at(self, data: bytes, at: int) -> int:
        """Where the body ends, once its trailer section (maybe empty) is all here; else hold it and return the end."""
        for empty in (b"\n", _CRLF):
            if data.startswith(empty, at):
                self.ended = True
                return at + len(empty)
        blank = _SECTION_END.search(data, at)
        if blank is None:
            self._hold(data[at:])
            return len(data)
        _check_trailers(data[at : blank.start()])
        self.ended = True
        return blank.end()


def _check_trailers(section: bytes) -> None:
    """Raise BrokenBody unless each line of a trailer section, folded lines joined, is a header field."""
    fields: list[bytes] = []
    for line in section.split(b"\n"):
        line = line[:-1] if line.endswith(b"\r") else line
        folded = _FOLDED.match(line)
        if folded and fields:
            fields[-1] += b" " + line[folded.end() :]
        elif folded:
            raise BrokenBody("the upstream began a trailer section with a continuation line")
        else:
            fields.append(line)
    for field in fields:
        if not _TRAILER_FIELD.fullmatch(field):
            raise BrokenBody(f"the upstream sent an invalid trailer line: {field[:40]!r}")
