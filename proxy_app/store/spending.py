"""What an API key has spent of each of its limits, as ``/analytics/me``, the dashboard's by-key table and
``ollama-proxy keys usage`` show it: the limit, what is used, what remains, and when the window ends.

Requests count as used when granted to a process (a lease's unused part included); tokens include the charges the
asking process has not written yet.
"""

from __future__ import annotations

from peewee import Database

from proxy_app.apikeys import Policy
from proxy_app.store.counters import DAY, MINUTE, MONTH, KeyUsage, window_end, window_start
from proxy_app.store.streams import StreamCounts

_LIMITS = (  # limit, its window, what it counts
    ("rpm", MINUTE, "requests"), ("tpm", MINUTE, "tokens"), ("tokens_per_day", DAY, "tokens"),
    ("tokens_per_month", MONTH, "tokens"),
)  # fmt: skip


def spend(db: Database, policy: Policy, streams: StreamCounts, pending: dict, now: float) -> dict:
    """Each limit of the key at ``now``: {"limit", "used", "remaining", "resets_at" (UTC epoch, None for streams)}.

    ``pending``: (period, window start) -> tokens this process has charged and not yet written."""
    starts = {period: window_start(period, now) for period in (MINUTE, DAY, MONTH)}
    rows = KeyUsage.select().where(
        KeyUsage.key_name == policy.name, KeyUsage.start.in_(list(starts.values()))
    ).execute(db)  # fmt: skip
    counters = {(row.period, row.start): row for row in rows}
    result = {}
    for name, period, unit in _LIMITS:
        limit = getattr(policy, name)
        if limit:
            window = (period, starts[period])
            row = counters.get(window)
            used = (getattr(row, unit) if row is not None else 0) + (pending.get(window, 0) if unit == "tokens" else 0)
            result[name] = _spent(limit, used, window_end(period, starts[period]))
    if policy.max_streams:
        result["max_streams"] = _spent(policy.max_streams, streams.live(db, policy.name, now), None)
    return result


def _spent(limit: int, used: int, resets_at: int | None) -> dict:
    return {"limit": limit, "used": used, "remaining": max(0, limit - used), "resets_at": resets_at}
