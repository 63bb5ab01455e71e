"""The HTTP front of one server process, under waitress and under gunicorn alike: slow clients cost no thread.

waitress reads each request whole in its event loop before a thread takes it, so a client that drips its headers or
sends nothing holds only a socket. This module adds what waitress lacks against such clients: an acceptor that holds
each client address to MAX_CONNECTIONS_PER_CLIENT (TRUSTED_PROXIES exempt) and accepts in batches (acceptor.py), and
channels that are closed when their headers take longer than HEADER_TIMEOUT or their body falls silent for
BODY_TIMEOUT (guard.py counts and judges). Its channels refuse a body too big for the proxy's own routes and answer a
request that cannot be read in the API's error shape (request_errors.py), and keep a connection open after a
chunked answer. Everything else (parsing, threads, keep-alive, writing answers) is waitress's own, reached through
its public classes. It does not run the loop (servers.py, worker.py do).
"""

from __future__ import annotations

import logging
import sys
import threading

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

from proxy_app.service.acceptor import Acceptor
from proxy_app.service.balance import Share
from proxy_app.service.dispatch import LastIdleFirstDispatcher
from proxy_app.service.guard import Guard, Limits
from proxy_app.service.loop_relay import LoopTask, Pump
from proxy_app.service.request_errors import OwnRoutesParser, ShapedErrorTask

log = logging.getLogger(__name__)

# Model blobs (POST /api/blobs, many GB) must pass; waitress spools request bodies to a temporary file first.
MAX_BODY_BYTES = 64 * 1024**3
# Why: select() on Windows handles about 512 sockets; elsewhere poll() has no such limit, so idle keep-alive
# clients (issue 7: 500 of them) never lock new ones out.
WINDOWS_CONNECTION_LIMIT = 500
POSIX_CONNECTION_LIMIT = 2000
# Why: a call in progress holds a thread, so THREADS runs to a thousand; Python code needs little C stack, and 1,000
# threads at the platform's 8 MB each would reserve 8 GB, which a host with strict overcommit refuses.
THREAD_STACK_BYTES = 512 * 1024
OPTIONS = {
    "ident": "ollama-proxy",
    "clear_untrusted_proxy_headers": False,  # the relay decides whom to believe (TRUSTED_PROXIES)
    "max_request_body_size": MAX_BODY_BYTES,
    "channel_request_lookahead": 1,  # lets waitress see a departed client at once (wsgi-stack.md 1.5)
}


class GuardedTask(LoopTask):
    """waitress's task; an HTTP/1.1 chunked answer (a stream) keeps its connection open, and an answer after which
    its connection closes leaves the guard's count as it ends."""

    _building_head = False

    def build_response_header(self) -> bytes:
        if self.channel.guard.stopping:  # as Go's server does once it shuts down: no connection is kept for later
            self.set_close_on_finish()
        self._building_head = True
        try:
            return super().build_response_header()
        finally:
            self._building_head = False

    def set_close_on_finish(self) -> None:
        """Close the connection after this answer, except where waitress would close it only because the answer is
        chunked: its last chunk ends it, so the client keeps the connection for its next call, as Go's server (and
        so Ollama) lets it. A client that asked to close, HTTP/1.0 and every error still close."""
        if self._building_head and self.chunked_response and self.version == "1.1":
            return
        super().set_close_on_finish()

    def finish(self) -> None:
        # An answer after which its connection closes (the client asked, HTTP/1.0, a stop) leaves the count as it
        # ends: its client may connect again at once, before the loop has closed this connection. A client that has
        # not taken what was sent (its connection may stay open until channel_timeout) keeps counting until then.
        if self.close_on_finish and not self.channel.total_outbufs_len:
            self.channel.leave_guard()
        super().finish()


