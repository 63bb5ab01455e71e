"""Per-key limits that hold across threads, gunicorn workers and proxy instances sharing one database, with no
other server: the counters live in the analytics database (``key_usage``, ``key_streams``: counters.py) and every
process takes its share through short transactions on them.

- Requests per minute: a process takes a *lease*, a number of requests granted at once by one transaction that
  never grants past the limit, and admits that many calls with no database round trip. A lease is a sixteenth of
  what remains of the minute (at most keystate.LEASE_MAX), so it shrinks to one request as the minute fills up:
  the database never grants more than the limit, and with a limit under 2 × keystate.LEASE_SHARE every call asks
  it.
- Tokens per minute, day and month: checked before a call (refused once spent) and charged when it ends. A process
  admits without asking the database while its view of the counters is under VIEW_SECONDS old and every limit has
  more than the margin (keystate.py) left; nearer a limit it reads the counters before each call and writes each
  charge at once, so the limit is overshot by at most the tokens of the calls in flight when it was reached.
- Streams (calls in flight at once): one transaction when a call starts and one when it ends; a process that dies
  holding some stops counting after streams.STREAM_STALE_SECONDS without its heartbeat (streams.py).

Windows are UTC: the minute, the day from midnight, the month from its first day.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from proxy_app.apikeys import Policy
from proxy_app.store import keystate, spending
from proxy_app.store.counters import (
    DAY,
    MINUTE,
    MONTH,
    KeyUsage,
    OneConnection,
    window_end,
    window_start,
)  # fmt: skip
from proxy_app.store.keystate import KeyState
from proxy_app.store.streams import StreamCounts
from proxy_app.ticker import Ticker

log = logging.getLogger(__name__)

VIEW_SECONDS = 1.0
FLUSH_SECONDS = 0.1  # charges far from every limit are written in batches this often
HEARTBEAT_SECONDS = 10.0
PRUNE_SECONDS = 3600.0
KEEP_SECONDS = {MINUTE: 3600, DAY: 40 * 86400, MONTH: 400 * 86400}  # counters older than this are deleted
_PERIOD_WORDS = {MINUTE: "minute", DAY: "day", MONTH: "month"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call is not admitted: its status (429), the message and the seconds until it may be tried again."""

    status: int
    message: str
    retry_after: int


