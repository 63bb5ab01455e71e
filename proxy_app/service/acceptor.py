"""The front's acceptor: takes new connections in batches, and holds each client address to its connection cap.

It takes the listener's place in the loop's map under the same socket, so whatever closes the server's listener
also takes the acceptor out. Each loop turn it also runs the front's periodic checks: channels past their header or
body deadline (the guard judges) and waitress's own maintenance of idle keep-alive connections.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque

from waitress import wasyncore
from waitress.server import BaseWSGIServer

from proxy_app.service.balance import Share
from proxy_app.service.guard import Guard

log = logging.getLogger(__name__)

ACCEPT_BATCH = 256  # connections accepted per wake-up: a burst of clients is in within a few loop turns
# Why: a client over its cap may have closed connections whose end the loop has not read yet (the kernel may deliver
# it after the new connection); its new connection waits this long for them before it is refused (ACCEPT_BATCH
# connections wait at most; more are refused at once).
CAP_WAIT_SECONDS = 0.5
CHECK_SECONDS = 0.5  # how often deadlines are checked: a slow client is closed at most this late


class Acceptor(wasyncore.dispatcher):
    """Accepts on ``server``'s listening socket in its place: in batches, holding each client to its cap."""

    def __init__(self, server: BaseWSGIServer, guard: Guard, loop_map: dict, share: Share | None = None) -> None:
        super().__init__(server.socket, map=loop_map)  # same socket, same key: it replaces the server in the map
        self.server, self.guard, self.loop_map = server, guard, loop_map
        self.share = share  # this gunicorn worker's place among its peers (balance.py); None: no peers
        self.accepting = True
        self._next_check = 0.0
        self._next_maintenance = 0.0
        self._full = False
        self._over_cap: deque = deque()  # (socket, address, host, deadline): waiting for their client's closes

    def readable(self) -> bool:
        """Called every loop turn: run the periodic checks, then accept unless the connection limit is reached or
        this worker is stepping aside for its peers (balance.py)."""
        now = self.guard.clock()
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self.close_overdue(now)
        if now >= self._next_maintenance:  # waitress's own: closes kept-alive connections idle for channel_timeout
            self._next_maintenance = now + self.server.adj.cleanup_interval
            self.server.maintenance(time.time())
        if self._over_cap:
            self.admit_waiting(now)
        # The clients' connections only: the loop's map also holds the listeners, the trigger and the pumps.
        full = self.guard.total >= self.server.adj.connection_limit
        if full != self._full:
            self._full = full
            log.warning("%d open connections: %s", self.guard.total,
                        "connection limit reached, not accepting" if full else "accepting again")  # fmt: skip
        if self.share is not None:
            if full:
                self.share.leave()  # its peers take every new connection meanwhile
                return False
            self.share.publish(self.guard.total)
            return not self.share.is_aside()
        return not full

    def longest_wait(self) -> float:
        """How long the coming loop turn may wait for an event (Front.poll): the end of a step aside, if any."""
        return math.inf if self.share is None else self.share.longest_wait()

    def writable(self) -> bool:
        return False

    def handle_accept(self) -> None:
        """Accept what waits (up to ACCEPT_BATCH, or this worker's room among its peers): a channel each; a client over
        its cap waits (``admit_waiting``)."""
        batch = ACCEPT_BATCH if self.share is None else self.share.room(self.guard.total, ACCEPT_BATCH)
        for _ in range(batch):  # none when this worker steps aside
            try:
                pair = self.accept()
            except OSError as exc:  # out of file descriptors, say: keep listening, try again next turn
                log.warning("accept() failed: %s", exc)
                return
            if pair is None:
                return
            sock, addr = pair
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            last_chance = len(self._over_cap) >= ACCEPT_BATCH
            if self.guard.admit(host, last_chance):
                self._open(sock, addr, host)
            elif last_chance:
                _refuse(sock, self.guard.limits.per_client)
            else:
                self._over_cap.append((sock, addr, host, self.guard.clock() + CAP_WAIT_SECONDS))

    def admit_waiting(self, now: float) -> None:
        """At each loop turn, admit each connection over its client's cap as soon as the connections its client
        closed are read; refuse it (429) at the first turn after its deadline. A client that closes a connection and
        opens another at once is not refused for the closed one, even when the loop reads its end after the new one
        (within CAP_WAIT_SECONDS)."""
        waiting, self._over_cap = self._over_cap, deque()
        for sock, addr, host, deadline in waiting:
            if self.guard.admit(host, last_chance=now >= deadline):
                self._open(sock, addr, host)
            elif now >= deadline:
                _refuse(sock, self.guard.limits.per_client)
            else:
                self._over_cap.append((sock, addr, host, deadline))

    def _open(self, sock, addr, host: str) -> None:
        try:
            self.server.set_socket_options(sock)
            self.server.channel_class(self.server, sock, self.server.fix_addr(addr), self.server.adj,
                                      map=self.loop_map)  # fmt: skip
        except OSError:  # the client left before we could set it up
            self.guard.release(host)
            sock.close()

    def close(self) -> None:
        """Stop listening; the connections waiting for room are closed."""
        if self.share is not None:
            self.share.leave()
            self.share = None
        while self._over_cap:
            self._over_cap.popleft()[0].close()
        super().close()

    def close_overdue(self, now: float) -> int:
        """Close every channel whose headers are late or whose body stalled; return how many."""
        guard = self.guard
        overdue = [channel for channel in list(self.server.active_channels.values())
                   if getattr(channel, "guard", None) is guard and guard.is_overdue(channel, now)]  # fmt: skip
        for channel in overdue:
            channel.will_close = True  # the loop closes it at its next turn (writable() sees will_close)
        self.guard.closed_slow += len(overdue)
        return len(overdue)


def _refuse(sock, per_client: int) -> None:
    """Best effort: tell the client why (Ollama's error shape) and close; never wait for a slow one."""
    body = json.dumps({"error": f"too many connections from this address (at most {per_client})"}).encode()
    head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\n"
    try:
        sock.setblocking(False)
        sock.send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    sock.close()