class GuardedChannel(HTTPChannel):
    """waitress's channel, with the times the guard needs: when the headers are due, when a byte last came."""

    parser_class = OwnRoutesParser
    error_task_class = ShapedErrorTask
    task_class = GuardedTask
    guard: Guard  # set on the per-front subclass (make_channel_class), with loop_map, the loop's socket map
    loop_map: dict
    has_asked = False  # True once a whole request has come in on this connection
    pump: Pump | None = None  # relaying this connection's stream on the loop (loop_relay.py)

    def __init__(self, server, sock, addr, adj, map=None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.last_heard = self.guard.clock()
        self.header_deadline = self._deadline(self.last_heard)  # a new connection owes a request at once
        self.host = addr[0] if isinstance(addr, tuple) else str(addr)

    def _deadline(self, now: float) -> float | None:
        seconds = self.guard.limits.header_seconds
        return now + seconds if seconds else None

    def received(self, data: bytes) -> bool:
        """Parse ``data`` as waitress does; a request begun here gets its header deadline, a finished one loses it."""
        now = self.guard.clock()
        self.last_heard = now
        before, queued = self.request, len(self.requests)
        if before is None and self.header_deadline is None:
            self.header_deadline = self._deadline(now)  # a kept-alive connection's next request starts now
        result = super().received(data)
        self.has_asked = self.has_asked or self.request is None or (before is not None and self.request is not before)
        if self.request is None:
            self.header_deadline = None  # nothing half-read: idle, or answering (channel_timeout covers idling)
        elif self.request is not before and (before is not None or len(self.requests) > queued):
            self.header_deadline = self._deadline(now)  # a request finished in this read and the next one began
        return result

    def writable(self) -> bool:
        """waitress's rule, except while a call's thread holds the output buffer: it sends what it writes itself,
        and the loop could not take the buffer meanwhile (waitress's handle_write tries and gives up). Asked to
        watch for room to write then, poll would return at once on every turn: the loop would spin, and take the
        interpreter lock back each time, keeping the call's thread waiting for it. A thread that leaves output it
        could not send pulls the trigger, and the loop's next turn asks again."""
        if self.total_outbufs_len and self.requests:
            if not self.outbuf_lock.acquire(blocking=False):
                return False
            self.outbuf_lock.release()
        return super().writable()

    def handle_read(self) -> None:
        """Read as waitress does; a client gone (EOF) ends the stream the loop relays for it at once."""
        super().handle_read()
        if not self.connected and self.pump is not None:
            self.pump.client_left()

    def del_channel(self, map=None) -> None:
        """Leave the loop, and the guard's count; the stream the loop relays for it ends."""
        if self.pump is not None:
            self.pump.client_left()
        super().del_channel(map)
        self.leave_guard()

    def leave_guard(self) -> None:
        """Leave the guard's count, once however often it is asked (by the loop and by the call's thread)."""
        host = self.__dict__.pop("host", None)  # one dict operation under the GIL: only one caller gets the host
        if host is not None:
            self.guard.release(host)


def make_channel_class(guard: Guard, loop_map: dict) -> type[GuardedChannel]:
    """A channel class bound to one front's guard and loop (waitress creates channels from the class alone)."""
    return type("GuardedChannel", (GuardedChannel,), {"guard": guard, "loop_map": loop_map})


def connection_options(threads: int, limit: int = POSIX_CONNECTION_LIMIT) -> dict:
    """waitress's connection limit and poller for this platform (and the open-file limit they need)."""
    if sys.platform == "win32":
        return {"connection_limit": min(threads + 100, WINDOWS_CONNECTION_LIMIT)}
    limit = max(threads + 100, limit)
    raise_file_limit(2 * limit + 100)  # a relayed call holds two sockets: its client's and its upstream's
    return {"connection_limit": limit, "asyncore_use_poll": True}


def raise_file_limit(wanted: int) -> None:
    """Raise this process's open-file soft limit (often 1024) towards ``wanted`` so the connection limit holds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Front:
    """waitress's server for ``app`` with a guarded acceptor on each listener; ``map`` is the loop's socket map."""

    def __init__(self, app, limits: Limits, threads: int, share: Share | None = None, **options) -> None:
        self.map: dict = {}
        self.guard = Guard(limits)
        dispatcher = LastIdleFirstDispatcher()
        previous = threading.stack_size(THREAD_STACK_BYTES)
        try:
            dispatcher.set_thread_count(threads)
        finally:
            threading.stack_size(previous)
        # The one place a waitress parameter named as private is used: create_server takes a dispatcher only
        # through `_dispatcher` (dispatch.py says why ours).
        self.server = waitress.create_server(app, map=self.map, _dispatcher=dispatcher, threads=threads,
                                             **{**OPTIONS, **options})  # fmt: skip
        listeners = [item for item in self.map.values() if isinstance(item, BaseWSGIServer)]
        channel_class = make_channel_class(self.guard, self.map)
        self.acceptors = []
        for listener in listeners:
            listener.channel_class = channel_class
            self.acceptors.append(Acceptor(listener, self.guard, self.map, share))
        self.task_dispatcher = self.server.task_dispatcher

    def poll(self, timeout: float) -> None:
        """One turn of the event loop (what waitress's ``run`` repeats), waiting at most ``timeout`` for an event."""
        for acceptor in self.acceptors:
            timeout = min(timeout, acceptor.longest_wait())
        wasyncore.loop(timeout=timeout, map=self.map, use_poll=True, count=1)

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections already open go on, each closing after its next answer."""
        self.guard.stopping = True
        for acceptor in self.acceptors:
            acceptor.close()

    def channels(self) -> list[HTTPChannel]:
        """The open client connections."""
        return [item for item in list(self.map.values()) if isinstance(item, HTTPChannel)]

    def is_busy(self, fresh_too: bool = False) -> bool:
        """True while a request is being read or answered or an answer written; with ``fresh_too``, also while a
        connection has not sent its first request yet (at a stop: it may be on its way)."""
        for channel in self.channels():
            if channel.requests or channel.total_outbufs_len or channel.request is not None:
                return True
            if fresh_too and not getattr(channel, "has_asked", True):
                return True
        return False

    def close_connections(self) -> None:
        """Close every client connection (on the loop's thread)."""
        for channel in self.channels():
            channel.handle_close()
