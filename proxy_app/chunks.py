"""Reading the upstream body in pieces: each piece is everything that can be read at that moment, never waiting.

Ollama writes one line per token. When several lines are already here (a fast model, a busy proxy), relaying them as
one piece costs one write to the client instead of one per line, like nginx does; a line that is alone is relayed
at once. This module does not parse what it reads (usage.py) or decide what happens to it (relay.py).
"""

from __future__ import annotations

from collections.abc import Iterator


def pieces(upstream, size: int) -> Iterator[bytes]:
    """Yield the body of a urllib3 response as it arrives, up to ``size`` bytes per piece, until its end.

    A read that fails after part of a piece was read raises only once that part has been yielded.
    """
    while piece := upstream.read1(size):
        failure = None
        while len(piece) < size and ready(upstream):
            try:
                more = upstream.read1(size - len(piece))
            except Exception as exc:  # urllib3 has mapped it already; first relay what had arrived
                failure = exc
                break
            if not more:
                break
            piece += more
        yield piece
        if failure is not None:
            raise failure


def ready(upstream) -> bool:
    """True when more of the body can be read now without waiting: bytes already buffered, or in the socket."""
    response = getattr(upstream, "_fp", None)  # the http.client response under urllib3's
    buffered = getattr(response, "fp", None)  # its buffered reader over the socket; None once the body ended
    # The socket under that reader: urllib3's connection forgets it when the answer says Connection: close.
    sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    if buffered is None or sock is None or getattr(response, "length", None) == 0:
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # peek() reads the socket only when its buffer is empty; then it must not wait
    try:
        data = buffered.peek(1)
    except (OSError, ValueError):  # nothing there yet (TLS says so with an error), or the reader was closed
        return False
    finally:
        sock.settimeout(timeout)
    if not getattr(response, "chunked", False) or response.chunk_left:
        return bool(data)  # body bytes (a sized body, or the rest of the current chunk)
    return _has_whole_chunk_start(data, crlf_pending=response.chunk_left == 0)


def _has_whole_chunk_start(data: bytes, crlf_pending: bool) -> bool:
    """True when ``data`` holds the next chunk's size line and at least one byte after it.

    Between two chunks http.client must first read the CRLF that ends the last one, then the size line; with only
    part of that here, the next read would wait for the upstream's next line (for a whole token interval).
    """
    if crlf_pending:
        if not data.startswith(b"\r\n"):
            return False
        data = data[2:]
    line_end = data.find(b"\n")
    return 0 <= line_end < len(data) - 1
