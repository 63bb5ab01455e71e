"""The shared counters behind the key limits: the ``key_usage`` and ``key_streams`` tables, the UTC windows they
count in, and ``OneConnection``, the one database connection a process's threads share for them.

What the counters mean and how they are taken is limits.py's.
"""

from __future__ import annotations

import os
import threading
from calendar import monthrange
from datetime import UTC, datetime

from peewee import BigIntegerField, CharField, CompositeKey, Database, Model, SchemaManager

from proxy_app.store import models
from proxy_app.store.keys import ApiKey, add_missing_columns

MINUTE, DAY, MONTH = "minute", "day", "month"  # the periods of Policy.token_limits


class KeyUsage(Model):
    """Requests and tokens one key used in one window (``start``: the window's first second, UTC epoch)."""

    key_name = CharField(max_length=64)
    period = CharField(max_length=8)
    start = BigIntegerField()
    requests = BigIntegerField(default=0)
    tokens = BigIntegerField(default=0)

    class Meta:
        table_name = "key_usage"
        primary_key = CompositeKey("key_name", "period", "start")


class KeyStream(Model):
    """The calls of one key one process has in flight, and when that process last said so (UTC epoch)."""

    key_name = CharField(max_length=64)
    holder = CharField(max_length=200)  # instance, process id and a random part: one per process
    streams = BigIntegerField(default=0)
    seen = BigIntegerField()

    class Meta:
        table_name = "key_streams"
        primary_key = CompositeKey("key_name", "holder")


def create_tables(db: Database) -> None:
    """Create the key tables that are missing, and the columns an older ``api_keys`` lacks."""
    for model in (ApiKey, KeyUsage, KeyStream):
        SchemaManager(model, database=db).create_all(safe=True)
    add_missing_columns(db)


def window_start(period: str, now: float) -> int:
    """The first second (UTC epoch) of the window of ``period`` that holds ``now``."""
    if period == MINUTE:
        return int(now // 60 * 60)
    if period == DAY:
        return int(now // 86400 * 86400)  # UTC days have 86,400 seconds in epoch time
    start, end = _month
    if not start <= now < end:  # once a month: months differ in length
        moment = datetime.fromtimestamp(now, UTC)
        start = int(moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
        _month[:] = [start, window_end(MONTH, start)]
    return start


_month = [0, 0]  # the month window_start last found: [start, end)


def window_end(period: str, start: int) -> int:
    if period == MINUTE:
        return start + 60
    if period == DAY:
        return start + 86400
    moment = datetime.fromtimestamp(start, UTC)
    return start + monthrange(moment.year, moment.month)[1] * 86400


class OneConnection:
    """One database connection per process, shared by its threads one at a time (``with connection as db``).

    A gunicorn worker opens its own after the fork; the parent's is never used by a child.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self._db: Database | None = None
        self._pid = 0

    def __enter__(self) -> Database:
        if self._pid != os.getpid():  # a new process: a lock a parent thread held at the fork is never released
            self._lock, self._db, self._pid = threading.RLock(), None, os.getpid()
        self._lock.acquire()
        if self._db is None:
            options = {"check_same_thread": False} if self.url.startswith("sqlite") else {}
            self._db = models.open_database(self.url, thread_safe=False, **options)
        return self._db

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def close(self) -> None:
        with self as db:
            db.close()
