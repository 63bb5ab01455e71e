"""Retention: rows older than the retention period (calls, then model events), then the oldest calls beyond the row
cap, are deleted a small batch at a time, and the rotated CSV files whose rows all went either way go too.

The writer thread calls ``step`` between batches of new rows, so deleting never runs on the request path and never
holds the write lock for long. A pass starts at the first step of a process and then every ``EVERY_SECONDS``; in
between, the store can pass the cap by the rows that arrive meanwhile. It does not insert rows (writer.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

from peewee import Database

from proxy_app.store import models, writes
from proxy_app.store.csvlog import CsvLog

log = logging.getLogger(__name__)

EVERY_SECONDS = 600.0  # how often a pass looks for old rows and files and counts the rows against the cap
BATCH_ROWS = 1000  # rows deleted per transaction, so writes from other processes never wait long


class Retention:
    """Deletes rows past ``retention_days`` (and their CSV files), then the oldest beyond ``max_rows``; 0 turns
    either off. ``expired`` and ``evicted`` count the rows each has deleted in this process."""

    def __init__(self, database: Database, csv_log: CsvLog | None, retention_days: int = 0, max_rows: int = 0,
                 clock=lambda: datetime.now(UTC)) -> None:  # fmt: skip
        self.database = database
        self.csv_log = csv_log
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.clock = clock
        self.expired = 0
        self.evicted = 0
        self._stage: str | None = None  # "age" or "cap" while a pass is under way
        self._cap_cutoff: datetime | None = None  # rows that arrived before it are beyond the cap
        self._due = 0.0  # monotonic time of the next pass

    def run(self) -> int:
        """Make a whole pass now, batch after batch; return the rows deleted."""
        before = self.expired + self.evicted
        self._due = 0.0
        self.step()
        while self._stage is not None:
            self.step()
        return self.expired + self.evicted - before

    def step(self) -> None:
        """Delete one small batch when a pass is due or under way; the pass goes on at the next step. Never raises."""
        if self._stage is None:
            if not (self.retention_days or self.max_rows) or time.monotonic() < self._due:
                return
            self._stage = "age"
        try:
            if self._stage == "age" and self._expire_a_batch():
                return
            self._stage = "cap"
            if self._evict_a_batch():
                return
        except Exception as exc:
            log.warning("retention failed, will retry: %s", exc)
            with contextlib.suppress(Exception):
                self.database.close()  # the next use opens a fresh connection
        self._stage, self._cap_cutoff = None, None
        self._due = time.monotonic() + EVERY_SECONDS

    def _expire_a_batch(self) -> bool:
        """Delete a batch of calls, else of model events, older than the retention period; True while there may be
        more."""
        if not self.retention_days:
            return False
        cutoff = self.clock() - timedelta(days=self.retention_days)
        deleted = writes.delete_older_than(self.database, cutoff, BATCH_ROWS)
        self.expired += deleted
        if deleted == BATCH_ROWS:
            return True
        if writes.delete_older_than(self.database, cutoff, BATCH_ROWS, models.ModelEvent) == BATCH_ROWS:
            return True
        if self.csv_log is not None:
            self.csv_log.prune(cutoff)
        return False

    def _evict_a_batch(self) -> bool:
        """Delete a batch of the oldest rows beyond the cap; True while there are more."""
        if not self.max_rows:
            return False
        if self._cap_cutoff is None:
            found = writes.cap_cutoff(self.database, self.max_rows)
            if found is None:
                return False
            self._cap_cutoff, beyond = found
            log.warning("the store holds %d row(s) beyond OLLAMA_PROXY_MAX_ROWS=%d; deleting the oldest",
                        beyond, self.max_rows)  # fmt: skip
        deleted = writes.delete_older_than(self.database, self._cap_cutoff, BATCH_ROWS)
        self.evicted += deleted
        if deleted == BATCH_ROWS:
            return True
        if self.csv_log is not None:
            self.csv_log.prune(self._cap_cutoff)  # rotated files whose every row the cap deleted
        return False
