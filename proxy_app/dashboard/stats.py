"""Read side: the numbers behind the dashboard's cards, per-model table and time series, for one set of filters.

Counts and token sums are exact and come from SQL: on SQLite from the read model's rollup for whole 10-minute slots
plus the raw rows at the edges of the range and above the rollup's watermark; otherwise (PostgreSQL, or a client,
text, key or instance filter) from the rows directly. Percentiles (latency, TTFT, tokens/s) are nearest-rank over the
matching rows when there are at most SAMPLE_ROWS of them, else over an evenly spread sample of rows, which the answer
says; the p50 load time of cold starts is over the newest COLD_ROWS of them. Every query is built with peewee (the
read model's tables as peewee Tables), so values are bound in the store's own param style. No Flask here and no
writes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from datetime import UTC, datetime
from functools import reduce

from peewee import JOIN, SQL, Case, Cast, Database, NodeList, Select, Table, Value, fn

from proxy_app.dashboard import readmodel
from proxy_app.dashboard.filters import Filters
from proxy_app.dashboard.queries import (
    ERROR_OUTCOMES,
    conditions,
    dimension_conditions,
    matching,
    run,
    to_datetime,
)
from proxy_app.dashboard.summary import assemble, bucket_width, ceil_time, empty_document, floor_time, time_key
from proxy_app.store.models import CallRow

SAMPLE_ROWS = 20_000  # percentiles are exact up to this many matching rows, else estimated from about this many
MAX_VISITS = 60_000  # most rows read for one sample
# Why: rows stored one after the other share disk pages, so a sample of runs of 16 consecutive rows reads about a
# fifth of the pages that single rows would; 1,250 runs still spread over every bucket of a chart.
BLOCK_ROWS = 16
SLOT_SECONDS = 600  # the rollup's slot
COLD_ROWS = 20_000  # the newest cold starts a p50 load time is taken over
# The read model's tables (SQLite only; readmodel.py creates and fills them).
ROLLUP = Table("calls_rollup", readmodel.ROLLUP_COLUMNS)
ROLLUP_CLIENTS = Table("calls_rollup_clients", ("slot", "model", "ip_source", "calls"))
# SQLite's table hint for a read that must use the id range and no index of a filter's column: plain SQL because
# peewee has no word for it.
CALLS_NOT_INDEXED = NodeList((CallRow, SQL("NOT INDEXED")))
SAMPLE_COLUMNS = (CallRow.timestamp, fn.COALESCE(CallRow.model, ""), CallRow.total_time_ms, CallRow.ttft_ms,
                  CallRow.tokens_per_second)  # fmt: skip


def stats(db: Database, filters: Filters, now: datetime | None = None) -> dict:
    """Return cards, per-model rows, time series and the percentile method for the filters."""
    now = now or datetime.now(UTC)
    with snapshot(db):
        oldest = run(db, CallRow.select(fn.MIN(CallRow.timestamp)))[0][0]
        if oldest is None:
            return empty_document(filters, now)
        since = filters.since or to_datetime(oldest)  # the range shown
        scoped = replace(filters, since=max(since, to_datetime(oldest)))  # the range read: rollup slots start here
        # Minute buckets come from the rows; wider ones from 10-minute groups, which the rollup can answer.
        chars = max(bucket_width(since, filters.until or now)[1], readmodel.SLOT_CHARS)
        upto = readmodel.watermarks(db).get("rollup")
        groups = _groups(db, scoped, chars, upto, now)
        clients = _clients(db, scoped, upto, now)
        sample, exact = _sample(db, scoped, sum(group[2] for group in groups))
        cold = _cold_rows(db, scoped, upto) if any(group[-1] for group in groups) else []
    return assemble(filters, since, now, groups, clients, sample, exact, cold)


def snapshot(db: Database):
    """A read transaction, so that the rollup, its watermark and the raw rows are read from one snapshot."""
    return db.atomic(lock_type="DEFERRED") if readmodel.is_sqlite(db) else db.atomic()


def bucket_key(db: Database, chars: int):
    """Return the expression for a row's bucket key: the leading characters of its timestamp as text."""
    if readmodel.is_sqlite(db):
        return fn.SUBSTR(CallRow.timestamp, 1, chars)
    return fn.SUBSTR(fn.TO_CHAR(CallRow.timestamp, "YYYY-MM-DD HH24:MI:SS"), 1, chars)


def needs_rows(filters: Filters) -> bool:
    """True when a filter names what the rollups do not keep (client, text, key, instance): read the rows."""
    return bool(filters.client or filters.q or filters.key or filters.instance)


def errors(source, calls):
    """Return the expression summing ``calls`` (1 for a row, the calls column of a rollup) over error outcomes."""
    return fn.SUM(Case(None, [(source.outcome.in_(ERROR_OUTCOMES), calls)], 0))


