"""Read side: the filters' conditions (the filters themselves are parsed in filters.py), search with keyset paging,
one row by ``request_id`` and the rows of an export, all as plain dicts and lists.

Every filter reaches the SQL as a peewee expression on ``CallRow``; peewee writes the SQL in the store's dialect and
binds every value, so the same code serves SQLite and PostgreSQL. Rows come back as the driver gives them (no field
conversions), which keeps an export fast. No Flask here, no writes (readmodel.py keeps the SQLite rollup and text
index) and no aggregates (stats.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from peewee import SQL, Database, Node, Query, Tuple, fn

from proxy_app.calls import COLUMNS, format_timestamp
from proxy_app.dashboard import readmodel
from proxy_app.dashboard.filters import MAX_TEXT_CHARS, SORTS, Filters, encode_cursor
from proxy_app.store.models import CallRow, to_datetime

COUNT_CAP = 10_000  # search counts matches up to here ("10,000+"); the exact total is the stats' calls card
EXPORT_CHUNK_ROWS = 2_000  # rows per keyset query and per written chunk of an export: flat memory, short reads
# Why: client_gone is the client's choice and completed is success; everything else is a failure of the path.
ERROR_OUTCOMES = ("upstream_error", "incomplete", "unreachable", "rejected")
ATTRIBUTION = {"key": "key_name", "instance": "instance"}  # filter -> column: who made the call, and through where
FIELDS = tuple(getattr(CallRow, name) for name in COLUMNS)  # the stored columns, in COLUMNS order
# What a list of calls (the page's table, /analytics/search) shows: short columns and the start of the prompt. The
# long text (parameters, whole prompt, response, error, user agent) is read only by one call's view and the export.
LIST_COLUMNS = ("timestamp", "request_id", "ip_source", "endpoint", "session_id", "model", "input_tokens",
                "output_tokens", "total_tokens", "total_time_ms", "http_status", "outcome", "ttft_ms",
                "tokens_per_second", "key_name", "instance", "prompt")  # fmt: skip
LIST_TEXT_CHARS = 300  # of the prompt, in a list
LIST_FIELDS = tuple(
    fn.SUBSTR(CallRow.prompt, 1, LIST_TEXT_CHARS) if name == "prompt" else getattr(CallRow, name)
    for name in LIST_COLUMNS
)


# ---- SQL ---------------------------------------------------------------------------------------------------------


def run(db: Database, query: Query) -> list[tuple]:
    """Run one read query built with peewee on ``db`` and return every row, values as the driver gives them."""
    return db.execute(query).fetchall()


def matching(query: Query, expressions: list[Node]) -> Query:
    """Return ``query`` limited to the rows meeting every expression (all rows when there are none)."""
    return query.where(*expressions) if expressions else query


def conditions(db: Database, filters: Filters) -> list[Node]:
    """Return an expression on CallRow for every filter."""
    found = []
    if filters.since:
        found.append(CallRow.timestamp >= filters.since)
    if filters.until:
        found.append(CallRow.timestamp < filters.until)
    found += dimension_conditions(filters)
    if filters.client:
        found.append((CallRow.ip_source == filters.client) | (CallRow.session_id == filters.client))
    found += attribution_conditions(filters)
    if filters.q:
        found.append(text_condition(db, filters.q))
    return found


def dimension_conditions(filters: Filters, source=CallRow) -> list[Node]:
    """Return the expressions for model, endpoint, outcome and status on ``source``: CallRow, or a rollup table
    with columns of the same names."""
    found = [getattr(source, name) == getattr(filters, name) for name in ("model", "endpoint")
             if getattr(filters, name)]  # fmt: skip
    if filters.outcome:
        error = filters.outcome == "error"
        found.append(source.outcome.in_(ERROR_OUTCOMES) if error else source.outcome == filters.outcome)
    if filters.status.endswith("xx"):
        hundreds = int(filters.status[0]) * 100
        found.append(source.http_status.between(hundreds, hundreds + 99))
    elif filters.status:
        found.append(source.http_status == int(filters.status))
    return found


def attribution_conditions(filters: Filters) -> list[Node]:
    """Return the expressions for key and instance: CallRow only, since the read model's rollups keep neither."""
    return [getattr(CallRow, column) == getattr(filters, name) for name, column in ATTRIBUTION.items()
            if getattr(filters, name)]  # fmt: skip


