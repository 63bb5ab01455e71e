"""Read side: the numbers behind the dashboard's cards, per-model table and time series, for one set of filters.

Counts and token sums are exact and come from SQL: on SQLite from the read model's rollup for whole 10-minute slots
plus the raw rows at the edges of the range and above the rollup's watermark; otherwise (PostgreSQL, or a client or
text filter) from the rows directly. Percentiles (latency, TTFT, tokens/s) are nearest-rank over the matching rows
when there are at most SAMPLE_ROWS of them, else over an evenly spread sample of rows, which the answer says. No
Flask here and no writes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

from peewee import Database

from proxy_app.dashboard import readmodel
from proxy_app.dashboard.queries import (
    ERROR_OUTCOMES,
    Filters,
    conditions,
    dimension_conditions,
    run,
    time_param,
    to_datetime,
    where,
)
from proxy_app.dashboard.summary import assemble, bucket_width, ceil_time, empty_document, floor_time, time_key

SAMPLE_ROWS = 20_000  # percentiles are exact up to this many matching rows, else estimated from about this many
MAX_VISITS = 60_000  # most rows read for one sample
# Why: rows stored one after the other share disk pages, so a sample of runs of 16 consecutive rows reads about a
# fifth of the pages that single rows would; 1,250 runs still spread over every bucket of a chart.
BLOCK_ROWS = 16
SLOT_SECONDS = 600  # the rollup's slot
ERRORS_SQL = 'sum(CASE WHEN "outcome" IN ({outcomes}) THEN {{n}} ELSE 0 END)'.format(
    outcomes=", ".join(f"'{outcome}'" for outcome in ERROR_OUTCOMES)
)


def stats(db: Database, filters: Filters, now: datetime | None = None) -> dict:
    """Return cards, per-model rows, time series and the percentile method for the filters."""
    now = now or datetime.now(UTC)
    with snapshot(db):
        oldest = run(db, 'SELECT min("timestamp") FROM calls', [])[0][0]
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
    return assemble(filters, since, now, groups, clients, sample, exact)


def snapshot(db: Database):
    """A read transaction, so that the rollup, its watermark and the raw rows are read from one snapshot."""
    return db.atomic(lock_type="DEFERRED") if readmodel.is_sqlite(db) else db.atomic()


def key_sql(db: Database, chars: int) -> str:
    """SQL for a row's bucket key: the leading characters of its timestamp as text."""
    if readmodel.is_sqlite(db):
        return f'substr("timestamp", 1, {chars})'
    return f"substr(to_char(\"timestamp\", 'YYYY-MM-DD HH24:MI:SS'), 1, {chars})"


# ---- counts ------------------------------------------------------------------------------------------------------


def _groups(db: Database, filters: Filters, chars: int, upto: int | None, now: datetime) -> list[tuple]:
    """Return (bucket key, model, calls, errors, input tokens, output tokens) groups covering the filters."""
    select = (
        f"SELECT {key_sql(db, chars)}, coalesce(\"model\", ''), count(*), {ERRORS_SQL.format(n=1)}, "
        'coalesce(sum("input_tokens"), 0), coalesce(sum("output_tokens"), 0) FROM '
    )
    usable = upto is not None and chars <= readmodel.SLOT_CHARS and not (filters.client or filters.q)
    slots, parts = split_range(db, filters, SLOT_SECONDS, upto, now) if usable else (None, [])
    if slots is None:
        clauses, params = conditions(db, filters)
        return run(db, f"{select}calls{where(clauses)} GROUP BY 1, 2", params)
    cells = [(slot[:chars], *rest) for slot, *rest in _rollup_groups(db, filters, slots)]
    for table, clauses, params in parts:
        cells += run(db, f"{select}{table}{where(clauses)} GROUP BY 1, 2", params)
    return cells


def _rollup_groups(db: Database, filters: Filters, slots: tuple) -> list[tuple]:
    clauses, params = dimension_conditions(filters)
    clauses, params = clauses + ["slot >= ?", "slot < ?"], params + list(slots)
    sql = (
        f"SELECT slot, model, sum(calls), {ERRORS_SQL.format(n='calls')}, sum(input_tokens), sum(output_tokens) "
        f"FROM calls_rollup{where(clauses)} GROUP BY slot, model"
    )
    return run(db, sql, params)


def split_range(db: Database, filters: Filters, seconds: int, upto: int, now: datetime) -> tuple:
    """Split the time range into whole rollup slots and raw parts: the two edges, and the rows above ``upto``.

    Return ((first slot key, end slot key), [(table, clauses, params), ...]), or (None, []) when no whole slot
    fits. SQLite only (the rollup exists nowhere else).
    """
    chars = readmodel.SLOT_CHARS if seconds == SLOT_SECONDS else readmodel.HOUR_CHARS
    since, until = filters.since, filters.until
    first, last = ceil_time(since, seconds), floor_time(until or now, seconds)
    if first >= last:
        return None, []
    dims, params = dimension_conditions(filters)
    stamp = lambda moment: time_param(db, moment)  # noqa: E731
    parts = [("calls", dims + ['"timestamp" >= ?', '"timestamp" < ?'], params + [stamp(since), stamp(first)])]
    right = (['"timestamp" < ?'], [stamp(until)]) if until else ([], [])
    parts.append(("calls", dims + ['"timestamp" >= ?'] + right[0], params + [stamp(last)] + right[1]))
    # NOT INDEXED keeps SQLite on the id range (a few new rows), not on a model or time index (all of them).
    tail = ['"id" > ?', '"timestamp" >= ?', '"timestamp" < ?']
    parts.append(("calls NOT INDEXED", dims + tail, params + [upto, stamp(first), stamp(last)]))
    return (time_key(first, chars), time_key(last, chars)), parts


