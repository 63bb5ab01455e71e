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

MAX_FRAMING_BYTES = 4096  # a chunk-size or trailer line longer than this is no HTTP/1.1 framing
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r]*)?\r?")  # size, then extensions (ignored)
_PLAIN_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")  # how Go (Ollama) frames every chunk


class BrokenBody(http.client.HTTPException):
    """The body ended early or was no valid chunked framing."""


def pieces(response: http.client.HTTPResponse, size: int, wait=None) -> Iterator[bytes]:
    """Yield the body of an http.client response whose head was read, until its end, up to ``size`` bytes a piece.

    A body cut short raises ``BrokenBody`` after everything that did arrive has been yielded. At the end the response
    is closed; its connection can take the next request unless ``is_reusable`` says otherwise. ``wait``, if given, is
    called before each read that finds nothing buffered (whatever it raises ends the body).
    """
    reader, is_chunked, length = _framing_of(response)
    if reader is None:  # no body, or it was closed already
        return
    if is_chunked:
        leftover = yield from _dechunked(reader, size, wait)
    else:
        leftover = yield from _sized(reader, size, length, wait)
    response.close()  # the body ended: http.client may send the next request on this connection
    if leftover:  # bytes after the end of the body: this connection is not fit for another request
        _keep_from_reuse(response)


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


def has_no_body(response: http.client.HTTPResponse) -> bool:
    """True when the answer has no body to read (HEAD, 204, 304, Content-Length: 0)."""
    return response.length == 0 and not response.chunked


def is_reusable(response: http.client.HTTPResponse) -> bool:
    """True when the answer was read to its end and its connection may take another request."""
    return response.isclosed() and not response.will_close


def end_loose_length_at_close(response: http.client.HTTPResponse) -> None:
    """Make a body whose Content-Length is no plain number end when the upstream closes, as one without it does.

    http.client takes int() of the field, which also reads "+5" and "5_0" (RFC 9110 8.6 allows digits only). Called
    for answers to anything but HEAD, whose bodies are empty whatever they announce.
    """
    declared = response.msg.get("Content-Length", "").strip(" \t")
    if response.length is None or (declared.isascii() and declared.isdigit()):
        return
    if response.status >= 200 and response.status not in (204, 304):  # these have no body whatever they announce
        response.length = None
        response.will_close = True


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
        piece = framing.feed(data)
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
    and its trailer section, with any bytes after them in ``rest``."""

    def __init__(self) -> None:
        self.ended = False
        self.rest = b""
        self._left = 0  # data bytes still to come in the current chunk
        self._after_data = False  # the CRLF that closes a chunk's data is next
        self._in_trailers = False  # the last (zero-size) chunk was read; trailer lines until an empty one
        self._pending = b""  # the start of a framing line not yet complete

    def feed(self, data: bytes) -> bytes:
        """Return the chunk data in ``data``; raise BrokenBody on bytes that are no chunked framing."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        out = []
        at, end = 0, len(data)
        while at < end and not self.ended:
            if not (self._left or self._after_data or self._in_trailers) and (head := _PLAIN_SIZE.match(data, at)):
                start = head.end()
                stop = start + int(head[1], 16)
                if stop > start and data[stop : stop + 2] == b"\r\n":  # a whole chunk, framed the usual way
                    out.append(data[start:stop])
                    at = stop + 2
                    continue
            if self._left:
                part = data[at : at + self._left]
                out.append(part)
                at += len(part)
                self._left -= len(part)
                self._after_data = not self._left
                continue
            line_end = data.find(b"\n", at)
            if line_end < 0:
                self._pending = data[at:]
                if len(self._pending) > MAX_FRAMING_BYTES:
                    raise BrokenBody("the upstream sent a chunk-size line that does not end")
                break
            self._line(data[at:line_end])
            at = line_end + 1
        if self.ended:
            self.rest += data[at:]
        return b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._after_data:  # the empty line closing a chunk's data
            if line.rstrip(b"\r"):
                raise BrokenBody("the upstream sent more chunk data than the chunk size said")
            self._after_data = False
        elif self._in_trailers:
            self.ended = not line.rstrip(b"\r")
        else:
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                raise BrokenBody(f"the upstream sent an invalid chunk size: {line[:40]!r}")
            self._left = int(size[1], 16)
            self._in_trailers = not self._left
