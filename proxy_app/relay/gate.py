"""Concurrency bookkeeping for the relay: the in-flight count, the optional first-come-first-served slot gate, and
the budget of request-body bytes held in memory.

Both are per process and thread-safe. They do not know about Flask or HTTP.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

Watcher = Callable[[int], None]  # told +1 or -1 on every change, e.g. a Prometheus gauge's inc (multiprocess-safe)


class InFlight:
    """Counts proxied calls in flight; ``enter`` returns the count including the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.watcher: Watcher | None = None

    def enter(self) -> int:
        """Count one more call and return the new total."""
        with self._lock:
            self.count += 1
            if self.watcher is not None:
                self.watcher(1)
            return self.count

    def leave(self) -> None:
        """Count one call fewer."""
        with self._lock:
            self.count -= 1
            if self.watcher is not None:
                self.watcher(-1)


class Gate:
    """At most ``limit`` holders at once (0 = no limit); waiters are served strictly in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active = 0
        self._waiting: deque[threading.Event] = deque()
        self.depth_watcher: Watcher | None = None

    @property
    def depth(self) -> int:
        """How many calls are waiting for a slot."""
        return len(self._waiting)

    def enter(self, timeout: float | None) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds in line; False if none came in time."""
        if not self.limit:
            return True
        with self._lock:
            if self._active < self.limit and not self._waiting:
                self._active += 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
            self._depth_changed(1)
        if turn.wait(timeout):
            return True
        with self._lock:
            if turn.is_set():  # the slot was handed over just as we gave up: keep it
                return True
            self._waiting.remove(turn)
            self._depth_changed(-1)
            return False

    def leave(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        if not self.limit:
            return
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot passes on without being freed, so order holds
                self._depth_changed(-1)
            else:
                self._active -= 1

    def _depth_changed(self, delta: int) -> None:
        if self.depth_watcher is not None:
            self.depth_watcher(delta)


class ByteBudget:
    """At most ``limit`` bytes held by all calls together (0 = no limit). It never waits: a call that does not fit
    is refused, so memory stays bounded however many threads the server runs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit; False (nothing held) if not."""
        if not self.limit or not size:
            return True
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        """Give back what ``take`` held."""
        if self.limit and size:
            with self._lock:
                self.held -= size
