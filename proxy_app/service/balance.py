"""Spreads new connections evenly over gunicorn's workers.

The workers poll one shared listening socket, and the first to wake would take every connection waiting: a burst of
clients can land on one worker, which then answers them all under one interpreter lock while the other idles, and a
kept-alive client stays on the worker that accepted it. So each worker publishes, in a table of shared memory the
arbiter makes before it forks them, how many connections it holds and when its loop last turned, and takes waiting
connections only up to its share: SLACK, or a quarter, over its least-loaded live peer. Woken with connections
waiting while over its share, it steps aside for ASIDE_SECONDS, as its peers, woken by the same connections, take
them, and then takes one if one still waits. A peer whose loop has not turned for LIVE_SECONDS, or that stopped
accepting, is not counted: a peer that is stuck or gone slows new connections, never stops them.

The share grows with the load, and a step aside is short and happens only while connections wait, because each loop
turn costs time in proportion to the connections held: sharing a large burst in small steps would make its
connections wait many turns to be accepted (or refused, over a client's cap).
"""

from __future__ import annotations

import math
import mmap
import time

SLOTS = 256  # workers a table tracks over its life: slots of dead workers are reused
# Connections a worker may hold over its least-loaded live peer (or a quarter more, if that is more): small, so a
# few clients (8 on 2 workers) are split evenly, not left on the worker that woke first.
SLACK = 2
LIVE_SECONDS = 3.0  # a slot whose loop has not turned this long is a dead or stuck worker's (loops turn every second)
ASIDE_SECONDS = 0.001  # how long a worker over its share leaves a waiting connection to its peers before taking it
# A step aside that ended this long ago without a connection still waiting is over: the next time the worker is over
# its share, it steps aside again first. Longer than a loop turn under load, so the turn after a step aside finds it.
ASIDE_STALE_SECONDS = 0.1
CLAIM_SECONDS = 60.0  # a slot given out is its worker's for this long before it first turns (loading the app)


class Table:
    """Per worker slot, in shared memory: when its loop last turned (monotonic clock, the same in every process;
    0: not accepting, or not yet) and how many connections it holds. Made in the arbiter; slots are claimed there
    too, by its one thread, so two live workers never share a slot."""

    def __init__(self, slots: int = SLOTS, clock=time.monotonic) -> None:
        self.slots, self.clock = slots, clock
        # [slots in use, then per slot: turn, connections], in anonymous shared memory, which the workers inherit at
        # fork: no file behind it (multiprocessing's RawArray has one), so a full disk cannot fault it.
        self.values = memoryview(mmap.mmap(-1, 8 * (2 * slots + 1))).cast("d")
        self._claimed = [0.0] * slots  # the arbiter's own: when each slot was last given out

    def claim(self) -> int:
        """A slot for a worker about to be forked: one whose worker is gone (quiet for LIVE_SECONDS and not given
        out within CLAIM_SECONDS), else a new one, else the one quiet longest."""
        now, used = self.clock(), int(self.values[0])
        free = [slot for slot in range(used) if self._quiet_since(slot) <= now - LIVE_SECONDS
                and self._claimed[slot] <= now - CLAIM_SECONDS]  # fmt: skip
        if free:
            slot = free[0]
        elif used < self.slots:
            slot, self.values[0] = used, used + 1
        else:
            slot = min(range(self.slots), key=self._quiet_since)
        self._claimed[slot] = now
        self.put(slot, 0.0, 0)  # counted by its peers from its worker's first loop turn on
        return slot

    def least_of_peers(self, slot: int) -> float | None:
        """The fewest connections a live worker other than ``slot`` holds; None when there is none."""
        now, values = self.clock(), self.values
        counts = [values[2 + 2 * other] for other in range(int(values[0]))
                  if other != slot and now - values[1 + 2 * other] < LIVE_SECONDS]  # fmt: skip
        return min(counts, default=None)

    def _quiet_since(self, slot: int) -> float:
        return max(self.values[1 + 2 * slot], self._claimed[slot])

    def put(self, slot: int, turn: float, connections: int) -> None:
        """Write ``slot``: its loop turned at ``turn`` (0: it does not accept) holding ``connections``."""
        self.values[1 + 2 * slot], self.values[2 + 2 * slot] = turn, connections


class Share:
    """One worker's place in a Table, and whether it is stepping aside for its peers."""

    def __init__(self, table: Table, slot: int) -> None:
        self.table, self.slot = table, slot
        self._aside_until: float | None = None  # while stepping aside: when it takes its own turn again

    def publish(self, connections: int) -> None:
        """At each loop turn: this worker is alive and accepting, and holds ``connections``."""
        self.table.put(self.slot, self.table.clock(), connections)

    def leave(self) -> None:
        """This worker no longer accepts: its peers stop counting it."""
        self.table.put(self.slot, 0.0, 0)

    def is_aside(self) -> bool:
        """True while this worker leaves waiting connections to its peers (it does not poll the listener then)."""
        return self._aside_until is not None and self.table.clock() < self._aside_until

    def longest_wait(self) -> float:
        """How long the coming loop turn may wait for an event: until the end of a step aside."""
        remaining = math.inf if self._aside_until is None else self._aside_until - self.table.clock()
        return remaining if remaining > 0 else math.inf

    def room(self, connections: int, batch: int) -> int:
        """How many of the connections waiting to take now, holding ``connections``: up to ``batch``, and no more
        than fills this worker's share (at least one). Over its share, none: it steps aside for ASIDE_SECONDS, as
        its peers, woken by the same connections, take them; if one still waits after that, it takes one, so a peer
        that is alive but slow to accept holds nobody up for long."""
        least = self.table.least_of_peers(self.slot)
        if least is None:
            return batch
        allowed = int(least) + max(SLACK, int(least) // 4)
        if connections <= allowed:
            self._aside_until = None
            return max(1, min(batch, allowed - connections))
        now = self.table.clock()
        if self._aside_until is None or now - self._aside_until > ASIDE_STALE_SECONDS:
            self._aside_until = now + ASIDE_SECONDS
            return 0
        self._aside_until = None  # its step aside is over and a connection still waits
        return 1
