"""The filters of the dashboard's page and APIs, parsed and validated from the query parameters into one ``Filters``
value (a bad value raises FilterError, which the views answer with 400), and the opaque ``next`` cursor of keyset
paging. No SQL here: queries.py turns a ``Filters`` into peewee expressions.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from peewee import fn

from proxy_app.calls import OUTCOMES, format_timestamp
from proxy_app.store.models import CallRow, to_datetime

DEFAULT_LIMIT = 50
MAX_LIMIT = 500  # a bigger ?limit is capped, not refused: one page never holds more than this many rows
DEFAULT_SINCE = "24h"  # the page's default range; APIs and the export use the same so a URL means one thing
MAX_TEXT_CHARS = 255  # longest model/endpoint/client/key/instance/q value; the store clips indexed text to this too
MAX_RELATIVE_DAYS = 3660
SORTS = {"time": CallRow.timestamp, "latency": CallRow.total_time_ms, "tokens": fn.COALESCE(CallRow.total_tokens, -1)}
RELATIVE = re.compile(r"(\d{1,7})([smhdw])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
STATUS = re.compile(r"[1-5](\d\d|xx)")


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
