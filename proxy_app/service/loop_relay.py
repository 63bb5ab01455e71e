"""The front's event loop relays streamed bodies, so that a stream costs no thread wake-up per piece.

A relayed stream's thread would otherwise wake for each piece Ollama sends and take the GIL to pass it on; with
hundreds of streams those hand-overs cost more than the work itself (docs/benchmarks.md, docs/design.md). Here the
front's task puts a ``LoopRelay`` in each request's environ (relay/on_loop.py says when the relay uses it): the call's
thread hands its ``LoopBody`` over and sleeps, and a ``Pump`` in the loop's map reads the upstream socket whenever it
is readable, feeds what arrived to the body and writes the result to the client through waitress's own task, as the
thread would have.

The pump stops reading while the client's connection holds more than OUTBUF_LIMIT unsent bytes, ends the body when
the client leaves (the channel tells it at once: front.py), when the upstream is silent for its read timeout, or when
the upstream closes, and then wakes the call's thread, which settles the call as it would after relaying the body
itself.
"""

from __future__ import annotations

import logging
import threading
import time

from waitress import wasyncore
from waitress.channel import ClientDisconnected
from waitress.task import WSGITask

from proxy_app.relay.client_watch import ClientLeft
from proxy_app.relay.on_loop import LOOP_KEY

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # what one readable event reads at most: everything a burst of tokens brought
OUTBUF_LIMIT = 256 * 1024  # unsent bytes for one client above which the pump stops reading the upstream
STALL_SECONDS = 10.0  # how often a waiting thread looks whether the loop stopped with its connection closed


class LoopTask(WSGITask):
    """waitress's task for a request, offering the app the loop that serves its connection (``LOOP_KEY``) when
    the loop polls with poll(): select() on Windows takes about 512 sockets, which the clients' alone may fill."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        if self.channel.adj.asyncore_use_poll:
            environ[LOOP_KEY] = LoopRelay(self, self.channel.loop_map)
        return environ

    def service(self) -> None:
        try:
            super().service()
        finally:  # the relay in the environ holds this task, which holds the environ (and the request's body)
            if self.environ is not None:
                self.environ.pop(LOOP_KEY, None)


class LoopRelay:
    """What the app finds under LOOP_KEY: ``relay(body)`` relays a LoopBody on the loop and waits for its end."""

    def __init__(self, task: WSGITask, loop_map: dict) -> None:
        self.task, self.loop_map = task, loop_map

    def relay(self, body) -> None:
        """Relay ``body`` on the loop (the server's trigger runs the start there) and return once it has ended."""
        pump = Pump(self.task, body, self.loop_map)
        channel = self.task.channel
        channel.pump = pump  # from now on the channel ends it when it closes, even before the loop starts it
        channel.server.trigger.pull_trigger(pump.start)
        while not pump.ended.wait(STALL_SECONDS):
            if not channel.connected:  # closed, and no loop turned to say so: the loop has stopped
                pump.end(ClientLeft())


class Pump(wasyncore.dispatcher):
    """Reads one upstream body on the loop and writes it to its client; ``ended`` is set once, when it stops.

    It is in the loop's map under the upstream socket, which it never closes: the call's thread gives the connection
    back or closes it (answer.py).
    """

    def __init__(self, task: WSGITask, body, loop_map: dict) -> None:
        super().__init__(map=loop_map)  # no socket yet: start() adds it to the map, on the loop's thread
        self.task, self.body, self.channel = task, body, task.channel
        self.ended = threading.Event()
        self.deadline: float | None = None  # when the upstream's silence ends the body (READ_TIMEOUT)
        self.waits_for_client = False  # not reading: the client has not taken what was sent

    def start(self) -> None:
        """On the loop's thread: relay what is buffered, then watch the upstream socket."""
        if self.ended.is_set():  # its connection closed before the loop got here
            return
        try:
            if not self.channel.connected:
                raise ClientLeft
            self.set_socket(self.body.socket)
            self.connected = True  # wasyncore: a connected dispatcher's read events go to handle_read
            self._heard()
            self._write(self.body.start())
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the call's thread must wake and settle
            self.end(exc)
            return
        if self.body.finished:
            self.end()

    def readable(self) -> bool:
        """Read while the client takes what is sent; end the body once the upstream was silent for too long."""
        if self.channel.total_outbufs_len >= OUTBUF_LIMIT:
            self.waits_for_client = True
            return False
        if self.waits_for_client:  # the upstream's silence counts from when the client took what was sent
            self.waits_for_client = False
            self._heard()
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.end(TimeoutError("read timed out"))
            return False
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        try:
            data = _receive(self.socket)
            self._heard()
            if not data:
                self.body.upstream_closed()
            self._write(self.body.feed(data))
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ClientLeft) as exc:
            self.end(exc)
            return
        if self.body.finished:
            self.end()

    def handle_close(self) -> None:
        """The upstream hung up: what it sent before is still read, and its end seen, by handle_read."""

    def handle_expt(self) -> None:
        """Out-of-band data from the upstream: nothing to do with the body."""

    def close(self) -> None:
        """Whoever closes the loop's sockets ends the body; the upstream socket is the call's to close."""
        self.end(ClientLeft())

    def handle_error(self) -> None:  # wasyncore calls it for any other exception in handle_read: a bug of ours
        log.exception("relaying a stream on the loop failed")
        self.end(RuntimeError("relaying the stream failed"))

    def client_left(self) -> None:
        """The channel's client is gone (front.py tells it)."""
        self.end(ClientLeft())

    def end(self, error: BaseException | None = None) -> None:
        """Leave the loop (once) and wake the call's thread; ``error`` ends the body early."""
        if self.ended.is_set():
            return
        if error is not None and self.body.error is None:
            self.body.error = error
        if getattr(self.channel, "pump", None) is self:
            self.channel.pump = None
        if self.socket is not None:
            self.del_channel()
        self.ended.set()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.task.write(data)
        except ClientDisconnected:
            raise ClientLeft from None

    def _heard(self) -> None:
        timeout = self.body.timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout


_buffers = threading.local()  # one read buffer per loop thread


def _receive(sock) -> bytes:
    """What ``sock`` holds, up to READ_SIZE bytes, copied out of the loop thread's buffer at the size that arrived
    (recv(READ_SIZE) would allocate READ_SIZE bytes for each token line and shrink them: holes all over the heap)."""
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_SIZE))
    return bytes(view[: sock.recv_into(view)])
