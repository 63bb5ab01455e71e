"""What one process knows of one key's counters, and the arithmetic the limiter (limits.py) does on it: the size of
a request lease, the windows of a key's token limits, the tokens spent in a window as this process knows them, and
whether every token limit still has more than the margin left. A key's windows are kept until the first of them ends;
the room left above the margin is kept too, lowered by each charge, until a read, a write or a new window redoes it.

None of this touches the database: the limiter reads and writes the counters and keeps a ``KeyState`` per key, under
its lock, for these functions to reason about; limits.py keeps what talks to the database: the transactions, the
batched writes and the background ticker.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from proxy_app.apikeys import Policy
from proxy_app.store.counters import window_end, window_start

LEASE_SHARE = 16
LEASE_MAX = 1024
MIN_MARGIN_TOKENS = 1000  # the margin is this, or four times the largest call of the key seen here if larger


def lease_size(remaining: int) -> int:
    return max(1, min(LEASE_MAX, remaining // LEASE_SHARE))


@dataclass
class KeyState:
    """What one process knows of one key's counters."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    minute: int = 0  # the minute of the lease
    lease_left: int = 0  # requests granted and not yet used
    minute_full: bool = False  # the database granted every request of this minute
    view: dict = field(default_factory=dict)  # period -> (window start, tokens in the database when read)
    view_at: float = -math.inf  # monotonic time of that read
    pending: dict = field(default_factory=dict)  # (period, window start) -> tokens charged, not yet written
    biggest: int = 0  # the most tokens one call of this key used in this process
    streams: int = 0  # calls of this key in flight in this process, with a stream limit
    windows: tuple = ()  # the windows of the key's token limits, kept by current_windows while they hold
    windows_limits: tuple = ()  # the token limits they were made for
    windows_span: tuple[float, float] = (math.inf, -math.inf)  # [from, until): when every one of them holds
    # the tokens this process may still charge before a window of ``windows`` is within the margin; None: to be
    # worked out again (the view, the windows or the margin changed)
    headroom: int | None = None


def windows(policy: Policy, now: float) -> tuple[tuple[str, int, int], ...]:
    """(period, limit, window start) of each token limit of the key, at ``now``."""
    return tuple((period, limit, window_start(period, now)) for period, limit in policy.token_limits)


def current_windows(state: KeyState, policy: Policy, now: float) -> tuple[tuple[str, int, int], ...]:
    """``windows(policy, now)``, kept in ``state`` until one of them ends or the key's limits change (the caller
    holds ``state.lock``)."""
    since, until = state.windows_span
    if not since <= now < until or state.windows_limits != policy.token_limits:
        state.windows, state.windows_limits, state.headroom = windows(policy, now), policy.token_limits, None
        state.windows_span = (
            max((start for _period, _limit, start in state.windows), default=-math.inf),
            min((window_end(period, start) for period, _limit, start in state.windows), default=math.inf),
        )
    return state.windows


def spent(state: KeyState, period: str, start: int) -> int:
    """The tokens of the window as this process knows them: the database's when last read, and its own since."""
    seen_start, seen = state.view.get(period, (start, 0))
    return (seen if seen_start == start else 0) + state.pending.get((period, start), 0)


def has_margin(state: KeyState) -> bool:
    """True when every token limit of the kept windows (``current_windows``) has more than the margin left, as far
    as this process knows. The smallest room above the margin is kept in ``state.headroom``: a charge takes its
    tokens off it (``charged``), and anything else that changes it sets it to None."""
    if state.headroom is None:
        margin = max(MIN_MARGIN_TOKENS, 4 * state.biggest)
        room = (limit - spent(state, period, start) - margin for period, limit, start in state.windows)
        state.headroom = min(room, default=1)
    return state.headroom > 0


def charged(state: KeyState, tokens: int) -> None:
    """Add a call's ``tokens`` to what ``state`` has pending in each kept window (the caller holds ``state.lock``)."""
    if tokens > state.biggest:
        state.biggest, state.headroom = tokens, None  # a bigger margin
    for period, _limit, start in state.windows:
        state.pending[period, start] = state.pending.get((period, start), 0) + tokens
    if state.headroom is not None:
        state.headroom -= tokens  # every window's spending grew by as much