class Limiter:
    """Admits, refuses and charges the calls of limited keys (see the module's docstring for how)."""

    def __init__(self, connection: OneConnection, instance: str) -> None:
        self.connection, self.instance = connection, instance
        self._states: dict[str, KeyState] = {}
        self._states_lock = threading.Lock()
        self.streams = StreamCounts(instance)
        self._last_heartbeat = self._last_prune = 0.0
        self.ticker = Ticker("key-limits", self.flush, FLUSH_SECONDS, after_fork=self._after_fork)

    # ---- on the request path ------------------------------------------------------------------------------------

    def admit(self, policy: Policy) -> Refusal | None:
        """Take what a call of ``policy`` needs (a request, a stream) or say why not; None admits it."""
        state, now = self._state(policy.name), time.time()
        with state.lock:
            refusal = self._check_tokens(policy, state, now) if policy.counts_tokens else None
            if refusal is None and policy.max_streams:
                refusal = self._enter_stream(policy, state, now)
            if refusal is None and policy.rpm:
                refusal = self._take_request(policy, state, now)
                if refusal is not None and policy.max_streams:
                    self._leave_stream(policy, state)
        return refusal

    def leave(self, policy: Policy) -> None:
        """An admitted call ended: free its stream."""
        if policy.max_streams:
            state = self._state(policy.name)
            with state.lock:
                self._leave_stream(policy, state)

    def charge(self, policy: Policy, tokens: int) -> None:
        """Count the tokens of an ended call against the key's token limits: in the next batch, or at once near a
        limit (where each admission reads the counters)."""
        if not policy.counts_tokens or tokens <= 0:
            return
        state = self._state(policy.name)
        with state.lock:
            keystate.current_windows(state, policy, time.time())  # kept in state, which charged and has_margin read
            first = not state.pending
            keystate.charged(state, tokens)
            if keystate.has_margin(state):
                if first:  # the writer of the batch: started, or started again after a fork or a crash
                    self.ticker.ensure()
            else:
                self._write_charges(policy.name, state)

    # ---- requests per minute ----------------------------------------------------------------------------------

    def _take_request(self, policy: Policy, state: KeyState, now: float) -> Refusal | None:
        minute = window_start(MINUTE, now)
        if state.minute != minute:
            state.minute, state.lease_left, state.minute_full = minute, 0, False
        if not state.lease_left and not state.minute_full:
            state.lease_left = self._grant_requests(policy.name, minute, policy.rpm)
            state.minute_full = not state.lease_left
        if state.lease_left:
            state.lease_left -= 1
            return None
        return _over(f"{policy.rpm} requests per minute", window_end(MINUTE, minute) - now)

    def _grant_requests(self, name: str, minute: int, limit: int) -> int:
        where = (KeyUsage.key_name == name) & (KeyUsage.period == MINUTE) & (KeyUsage.start == minute)
        with self.connection as db, db.atomic():
            KeyUsage.insert(key_name=name, period=MINUTE, start=minute).on_conflict_ignore().execute(db)
            query = KeyUsage.select(KeyUsage.requests).where(where)
            used = (query.for_update() if db.for_update else query).scalar(db)
            grant = min(limit - used, keystate.lease_size(limit - used)) if used < limit else 0
            if grant:
                KeyUsage.update(requests=KeyUsage.requests + grant).where(where).execute(db)
        return grant

    # ---- tokens -------------------------------------------------------------------------------------------------

    def _check_tokens(self, policy: Policy, state: KeyState, now: float) -> Refusal | None:
        windows = keystate.current_windows(state, policy, now)
        if time.monotonic() - state.view_at < VIEW_SECONDS and keystate.has_margin(state):
            return None  # the common case: far from every limit, as of a recent read
        self._read_view(policy.name, state, windows)
        for period, limit, start in windows:
            if keystate.spent(state, period, start) >= limit:
                return _over(f"{limit} tokens per {_PERIOD_WORDS[period]}", window_end(period, start) - now)
        return None

    def _read_view(self, name: str, state: KeyState, windows: tuple) -> None:
        with self.connection as db:
            rows = KeyUsage.select(KeyUsage.period, KeyUsage.start, KeyUsage.tokens).where(
                KeyUsage.key_name == name, KeyUsage.period.in_([period for period, _limit, _start in windows])
            ).execute(db)  # fmt: skip
            found = {(row.period, row.start): row.tokens for row in rows}
        state.view = {period: (start, found.get((period, start), 0)) for period, _limit, start in windows}
        state.view_at, state.headroom = time.monotonic(), None

    def _write_charges(self, name: str, state: KeyState) -> None:
        """Add the key's pending charges to the database (the caller holds ``state.lock``)."""
        if not state.pending:
            return
        try:
            with self.connection as db, db.atomic():
                for (period, start), tokens in state.pending.items():
                    KeyUsage.insert(key_name=name, period=period, start=start, tokens=tokens).on_conflict(
                        conflict_target=[KeyUsage.key_name, KeyUsage.period, KeyUsage.start],
                        update={KeyUsage.tokens: KeyUsage.tokens + tokens},
                    ).execute(db)  # fmt: skip
        except Exception:
            log.warning("cannot write the token charges of key %r; they are kept and tried again", name, exc_info=True)
            return
        # what was pending is in the database now: the view counts it (others' charges come with the next read)
        for (period, start), tokens in state.pending.items():
            seen_start, seen = state.view.get(period, (start, 0))
            state.view[period] = (start, (seen if seen_start == start else 0) + tokens)
        state.pending.clear()
        state.headroom = None

    # ---- streams ------------------------------------------------------------------------------------------------

    def _enter_stream(self, policy: Policy, state: KeyState, now: float) -> Refusal | None:
        with self.connection as db, db.atomic():
            if not self.streams.enter(db, policy.name, policy.max_streams, state.streams, now):
                return _over(f"{policy.max_streams} calls at once", 1)
        state.streams += 1
        self.ticker.ensure()  # the heartbeat that keeps these streams counted
        return None

    def _leave_stream(self, policy: Policy, state: KeyState) -> None:
        state.streams = max(0, state.streams - 1)
        try:
            with self.connection as db:
                self.streams.count(db, policy.name, state.streams, time.time())
        except Exception:  # the heartbeat writes the right count again
            log.warning("cannot free a stream of key %r now; the next heartbeat will", policy.name, exc_info=True)

    # ---- in the background --------------------------------------------------------------------------------------

    def flush(self) -> None:
        """The ticker's task: write pending charges, say which streams are still running, delete old counters.
        Never raises: the thread must outlive a database that is down (each part tries again on its next turn)."""
        now = time.time()
        for name, state in list(self._states.items()):
            with state.lock:
                self._write_charges(name, state)
        try:
            if now - self._last_heartbeat >= HEARTBEAT_SECONDS:
                self._last_heartbeat = now
                self._heartbeat(now)
            if now - self._last_prune >= PRUNE_SECONDS:
                self._last_prune = now
                self._prune(now)
        except Exception:
            log.warning("cannot update the key counters' heartbeat or prune them now", exc_info=True)

    def _after_fork(self) -> None:
        """In a new child process: none of the parent's counts or locks (the parent writes its own charges)."""
        self._states, self._states_lock = {}, threading.Lock()

    def _heartbeat(self, now: float) -> None:
        with self.connection as db:
            for name, state in list(self._states.items()):
                if state.streams:
                    self.streams.count(db, name, state.streams, now)

    def _prune(self, now: float) -> None:
        with self.connection as db:
            for period, keep in KEEP_SECONDS.items():
                KeyUsage.delete().where(KeyUsage.period == period, KeyUsage.start < int(now - keep)).execute(db)
            self.streams.prune(db, now)

    def close(self) -> None:
        """At shutdown: write pending charges, give back unused requests, and drop this process's stream counts."""
        self.ticker.stop()
        now = time.time()
        try:
            for name, state in list(self._states.items()):
                with state.lock, self.connection as db:  # in this order, as everywhere: the ticker may be writing
                    self._write_charges(name, state)
                    if state.lease_left and state.minute == window_start(MINUTE, now):
                        where = (KeyUsage.key_name == name) & (KeyUsage.period == MINUTE)
                        KeyUsage.update(requests=KeyUsage.requests - state.lease_left).where(
                            where & (KeyUsage.start == state.minute)
                        ).execute(db)  # fmt: skip
                        state.lease_left = 0
            with self.connection as db:
                self.streams.forget_mine(db)
        except Exception:
            log.warning("cannot settle the key counters at shutdown", exc_info=True)

    # ---- reading ------------------------------------------------------------------------------------------------

    def usage(self, policy: Policy) -> dict:
        """Each limit of the key: the limit, what is used, what remains and when its window ends (spending.py)."""
        with self.connection as db:
            return spending.spend(db, policy, self.streams, self._state(policy.name).pending, time.time())

    def _state(self, name: str) -> KeyState:
        state = self._states.get(name)
        if state is None:
            with self._states_lock:
                state = self._states.setdefault(name, KeyState())
        return state


def _over(what: str, seconds: float) -> Refusal:
    return Refusal(429, f"rate limit: this API key may use {what}; try again later", max(1, math.ceil(seconds)))
