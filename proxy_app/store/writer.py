"""The background writer: finished calls go into a bounded queue; one thread per process stores them in batches.

Each batch is inserted in one transaction (IMMEDIATE on SQLite), then appended to the CSV mirror. A batch the
database refuses because it is locked, gone or full is tried again, with growing pauses, for up to ``retry_seconds``
(the queue holds the calls that arrive meanwhile); only then is it dropped. A batch refused for any other reason is
inserted again one row per transaction, so a row the database will not take costs only itself. Between batches the
same thread runs a step of retention (retention.py). A full queue or a database that stays down costs a counted,
logged drop and never an error or a wait for the client. This module does not build calls (forward.py) or publish
metrics: it keeps the counts (``written``, ``dropped``, ``refused``, ``evicted``, ``depth``) for metrics.py to read."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime

from peewee import Database

from proxy_app.store import schema, writes
from proxy_app.store.csvlog import CsvLog
from proxy_app.store.retention import Retention
from proxy_app.ticker import Ticker

log = logging.getLogger(__name__)

BATCH_ROWS = 500  # most calls per transaction: enough to amortise a commit, few enough to keep the lock short
# Why: a transaction and a CSV append cost several times a row, whatever their size; at low load each call would pay
# for both alone. Waiting this long once for a batch to fill costs nothing the client sees (docs/design.md).
LINGER_SECONDS = 0.02
TICK_SECONDS = 1.0  # an idle writer wakes this often to see whether retention is due
RETRY_SECONDS = 60.0  # how long a refused batch is tried again before it is dropped (a locked or restarting database)
RETRY_PAUSES = (0.1, 0.25, 0.5, 1.0, 2.0)  # seconds between tries; the last one repeats
DROP_LOG_SECONDS = 60.0  # at most one drop warning a minute: a full queue must not flood the log
REFUSALS_LOGGED_A_MINUTE = 10  # refused rows are logged one by one, with their ids, up to this many a minute
SHUTDOWN_SECONDS = 10.0  # how long a shutdown waits for the queue to drain
_STOP = object()  # the sentinel that ends the thread once everything before it is stored


class Writer:
    """Stores calls off the request path. ``submit`` never blocks; ``flush`` and ``stop`` wait with a timeout."""

    def __init__(self, database: Database, csv_log: CsvLog | None, maxsize: int, retention_days: int = 0,
                 retry_seconds: float = RETRY_SECONDS, clock=lambda: datetime.now(UTC),
                 max_rows: int = 0) -> None:  # fmt: skip
        self.database = database
        self.csv_log = csv_log
        self.maxsize = maxsize  # 0: unbounded
        self.retention = Retention(database, csv_log, retention_days, max_rows, clock)  # 0, 0: keep everything
        self.retry_seconds = retry_seconds  # 0: a refused batch is dropped at once
        self.schema_ready = False  # create_tables succeeded in this database (else the thread retries it)
        self.written = 0
        self.dropped = 0
        self.csv_failed = 0  # rows stored in the database whose CSV append failed
        self.retries = 0  # tries after the first for batches the database refused
        self.refused = 0  # calls the database refused on their own (also counted in dropped)
        self._refusal_window_ends, self._refusals_logged = 0.0, 0
        self.last_error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize)
        # The thread: at once from one batch to the next (taking a batch waits up to TICK_SECONDS for a call).
        self._ticker = Ticker("call-writer", self._tick, TICK_SECONDS, on_exit=self._reconnect,
                              after_fork=self._forget_parent)  # fmt: skip
        self._stopping = threading.Event()  # set by stop(); also wakes a retry pause at once
        self._lock = threading.Lock()
        self._next_drop_log = 0.0

    @property
    def restarts(self) -> int:
        """Writer threads started in place of one that crashed."""
        return self._ticker.restarts

    @property
    def _thread(self) -> threading.Thread | None:
        return self._ticker.thread  # this process's writer thread, if it started one

    @property
    def _pid(self) -> int | None:
        return self._ticker.pid

    @property
    def depth(self) -> int:
        """Calls waiting in this process's queue."""
        return self._queue.qsize()

    @property
    def evicted(self) -> int:
        """Rows this process deleted to keep the store within MAX_ROWS."""
        return self.retention.evicted

    def submit(self, call) -> None:
        """Queue a finished call (a call sink). A full queue, a stopped writer or any error counts a drop."""
        try:
            if self._stopping.is_set():
                raise queue.Full
            self._ticker.ensure()
            self._queue.put_nowait(call)
        except queue.Full:
            self._drop(1, "the writer queue is full" if not self._stopping.is_set() else "the writer is stopped")
        except Exception as exc:  # never let storage trouble reach the relay
            self._drop(1, f"cannot queue the call: {exc!r}")

    def flush(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Wait until every call submitted so far is stored (or dropped); False if that took longer than ``timeout``."""
        if self._pid != os.getpid():
            return True  # nothing was submitted in this process
        deadline = time.monotonic() + timeout
        pending = self._queue
        while True:
            with pending.all_tasks_done:
                if not pending.unfinished_tasks:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pending.all_tasks_done.wait(min(remaining, TICK_SECONDS))
            self._ticker.ensure()  # a crashed thread is replaced rather than waited for, even when stopping

    def stop(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Store what is queued, then end the thread; calls submitted afterwards are dropped. False on timeout."""
        self._stopping.set()
        thread = self._thread
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            return True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        thread.join(timeout)
        return not thread.is_alive()

    def close(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Flush, then stop: the shutdown hook. Safe to call twice."""
        self.flush(timeout)
        self.stop(timeout)

    def health(self) -> dict:
        """The /health entry: ok unless the thread died or the last batch failed."""
        started_here = self._thread is not None and self._pid == os.getpid()
        alive = started_here and self._thread.is_alive()
        crashed = started_here and not alive and not self._stopping.is_set()
        return {"ok": not crashed and self.last_error is None, "alive": alive, "depth": self.depth,
                "written": self.written, "dropped": self.dropped, "error": self.last_error}  # fmt: skip

    def retain(self) -> int:
        """Delete every row and rotated CSV file past the retention period, then rows beyond the cap, now."""
        return self.retention.run()

    # ---- the thread -------------------------------------------------------------------------------------------

    def _forget_parent(self) -> None:
        """In a new child process: fresh locks and queue (the ticker forgets the thread). The parent stores what it
        had queued."""
        self._lock = threading.Lock()  # a lock held by a parent thread at fork time would never be released here
        self.database._lock = threading.RLock()  # peewee's connect/close lock, same reason
        self._queue = queue.Queue(self.maxsize)

    def _tick(self) -> float:
        """The ticker's task: one batch; once the stop sentinel is reached, the ticker stops and the thread ends."""
        if not self._serve_once(self._queue):
            self._ticker.stop()
        return 0.0

    def _serve_once(self, pending: queue.Queue) -> bool:
        """Store one batch and do a little retention; False once the stop sentinel has been reached."""
        batch = self._take_batch(pending)
        calls = [item for item in batch if item is not _STOP]
        try:
            if calls:
                self._store(calls)
            self.retention.step()
        except Exception:
            self._drop(len(calls), "the writer thread failed on this batch")
            raise
        finally:
            for _ in batch:
                pending.task_done()
        return not any(item is _STOP for item in batch)

    def _take_batch(self, pending: queue.Queue) -> list:
        try:
            batch = [pending.get(timeout=TICK_SECONDS)]
        except queue.Empty:
            return []
        lingered = False
        while len(batch) < BATCH_ROWS and batch[-1] is not _STOP:
            try:
                batch.append(pending.get_nowait())
            except queue.Empty:
                if lingered or self._stopping.is_set():
                    break
                lingered = True
                time.sleep(LINGER_SECONDS)
        return batch

    def _store(self, calls: list) -> None:
        """Insert the batch, then mirror the rows the database took to the CSV."""
        stored = self._insert(calls, time.monotonic() + self.retry_seconds)
        if stored:
            with self._lock:
                self.written += len(stored)
            self._append_csv(stored)

    def _insert(self, calls: list, give_up: float) -> list | None:
        """Insert the calls in one transaction; return those stored, or None once they are dropped.

        A database that is locked, gone or full gets the calls again until it takes them, until ``give_up`` or until
        the writer is stopped; then they are dropped. Any other error belongs to a row (text or a number the database
        will not hold): the calls are then inserted one at a time, so a row refused alone is the only one lost.
        """
        for attempt in itertools.count():
            try:
                if not self.schema_ready:
                    self.schema_ready = schema.create_tables(self.database) > 0
                writes.insert_calls(self.database, calls)
                self.last_error = None
                return calls
            except Exception as exc:
                self.last_error = writes.describe_error(exc)
                self._reconnect()
                transient = writes.is_transient(exc)
                if not transient and self.schema_ready:
                    return self._insert_each(calls, give_up) if len(calls) > 1 else self._refuse(calls[0])
                pause = RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)]
                if not transient or self._stopping.is_set() or time.monotonic() + pause > give_up:
                    self._drop(len(calls), f"the database refused a batch: {self.last_error}")
                    return None
                if not attempt:
                    log.warning("the database refused a batch of %d row(s): %s; trying again for up to %.0f s",
                                len(calls), self.last_error, self.retry_seconds)  # fmt: skip
                self.retries += 1
                self._stopping.wait(pause)

    def _insert_each(self, calls: list, give_up: float) -> list:
        """Insert the calls of a refused batch one per transaction, in order; return those stored."""
        stored = []
        for index, call in enumerate(calls):
            taken = self._insert([call], give_up)
            if taken is None:  # the database went away meanwhile: the rest of the batch goes with this row
                self._drop(len(calls) - index - 1, f"the database refused a batch: {self.last_error}")
                break
            stored += taken
        return stored

    def _refuse(self, call) -> list:
        """Count and log a call the database refused on its own (logged with its id, at most a few a minute)."""
        with self._lock:
            self.refused += 1
            self.dropped += 1
            now = time.monotonic()
            if now >= self._refusal_window_ends:
                self._refusal_window_ends, self._refusals_logged = now + DROP_LOG_SECONDS, 0
            self._refusals_logged += 1
            quiet = self._refusals_logged > REFUSALS_LOGGED_A_MINUTE
        if not quiet:
            log.warning("the database refused call %s, which alone is dropped: %s (%d refused so far in this process)",
                        call.request_id, self.last_error, self.refused)  # fmt: skip
        return []

    def _append_csv(self, calls: list) -> None:
        if self.csv_log is None:
            return
        try:
            self.csv_log.append(calls)
        except OSError as exc:
            self.csv_failed += len(calls)
            log.warning("could not append %d row(s) to the CSV mirror %s: %s", len(calls), self.csv_log.path, exc)
        except ValueError:  # text the file's encoding refuses: one row's fault, so the others go in one by one
            for call in calls:
                try:
                    self.csv_log.append([call])
                except (OSError, ValueError) as exc:
                    self.csv_failed += 1
                    log.warning("could not append call %s to the CSV mirror %s: %s",
                                call.request_id, self.csv_log.path, exc)  # fmt: skip

    def _reconnect(self) -> None:
        """Forget this thread's connection so the next batch opens a fresh one (a restarted PostgreSQL, say)."""
        with contextlib.suppress(Exception):
            self.database.close()

    def _drop(self, count: int, reason: str) -> None:
        if not count:
            return
        with self._lock:
            self.dropped += count
            now = time.monotonic()
            if now < self._next_drop_log:
                return
            self._next_drop_log = now + DROP_LOG_SECONDS
        log.warning("dropped %d call record(s): %s (%d dropped so far in this process)", count, reason, self.dropped)
