"""Concurrency bookkeeping for the relay: the in-flight count and the optional first-come-first-served slot gate.

Both are per process and thread-safe. They do not know about Flask or HTTP.
"""

from __future__ import annotations

import threading
from collections import deque


class InFlight:
    """Counts proxied calls in flight; ``enter`` returns the count including the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def enter(self) -> int:
        """Count one more call and return the new total."""
        with self._lock:
            self.count += 1
            return self.count

    def leave(self) -> None:
        """Count one call fewer."""
        with self._lock:
            self.count -= 1


class Gate:
    """At most ``limit`` holders at once (0 = no limit); waiters are served strictly in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active = 0
        self._waiting: deque[threading.Event] = deque()

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
        if turn.wait(timeout):
            return True
        with self._lock:
            if turn.is_set():  # the slot was handed over just as we gave up: keep it
                return True
            self._waiting.remove(turn)
            return False

    def leave(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        if not self.limit:
            return
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot passes on without being freed, so order holds
            else:
                self._active -= 1