# ---- counts ------------------------------------------------------------------------------------------------------


def _total(column):
    """SUM of a 64-bit token column, 0 when none, as an integer (PostgreSQL sums BIGINT to NUMERIC: a Decimal)."""
    return fn.COALESCE(fn.SUM(column), 0).cast("BIGINT")


def _groups(db: Database, filters: Filters, chars: int, upto: int | None, now: datetime) -> list[tuple]:
    """Return (bucket key, model, calls, errors, input tokens, output tokens, then for the calls that reported cached
    prompt tokens: their number, cached tokens, input tokens; cold starts) groups covering the filters."""
    key, label = bucket_key(db, chars).alias("bucket"), fn.COALESCE(CallRow.model, "").alias("label")
    tokens = [_total(CallRow.input_tokens), _total(CallRow.output_tokens)]
    reported = CallRow.cached_input_tokens.is_null(False)
    cache = [fn.COUNT(CallRow.cached_input_tokens), _total(CallRow.cached_input_tokens),
             _total(Case(None, [(reported, CallRow.input_tokens)])),
             fn.SUM(Case(None, [(CallRow.cold_start, 1)], 0))]  # fmt: skip
    # Grouped by the output names, so that the bucket expression and its bound values appear once in the SQL.
    select = CallRow.select(key, label, fn.COUNT(SQL("*")), errors(CallRow, 1), *tokens, *cache).group_by(key, label)
    usable = upto is not None and chars <= readmodel.SLOT_CHARS and not needs_rows(filters)
    slots, parts = split_range(filters, SLOT_SECONDS, upto, now) if usable else (None, [])
    if slots is None:
        return run(db, matching(select, conditions(db, filters)))
    cells = [(slot[:chars], *rest) for slot, *rest in _rollup_groups(db, filters, slots)]
    for source, part in parts:
        cells += run(db, select.from_(source).where(*part))
    return cells


def _rollup_groups(db: Database, filters: Filters, slots: tuple) -> list[tuple]:
    totals = [fn.SUM(ROLLUP.calls), errors(ROLLUP, ROLLUP.calls), fn.SUM(ROLLUP.input_tokens),
              fn.SUM(ROLLUP.output_tokens), fn.SUM(ROLLUP.cache_calls), fn.SUM(ROLLUP.cached_input_tokens),
              fn.SUM(ROLLUP.cache_input_tokens), fn.SUM(ROLLUP.cold_starts)]  # fmt: skip
    found = dimension_conditions(filters, ROLLUP) + [ROLLUP.slot >= slots[0], ROLLUP.slot < slots[1]]
    return run(db, ROLLUP.select(ROLLUP.slot, ROLLUP.model, *totals).where(*found).group_by(ROLLUP.slot, ROLLUP.model))


def split_range(filters: Filters, seconds: int, upto: int, now: datetime) -> tuple:
    """Split the time range into whole rollup slots and raw parts: the two edges, and the rows above ``upto``.

    Return ((first slot key, end slot key), [(table, expressions), ...]), or (None, []) when no whole slot fits.
    SQLite only (the rollup exists nowhere else).
    """
    chars = readmodel.SLOT_CHARS if seconds == SLOT_SECONDS else readmodel.HOUR_CHARS
    since, until = filters.since, filters.until
    first, last = ceil_time(since, seconds), floor_time(until or now, seconds)
    if first >= last:
        return None, []
    dims, stamp = dimension_conditions(filters), CallRow.timestamp
    parts = [(CallRow, dims + [stamp >= since, stamp < first])]
    parts.append((CallRow, dims + [stamp >= last] + ([stamp < until] if until else [])))
    # NOT INDEXED keeps SQLite on the id range (a few new rows), not on a model or time index (all of them).
    parts.append((CALLS_NOT_INDEXED, dims + [CallRow.id > upto, stamp >= first, stamp < last]))
    return (time_key(first, chars), time_key(last, chars)), parts


def _clients(db: Database, filters: Filters, upto: int | None, now: datetime) -> int:
    """Count distinct client IPs: from the hourly client rollup plus raw edges when the filters allow, else raw."""
    usable = upto is not None and not (needs_rows(filters) or filters.endpoint or filters.outcome)
    slots, parts = split_range(filters, 3600, upto, now) if usable and not filters.status else (None, [])
    if slots is None:
        query = matching(CallRow.select(fn.COUNT(CallRow.ip_source.distinct())), conditions(db, filters))
        return run(db, query)[0][0]
    slot = ROLLUP_CLIENTS.slot
    found = dimension_conditions(filters, ROLLUP_CLIENTS) + [slot >= slots[0], slot < slots[1]]
    selects = [ROLLUP_CLIENTS.select(ROLLUP_CLIENTS.ip_source).where(*found)]
    selects += [CallRow.select(CallRow.ip_source).from_(source).where(*part) for source, part in parts]
    seen = reduce(operator.or_, selects).alias("seen")  # UNION
    return run(db, Select([seen], [fn.COUNT(SQL("*"))]))[0][0]


