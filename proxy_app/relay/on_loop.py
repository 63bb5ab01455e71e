"""A streamed body relayed by the server's event loop instead of by its call's thread.

A thread that relays a stream wakes for every piece Ollama sends: it takes the GIL, reads, counts, writes and waits
again. With hundreds of streams on two cores those hand-overs of the GIL cost far more than the work
(docs/benchmarks.md). A server that runs an event loop (service/loop_relay.py) can offer, under ``LOOP_KEY`` in the
environ, to watch the upstream socket itself: each piece is then read, counted and written by the loop, and the
call's thread sleeps until the body ends. ``LoopBody`` is what the loop needs of one body; the loop itself knows
nothing of HTTP framing, usage or the drain.

Only a chunked body on a plain socket goes to the loop (a TLS socket holds decrypted bytes that poll() cannot see);
the rest, and every body on a server that offers no loop, is relayed by the thread (answer.py).
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Callable

from proxy_app.relay import framing

LOOP_KEY = "ollama_proxy.loop_relay"  # environ key: an object with ``relay(body)`` (service/loop_relay.py)


class StreamCut(Exception):
    """The drain cut the stream (drain.py); its last words were sent."""


def can_go_to_loop(upstream) -> bool:
    """True for an answer whose body the loop can relay: chunked, on a plain socket."""
    return framing.is_chunked(upstream) and type(upstream.socket) is socket.socket


class LoopBody:
    """One chunked upstream body as the loop relays it: ``feed`` turns what arrives into what the client gets.

    ``take`` gets the data of each piece and returns the bytes for the client (answer.Tally); ``last_words`` gives
    the bytes that end a stream the drain cut, or None while it does not cut. Whatever ends the body early is kept in
    ``error`` (after the bytes before it were given out) and raised by ``relay`` on the call's thread.
    """

    def __init__(self, upstream, take: Callable[[bytes], bytes], last_words: Callable[[], bytes | None]) -> None:
        self.upstream, self.socket = upstream, upstream.socket
        self.timeout = self.socket.gettimeout()  # the upstream's read timeout: how long it may fall silent
        self._take, self._last_words = take, last_words
        self._framing = framing.Framing()
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self._framing.ended or self.error is not None

    def start(self) -> bytes:
        """Make the socket non-blocking and return what the head's reads left buffered, for the client."""
        self.socket.setblocking(False)
        # http.client's buffered reader may hold the start of the body; one read1 of its buffer's size returns it all
        # (and, when it holds nothing, whatever the socket has, or nothing: the socket no longer blocks).
        return self.feed(framing.buffered_body(self.upstream, io.DEFAULT_BUFFER_SIZE))

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for ``data``, as they arrived from the upstream."""
        if (cut := self._last_words()) is not None:
            self.error = StreamCut()
            return cut
        if not data:
            return b""
        try:
            piece = self._framing.feed(data)
        except framing.BrokenBody as exc:
            self.error, piece = exc, exc.data
        return self._take(piece) if piece else b""

    def upstream_closed(self) -> None:
        """The upstream closed its connection: the body ended before its last chunk."""
        self.error = framing.BrokenBody("the upstream closed the connection before the end of the chunked body")

    def finish(self) -> None:
        """On the call's thread once the loop let go: the socket blocks again; a whole body frees the connection."""
        with contextlib.suppress(OSError):  # closed under us: the connection is closed when released anyway
            self.socket.settimeout(self.timeout)
        framing.end_of_body(self.upstream, self._framing.rest if self._framing.ended else None)

    def relay_on(self, loop) -> None:
        """Hand the body to ``loop`` and wait until it ends; raise what ended it early."""
        try:
            loop.relay(self)
        finally:
            self.finish()
        if self.error is not None:
            raise self.error