def text_condition(db: Database, text: str) -> Node:
    """Return an expression for rows whose prompt or response preview contains ``text`` (case-insensitive)."""
    if readmodel.is_sqlite(db):
        # Raw SQL in SQLite's own param style: it can look the text up in the FTS5 trigram index, a virtual table
        # that peewee's query builder has no expression for.
        return SQL(*readmodel.text_condition(db, text))
    return CallRow.prompt.contains(text) | CallRow.response_preview.contains(text)  # ILIKE, % and _ escaped


# ---- rows --------------------------------------------------------------------------------------------------------


def row_dict(values, columns: tuple[str, ...] = COLUMNS) -> dict:
    """Return one stored row (values in ``columns`` order) as JSON-ready values: time in ISO 8601 UTC, booleans."""
    row = dict(zip(columns, values, strict=False))
    row["timestamp"] = format_timestamp(to_datetime(row["timestamp"]))
    if "stream_mode" in row:
        row["stream_mode"] = bool(row["stream_mode"])
    if row.get("cold_start") is not None:  # SQLite hands back 0 or 1
        row["cold_start"] = bool(row["cold_start"])
    return row


def search(db: Database, filters: Filters) -> dict:
    """Return one page of rows (LIST_COLUMNS) matching the filters, in the chosen order: results, count (capped)
    and next."""
    key, found_conditions = SORTS[filters.sort], conditions(db, filters)
    if filters.cursor:
        value, row_id = filters.cursor
        value = CallRow.timestamp.db_value(value) if isinstance(value, datetime) else value  # as stored
        after, bound = Tuple(key, CallRow.id), Tuple(value, row_id)
        found_conditions.append(after < bound if filters.order == "desc" else after > bound)
    order = (key.desc(), CallRow.id.desc()) if filters.order == "desc" else (key.asc(), CallRow.id.asc())
    query = matching(CallRow.select(*LIST_FIELDS, CallRow.id, key), found_conditions).order_by(*order)
    found = run(db, query.limit(filters.limit + 1))
    page = found[: filters.limit]
    following = encode_cursor(filters, page[-1][-1], page[-1][-2]) if len(found) > filters.limit else None
    count = count_matches(db, filters)
    return {
        "results": [row_dict(row[: len(LIST_COLUMNS)], LIST_COLUMNS) for row in page],
        "count": count,
        "count_capped": count > COUNT_CAP,
        "next": following,
    }


def count_matches(db: Database, filters: Filters, cap: int = COUNT_CAP) -> int:
    """Count the rows matching the filters, stopping at ``cap`` + 1 so that a count never scans a million rows."""
    return min(matching(CallRow.select(), conditions(db, filters)).limit(cap + 1).count(db), cap + 1)


def get_call(db: Database, request_id: str) -> dict | None:
    """Return the row with this request_id (the latest, should a client have reused one), or None."""
    query = CallRow.select(*FIELDS).where(CallRow.request_id == request_id[:MAX_TEXT_CHARS])
    found = run(db, query.order_by(CallRow.id.desc()).limit(1))
    return row_dict(found[0]) if found else None


def iter_chunks(db: Database, filters: Filters, chunk: int = EXPORT_CHUNK_ROWS) -> Iterator[list[tuple]]:
    """Yield every row matching the filters, oldest first, as lists of raw rows ("id", then COLUMNS as stored):
    ``chunk`` rows per keyset query on (timestamp, id), so memory stays flat and no read lasts long."""
    first = matching(CallRow.select(CallRow.id, *FIELDS), conditions(db, filters))
    first = first.order_by(CallRow.timestamp, CallRow.id).limit(chunk)
    query = first
    while True:
        found = run(db, query)
        if found:
            yield found
        if len(found) < chunk:
            return
        last = found[-1]
        query = first.where(Tuple(CallRow.timestamp, CallRow.id) > Tuple(last[1], last[0]))