# ---- percentiles -------------------------------------------------------------------------------------------------


def _cold_rows(db: Database, filters: Filters, upto: int | None) -> list[tuple]:
    """Return (model, load time in ms) of the newest COLD_ROWS cold starts matching the filters."""
    # With the read model, SQLite reads the cold starts' own index; left to itself it may walk a model's index.
    table = NodeList((CallRow, SQL(f"INDEXED BY {readmodel.COLD_INDEX}"))) if upto is not None else CallRow
    found = [CallRow.cold_start, *conditions(db, filters)]
    query = CallRow.select(CallRow.model, CallRow.load_duration_ms).from_(table).where(*found)
    return run(db, query.order_by(CallRow.timestamp.desc()).limit(COLD_ROWS))


def _sample(db: Database, filters: Filters, total: int) -> tuple[list[tuple], bool]:
    """Return (rows of timestamp, model, latency, TTFT, tokens/s; exact): all matching rows, or a spread sample."""
    found = conditions(db, filters)
    if total <= SAMPLE_ROWS:
        return run(db, matching(CallRow.select(*SAMPLE_COLUMNS), found)), True
    low, high = _id_range(db, filters)
    visits = min(high - low + 1, MAX_VISITS, math.ceil(SAMPLE_ROWS * (high - low + 1) / total))
    step = max(BLOCK_ROWS, (high - low + 1) * BLOCK_ROWS // max(visits, 1))
    block = Select(columns=[Cast(Value(low), "BIGINT")]).cte("block", recursive=True, columns=("i",))
    blocks = block.union_all(block.select(block.c.i + step).where(block.c.i + step <= high))
    # Each block is a range of ids; SQLite must look those up by id, never scan an index of a filter's column
    # once per block (NOT INDEXED still allows the id), and CROSS JOIN keeps the blocks as the outer loop.
    table = CALLS_NOT_INDEXED if readmodel.is_sqlite(db) else CallRow
    inside = [CallRow.id >= block.c.i, CallRow.id < block.c.i + BLOCK_ROWS]
    query = Select([block.join(table, JOIN.CROSS)], SAMPLE_COLUMNS).where(*inside, *found).with_cte(blocks)
    return run(db, query), False


def _id_range(db: Database, filters: Filters) -> tuple[int, int]:
    """Return the ids of the first and last rows of the time range (ids follow arrival closely, not exactly)."""
    first = CallRow.select(CallRow.id).where(CallRow.timestamp >= filters.since).order_by(CallRow.timestamp)
    if filters.until:
        last = CallRow.select(CallRow.id).where(CallRow.timestamp < filters.until).order_by(CallRow.timestamp.desc())
    else:
        last = CallRow.select(fn.MAX(CallRow.id))
    low_id, high_id = run(db, first.limit(1))[0][0], run(db, last.limit(1))[0][0]
    return min(low_id, high_id), max(low_id, high_id)


def choices(db: Database, filters: Filters, limit: int = 200) -> dict:
    """Return the models and endpoints seen in the range, and the key and instance names in the store (suggestions
    for the filter inputs, not exact)."""
    rollup = readmodel.watermarks(db).get("rollup")
    source, since = (ROLLUP, ROLLUP.slot) if rollup else (CallRow, CallRow.timestamp)
    floor = time_key(filters.since, readmodel.SLOT_CHARS) if rollup and filters.since else filters.since
    found = {}
    for name in ("model", "endpoint"):
        column = getattr(source, name)
        query = matching(source.select(column).distinct(), [since >= floor] if floor else [])
        found[name + "s"] = [value for (value,) in run(db, query.order_by(column).limit(limit)) if value]
    for name, column in (("keys", CallRow.key_name), ("instances", CallRow.instance)):
        found[name] = [value for value in distinct_values(db, column, limit) if value]
    return found


def distinct_values(db: Database, column, limit: int) -> list:
    """Return the first ``limit`` distinct values of an indexed column of CallRow in the whole store, in order.

    A loose index scan: each value is one index lookup of the next greater one, so a million rows of a few keys cost
    a few lookups, where DISTINCT would read every row.
    """
    following = CallRow.select(fn.MIN(column))
    first = Select(columns=[following, Value(1)]).cte("seen", recursive=True, columns=("value", "n"))
    step = Select([first], [following.where(column > first.c.value), first.c.n + 1])
    seen = first.union_all(step.where(first.c.value.is_null(False), first.c.n < limit))
    query = Select([first], [first.c.value]).where(first.c.value.is_null(False)).with_cte(seen)
    return [value for (value,) in run(db, query)]
