"""Calls of a key in flight at once, counted across processes in ``key_streams`` (counters.py): one row per key and
process (its *holder* name), which the process rewrites when a call of the key starts or ends and on a heartbeat.
A process that dies holding streams stops counting STREAM_STALE_SECONDS after its last heartbeat. The limiter
(limits.py) decides when to call these, inside its own transactions.
"""

from __future__ import annotations

import os
import secrets

from peewee import Database, fn

from proxy_app.store.counters import KeyStream
from proxy_app.store.keys import ApiKey

STREAM_STALE_SECONDS = 60.0


class StreamCounts:
    """This process's rows in ``key_streams``, and the sum over every process's fresh rows."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._holder, self._holder_pid = "", 0

    @property
    def holder(self) -> str:
        """This process's name in ``key_streams``: a new one after a fork."""
        if self._holder_pid != os.getpid():
            self._holder = f"{self.instance}:{os.getpid()}:{secrets.token_hex(4)}"[-200:]
            self._holder_pid = os.getpid()
        return self._holder

    def enter(self, db: Database, name: str, limit: int, mine: int, now: float) -> bool:
        """In the caller's transaction: take one more stream of the key (``mine`` run here already) unless the key
        has ``limit`` in flight over every process; False when it has."""
        lock = ApiKey.select(ApiKey.id).where(ApiKey.name == name)  # one key's streams at a time
        list((lock.for_update() if db.for_update else lock).execute(db))
        others = KeyStream.select(fn.COALESCE(fn.SUM(KeyStream.streams), 0)).where(
            KeyStream.key_name == name,
            KeyStream.holder != self.holder,
            KeyStream.seen >= int(now - STREAM_STALE_SECONDS),
        ).scalar(db)  # fmt: skip
        if others + mine >= limit:
            return False
        self.count(db, name, mine + 1, now)
        return True

    def count(self, db: Database, name: str, streams: int, now: float) -> None:
        """Say that ``streams`` calls of the key run in this process now (also the heartbeat)."""
        KeyStream.insert(key_name=name, holder=self.holder, streams=streams, seen=int(now)).on_conflict(
            conflict_target=[KeyStream.key_name, KeyStream.holder],
            update={KeyStream.streams: streams, KeyStream.seen: int(now)},
        ).execute(db)  # fmt: skip

    def live(self, db: Database, name: str, now: float) -> int:
        """The key's streams in flight over every process whose heartbeat is fresh."""
        total = KeyStream.select(fn.COALESCE(fn.SUM(KeyStream.streams), 0)).where(
            KeyStream.key_name == name, KeyStream.seen >= int(now - STREAM_STALE_SECONDS)
        ).scalar(db)  # fmt: skip
        return int(total)  # PostgreSQL's SUM is a numeric

    def prune(self, db: Database, now: float) -> None:
        """Delete the rows of processes whose heartbeat stopped."""
        KeyStream.delete().where(KeyStream.seen < int(now - STREAM_STALE_SECONDS)).execute(db)

    def forget_mine(self, db: Database) -> None:
        """Delete this process's rows (at shutdown)."""
        KeyStream.delete().where(KeyStream.holder == self.holder).execute(db)
