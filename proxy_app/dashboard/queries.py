"""Read side: the filters (parsed and validated from query parameters), search with keyset paging, one row by
``request_id`` and the rows of an export, all as plain dicts and lists.

Every filter reaches the SQL as a peewee expression on ``CallRow``; peewee writes the SQL in the store's dialect and
binds every value, so the same code serves SQLite and PostgreSQL. Rows come back as the driver gives them (no field
conversions), which keeps an export fast. No Flask here, no writes (readmodel.py keeps the SQLite rollup and text
index) and no aggregates (stats.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from peewee import SQL, Database, Node, Query, Tuple, fn

from proxy_app.calls import COLUMNS, OUTCOMES, format_timestamp
from proxy_app.dashboard import readmodel
from proxy_app.store.models import CallRow, to_datetime

DEFAULT_LIMIT = 50
MAX_LIMIT = 500  # a bigger ?limit is capped, not refused: one page never holds more than this many rows
COUNT_CAP = 10_000  # search counts matches up to here ("10,000+"); the exact total is the stats' calls card
DEFAULT_SINCE = "24h"  # the page's default range; APIs and the export use the same so a URL means one thing
EXPORT_CHUNK_ROWS = 2_000  # rows per keyset query and per written chunk of an export: flat memory, short reads
MAX_TEXT_CHARS = 255  # longest model/endpoint/client/key/instance/q value; the store clips indexed text to this too
MAX_RELATIVE_DAYS = 3660
# Why: client_gone is the client's choice and completed is success; everything else is a failure of the path.
ERROR_OUTCOMES = ("upstream_error", "incomplete", "unreachable", "rejected")
SORTS = {"time": CallRow.timestamp, "latency": CallRow.total_time_ms, "tokens": fn.COALESCE(CallRow.total_tokens, -1)}
RELATIVE = re.compile(r"(\d{1,7})([smhdw])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
STATUS = re.compile(r"[1-5](\d\d|xx)")
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


class FilterError(ValueError):
    """A query parameter has a value we cannot use; the message names the parameter and what would work."""


@dataclass(frozen=True)
class Filters:
    """What the page, the APIs and the export are asked for. Empty text means "no filter"."""

    q: str = ""
    model: str = ""
    endpoint: str = ""
    outcome: str = ""  # one of OUTCOMES, or "error" for any of ERROR_OUTCOMES
    status: str = ""  # an HTTP status ("404") or a class ("5xx")
    client: str = ""  # an IP address or a session id
    key: str = ""  # an API key's name (key_name)
    instance: str = ""  # a proxy instance's name
    since: datetime | None = None  # inclusive, UTC
    until: datetime | None = None  # exclusive, UTC
    since_text: str = DEFAULT_SINCE  # as given ("24h", "all", an ISO time), to show and to link
    until_text: str = ""
    limit: int = DEFAULT_LIMIT
    sort: str = "time"
    order: str = "desc"
    cursor: list | None = None  # [value, id] of the last row of the previous page

    def params(self, **changes) -> dict:
        """Return the query parameters that reproduce these filters (with ``changes``), empty ones left out."""
        names = ("q", "model", "endpoint", "outcome", "status", "client", "key", "instance", "sort", "order")
        values = {name: getattr(self, name) for name in names}
        values.update(since=self.since_text, until=self.until_text)
        values["limit"] = self.limit if self.limit != DEFAULT_LIMIT else ""
        values.update(changes)
        defaults = {"sort": "time", "order": "desc", "since": DEFAULT_SINCE}
        return {name: value for name, value in values.items() if value not in ("", None, defaults.get(name))}

    def query_string(self, **changes) -> str:
        """Return "?..." for a link reproducing these filters (with ``changes``), or "" when all are defaults; it
        follows ``url_for(view)``, since as a keyword to url_for ``endpoint`` would clash with its first argument."""
        params = self.params(**changes)
        return "?" + urlencode(params) if params else ""

    def describe(self) -> dict:
        """Return the filters as JSON-ready values (times in ISO 8601 UTC)."""
        described = asdict(self)
        for name in ("since", "until"):
            described[name] = format_timestamp(described[name]) if described[name] else None
        described.pop("cursor")
        return described


def parse_filters(args: Mapping[str, str], now: datetime | None = None) -> Filters:
    """Validate query parameters into Filters; raise FilterError naming the first bad one."""
    now = now or datetime.now(UTC)
    texts = {name: _text(args, name) for name in ("q", "model", "endpoint", "client", "key", "instance")}
    since_text = args.get("since", DEFAULT_SINCE).strip() or DEFAULT_SINCE
    until_text = args.get("until", "").strip()
    since = None if since_text == "all" else parse_time("since", since_text, now)
    until = parse_time("until", until_text, now) if until_text else None
    if since and until and since >= until:
        raise FilterError(f"since ({since_text}) must be before until ({until_text})")
    sort, order = _choice(args, "sort", tuple(SORTS)), _choice(args, "order", ("desc", "asc"))
    filters = Filters(
        **texts,
        outcome=_outcome(args),
        status=_status(args),
        since=since,
        until=until,
        since_text=since_text,
        until_text=until_text,
        limit=_limit(args),
        sort=sort,
        order=order,
    )
    return replace(filters, cursor=decode_cursor(args.get("cursor", ""), filters))


def parse_time(name: str, text: str, now: datetime) -> datetime:
    """Parse ISO 8601 (a time without an offset is UTC) or a relative age such as 15m, 24h, 7d, 2w."""
    relative = RELATIVE.fullmatch(text)
    if relative:
        seconds = int(relative[1]) * UNIT_SECONDS[relative[2]]
        if seconds > MAX_RELATIVE_DAYS * 86400:
            raise FilterError(f"{name}={text!r} reaches back more than {MAX_RELATIVE_DAYS} days")
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise FilterError(
            f"{name}={text[:40]!r} is neither ISO 8601 (e.g. 2025-05-01T12:00:00Z) nor relative (15m, 24h, 7d)"
        ) from None


def _text(args: Mapping[str, str], name: str) -> str:
    value = args.get(name, "").replace("\x00", "").strip()  # the store holds no NUL (PostgreSQL text cannot)
    if len(value) > MAX_TEXT_CHARS:
        raise FilterError(f"{name} is longer than {MAX_TEXT_CHARS} characters")
    return value


def _choice(args: Mapping[str, str], name: str, allowed: tuple) -> str:
    value = args.get(name, "").strip() or allowed[0]
    if value not in allowed:
        raise FilterError(f"{name}={value[:40]!r} must be one of: {', '.join(allowed)}")
    return value


def _outcome(args: Mapping[str, str]) -> str:
    value = args.get("outcome", "").strip()
    if value and value not in OUTCOMES + ("error",):
        raise FilterError(f"outcome={value[:40]!r} must be one of: error, {', '.join(OUTCOMES)}")
    return value


def _status(args: Mapping[str, str]) -> str:
    value = args.get("status", "").strip().lower()
    if value and not STATUS.fullmatch(value):
        raise FilterError(f"status={value[:40]!r} must be an HTTP status such as 404 or a class such as 5xx")
    return value


def _limit(args: Mapping[str, str]) -> int:
    text = args.get("limit", "").strip()
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or int(text) < 1:
        raise FilterError(f"limit={text[:40]!r} must be a whole number of at least 1 (at most {MAX_LIMIT} are used)")
    return min(int(text), MAX_LIMIT)


# ---- cursors -----------------------------------------------------------------------------------------------------


def encode_cursor(filters: Filters, value, row_id: int) -> str:
    """Return the opaque ``next`` token for the row (sort value, id) ending a page."""
    value = {"t": to_datetime(value).isoformat()} if isinstance(value, datetime) else value
    raw = json.dumps([filters.sort, filters.order, value, row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str, filters: Filters) -> list | None:
    """Return [sort value, id] from a ``next`` token made for the same sort; raise FilterError otherwise."""
    if not token:
        return None
    try:
        sort, order, value, row_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if isinstance(value, dict):
            value = datetime.fromisoformat(value["t"])
        valid = isinstance(row_id, int) and isinstance(value, str | int | float | datetime)
    except (ValueError, TypeError, KeyError, binascii.Error):
        valid = False
    if not valid or [sort, order] != [filters.sort, filters.order]:
        raise FilterError("cursor is not a `next` value from a search with the same sort and order")
    return [value, row_id]


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