def _clients(db: Database, filters: Filters, upto: int | None, now: datetime) -> int:
    """Count distinct client IPs: from the hourly client rollup plus raw edges when the filters allow, else raw."""
    usable = upto is not None and not (filters.client or filters.q or filters.endpoint or filters.outcome)
    slots, parts = split_range(db, filters, 3600, upto, now) if usable and not filters.status else (None, [])
    if slots is None:
        clauses, params = conditions(db, filters)
        return run(db, f'SELECT count(DISTINCT "ip_source") FROM calls{where(clauses)}', params)[0][0]
    clauses, params = dimension_conditions(filters)
    selects = [f"SELECT ip_source FROM calls_rollup_clients{where(clauses + ['slot >= ?', 'slot < ?'])}"]
    params = params + list(slots)
    for table, part_clauses, part_params in parts:
        selects.append(f'SELECT "ip_source" FROM {table}{where(part_clauses)}')
        params += part_params
    return run(db, f"SELECT count(*) FROM ({' UNION '.join(selects)}) AS seen", params)[0][0]


# ---- percentiles -------------------------------------------------------------------------------------------------


def _sample(db: Database, filters: Filters, total: int) -> tuple[list[tuple], bool]:
    """Return (rows of timestamp, model, latency, TTFT, tokens/s; exact): all matching rows, or a spread sample."""
    columns = 'SELECT "timestamp", coalesce("model", \'\'), "total_time_ms", "ttft_ms", "tokens_per_second"'
    clauses, params = conditions(db, filters)
    if total <= SAMPLE_ROWS:
        return run(db, f"{columns} FROM calls{where(clauses)}", params), True
    low, high = _id_range(db, filters)
    visits = min(high - low + 1, MAX_VISITS, math.ceil(SAMPLE_ROWS * (high - low + 1) / total))
    step = max(BLOCK_ROWS, (high - low + 1) * BLOCK_ROWS // max(visits, 1))
    blocks = "WITH RECURSIVE block(i) AS (SELECT CAST(? AS BIGINT) UNION ALL SELECT i + ? FROM block WHERE i + ? <= ?) "
    # Each block is a range of ids; SQLite must look those up by id, never scan an index of a filter's column
    # once per block (NOT INDEXED still allows the id), and CROSS JOIN keeps the blocks as the outer loop.
    table = "calls NOT INDEXED" if readmodel.is_sqlite(db) else "calls"
    inside = ['calls."id" >= block.i', f'calls."id" < block.i + {BLOCK_ROWS}']
    sql = f"{blocks}{columns} FROM block CROSS JOIN {table}{where(inside + clauses)}"
    return run(db, sql, [low, step, step, high] + params), False


def _id_range(db: Database, filters: Filters) -> tuple[int, int]:
    """Return the ids of the first and last rows of the time range (ids follow arrival closely, not exactly)."""
    low = run(
        db,
        'SELECT "id" FROM calls WHERE "timestamp" >= ? ORDER BY "timestamp" LIMIT 1',
        [time_param(db, filters.since)],
    )
    if filters.until:
        sql, params = 'SELECT "id" FROM calls WHERE "timestamp" < ? ORDER BY "timestamp" DESC LIMIT 1', [filters.until]
        high = run(db, sql, [time_param(db, params[0])])
    else:
        high = run(db, 'SELECT max("id") FROM calls', [])
    low_id, high_id = low[0][0], high[0][0]
    return min(low_id, high_id), max(low_id, high_id)


def choices(db: Database, filters: Filters, limit: int = 200) -> dict:
    """Return the models and endpoints seen in the range (suggestions for the filter inputs, not exact)."""
    found = {}
    for name in ("model", "endpoint"):
        if readmodel.watermarks(db).get("rollup"):
            clauses, params = (["slot >= ?"], [time_param(db, filters.since)[:15]]) if filters.since else ([], [])
            sql = f"SELECT DISTINCT {name} FROM calls_rollup{where(clauses)} ORDER BY 1 LIMIT {limit}"
        else:
            clauses, params = (['"timestamp" >= ?'], [time_param(db, filters.since)]) if filters.since else ([], [])
            sql = f'SELECT DISTINCT "{name}" FROM calls{where(clauses)} ORDER BY 1 LIMIT {limit}'
        found[name + "s"] = [value for (value,) in run(db, sql, params) if value]
    return found
