"""Read side: usage per API key. The calls, errors and tokens of each key over a range (the dashboard's by-key table),
one key's own totals today and this month (``/analytics/me``), and each key's spend against its limits.

Counts come from the stored rows (``key_name``; empty for an anonymous call): on SQLite from the read model's
``calls_rollup_keys`` for whole 10-minute slots plus the raw rows at the edges and above its watermark, as stats.py
does; otherwise (PostgreSQL, or a client, text or instance filter) from the rows directly. The spend against a limit
comes from the limiter's shared counters of the current windows, through ``state_of(app).keys`` (store/limits.py's
``Keys``): it is passed in and only duck-typed here, as the dashboard reads no store module but the models. No Flask.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime

from peewee import SQL, Database, Table, fn

from proxy_app.calls import format_timestamp
from proxy_app.dashboard import readmodel
from proxy_app.dashboard.filters import Filters
from proxy_app.dashboard.queries import (
    attribution_conditions,
    conditions,
    dimension_conditions,
    matching,
    run,
    to_datetime,
)
from proxy_app.dashboard.stats import SLOT_SECONDS, errors, snapshot, split_range
from proxy_app.store.models import CallRow

log = logging.getLogger(__name__)

TOP_KEYS = 100  # rows of the by-key table, busiest first: each limited key costs a read of its counters
FIGURES = ("calls", "errors", "input_tokens", "output_tokens")
# The read model's table per key (SQLite only; readmodel.py creates and fills it).
ROLLUP_KEYS = Table("calls_rollup_keys", ("slot", "key_name", "model", "endpoint", "outcome", "http_status", "calls",
                                          "input_tokens", "output_tokens"))  # fmt: skip


def by_key(db: Database, filters: Filters, keys, now: datetime | None = None) -> list[dict]:
    """The TOP_KEYS busiest keys over the filters: key (None for anonymous calls), calls, errors, tokens in and out,
    and ``limits``, the spend of a limited key in the current windows (None when the key has none or is unknown)."""
    found = key_totals(db, filters, now or datetime.now(UTC))
    rows = []
    for key in sorted(found, key=lambda name: (-found[name]["calls"], name))[:TOP_KEYS]:
        policy = keys.ring.by_name(key) if key and keys is not None else None
        limited = policy is not None and policy.is_limited
        rows.append({"key": key or None, **found[key], "limits": spend(keys, policy) if limited else None})
    return rows


def own_usage(db: Database, name: str, now: datetime) -> dict:
    """The calls, errors and tokens of key ``name`` today and this month (UTC), from its own rows only."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    found = {}
    for window, since in (("today", today), ("month", today.replace(day=1))):
        totals = key_totals(db, Filters(key=name, since=since), now).get(name, dict.fromkeys(FIGURES, 0))
        found[window] = {"since": format_timestamp(since), **totals}
    return found


def key_totals(db: Database, filters: Filters, now: datetime) -> dict[str, dict]:
    """{key name ("" for anonymous): calls, errors, input and output tokens} over the filters, keys with calls only."""
    # An expression, not the column (never NULL): grouped by the column, SQLite would walk the whole (key_name,
    # timestamp) index to skip a sort rather than read the range's rows through the timestamp index.
    name = fn.COALESCE(CallRow.key_name, "").alias("name")
    tokens = (fn.COALESCE(fn.SUM(CallRow.input_tokens), 0), fn.COALESCE(fn.SUM(CallRow.output_tokens), 0))
    select = CallRow.select(name, fn.COUNT(SQL("*")), fn.COALESCE(errors(CallRow, 1), 0), *tokens).group_by(name)
    with snapshot(db):
        oldest = run(db, CallRow.select(fn.MIN(CallRow.timestamp)))[0][0]
        if oldest is None:
            return {}
        scoped = replace(filters, since=max(filters.since or to_datetime(oldest), to_datetime(oldest)))
        upto = readmodel.watermarks(db).get("keys")
        usable = upto is not None and not (filters.client or filters.q or filters.instance)
        slots, parts = split_range(scoped, SLOT_SECONDS, upto, now) if usable else (None, [])
        if slots is None:
            groups = run(db, matching(select, conditions(db, filters)))
        else:
            groups = _rollup_groups(db, filters, slots)
            for source, part in parts:
                groups += run(db, select.from_(source).where(*part, *attribution_conditions(filters)))
    found = {}
    for key, *values in groups:
        totals = found.setdefault(key, dict.fromkeys(FIGURES, 0))
        for figure, value in zip(FIGURES, values, strict=True):
            totals[figure] += int(value or 0)  # PostgreSQL sums to a Decimal
    return found


def _rollup_groups(db: Database, filters: Filters, slots: tuple) -> list[tuple]:
    totals = [fn.SUM(ROLLUP_KEYS.calls), errors(ROLLUP_KEYS, ROLLUP_KEYS.calls), fn.SUM(ROLLUP_KEYS.input_tokens),
              fn.SUM(ROLLUP_KEYS.output_tokens)]  # fmt: skip
    found = dimension_conditions(filters, ROLLUP_KEYS) + [ROLLUP_KEYS.slot >= slots[0], ROLLUP_KEYS.slot < slots[1]]
    if filters.key:
        found.append(ROLLUP_KEYS.key_name == filters.key)
    query = ROLLUP_KEYS.select(ROLLUP_KEYS.key_name, *totals).where(*found).group_by(ROLLUP_KEYS.key_name)
    return run(db, query)


def spend(keys, policy) -> dict | None:
    """Each limit of ``policy``: limit, used, remaining and resets_at (ISO 8601 UTC, None for streams); None when
    the counters cannot be read now (logged)."""
    try:
        usage = keys.limiter.usage(policy)
    except Exception:
        log.warning("cannot read the limit counters of key %r", policy.name, exc_info=True)
        return None
    return {name: _spent(figures) for name, figures in usage.items()}


def _spent(figures: dict) -> dict:
    resets_at = figures.get("resets_at")
    return {
        **{name: int(figures[name]) for name in ("limit", "used", "remaining")},  # a Decimal on PostgreSQL
        "resets_at": None if resets_at is None else format_timestamp(datetime.fromtimestamp(resets_at, UTC)),
    }
