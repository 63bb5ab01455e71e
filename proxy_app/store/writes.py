"""What the writer and the retention do to the ``calls`` table: insert a batch of calls with one prepared
statement, find the cutoff of the row cap, and delete old rows in short batches. Each raises whatever the database
raises; the writer (writer.py) decides what a failure costs.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    Database,
    FloatField,
    IntegerField,
    InterfaceError,
    Model,
    OperationalError,
    TextField,
    fn,
)

from proxy_app.calls import COLUMNS, Call, values_of
from proxy_app.store.models import CALLS_TABLE, CallRow

# How psycopg2 words a connection the server has closed (restart, idle timeout, pg_terminate_backend).
DROPPED_CONNECTION = ("server closed the connection", "terminating connection", "connection already closed")

# The Python type a field stores unchanged: a value of exactly that type skips db_value (half a microsecond a column);
# any other value, and every value of a field not listed here (timestamps), still goes through it.
_STORED_AS = {IntegerField: int, BigIntegerField: int, FloatField: float, TextField: str, CharField: str,
              BooleanField: bool}  # fmt: skip
_COLUMN_PLAN = tuple(
    (field, _STORED_AS.get(type(field))) for field in (getattr(CallRow, name) for name in COLUMNS)
)  # a model's attribute is its Field


def row_of(call: Call) -> tuple:
    """Return the insert values of one Call in COLUMNS order, each as its field stores it (the Call's text is already
    bounded and storable, so the CSV mirror holds the same)."""
    values = []
    for (field, plain_type), value in zip(_COLUMN_PLAN, values_of(call), strict=True):
        if value is not None and type(value) is not plain_type:
            value = field.db_value(value)
        values.append(value)
    return tuple(values)


def insert_calls(db: Database, calls: list[Call]) -> None:
    """Insert the calls in one write transaction (IMMEDIATE on SQLite); raises whatever the database raises.

    A connection the server dropped since its last use (a PostgreSQL restart) is reopened and the insert tried once
    more, so a restart between two batches costs no rows.
    """
    rows = [row_of(call) for call in calls]
    was_open = not db.is_closed()
    try:
        _insert_rows(db, rows)
    except (InterfaceError, OperationalError) as exc:
        if not (was_open and _is_dropped_connection(exc)):
            raise
        with contextlib.suppress(Exception):
            db.close()
        _insert_rows(db, rows)


def _insert_rows(db: Database, rows: list[tuple]) -> None:
    # Why: one prepared INSERT run by executemany costs a fraction of peewee's insert_many, which builds the SQL anew
    # for every batch; row_of put the values through each field's db_value.
    with db.atomic():
        db.cursor().executemany(_insert_sql(db), rows)


def _insert_sql(db: Database) -> str:
    opening, closing = db.quote  # peewee's pair of identifier quotes for this database, e.g. '""'
    columns = ", ".join(f"{opening}{name}{closing}" for name in COLUMNS)
    params = ", ".join([db.param] * len(COLUMNS))
    return f"INSERT INTO {opening}{CALLS_TABLE}{closing} ({columns}) VALUES ({params})"


def _is_dropped_connection(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, InterfaceError) or any(sign in text for sign in DROPPED_CONNECTION)


def describe_error(exc: BaseException) -> str:
    """Name the error behind a failed ROLLBACK too: SQLite ends the transaction itself on some errors (disk full)."""
    cause = exc
    while cause is not None and "no transaction is active" in str(cause):
        cause = cause.__context__
    cause = cause or exc
    return f"{type(cause).__name__}: {cause}"


def cap_cutoff(db: Database, max_rows: int) -> tuple[datetime, int] | None:
    """Return (the arrival time before which rows are beyond the newest ``max_rows``, how many they are), or None.

    While the id range is no wider than the cap this is two index lookups; past it, a count and an index walk over
    the rows beyond. Ties at the cutoff stay, so the store keeps at least ``max_rows`` rows.
    """
    lowest = CallRow.select(fn.MIN(CallRow.id)).scalar(db)
    highest = CallRow.select(fn.MAX(CallRow.id)).scalar(db)
    if highest is None or highest - lowest + 1 <= max_rows:
        return None
    beyond = CallRow.select().count(db) - max_rows
    if beyond <= 0:
        return None
    first_kept = CallRow.select(CallRow.timestamp).order_by(CallRow.timestamp, CallRow.id).offset(beyond).limit(1)
    return first_kept.scalar(db), beyond


def delete_older_than(db: Database, cutoff: datetime, limit: int, table: type[Model] = CallRow) -> int:
    """Delete at most ``limit`` rows (calls, or ``table``'s) older than ``cutoff`` in one short transaction; return
    how many."""
    oldest = table.select(table.id).where(table.timestamp < cutoff).order_by(table.id).limit(limit)
    with db.atomic():
        return table.delete().where(table.id.in_(oldest)).execute(db)


def is_transient(exc: BaseException) -> bool:
    """True for a database that is locked, gone or full: the DB-API's OperationalError or InterfaceError, from peewee
    or straight from the driver, except a limit one row broke (SQLSTATE class 54, e.g. an index entry too big)."""
    names = {kind.__name__ for kind in type(exc).__mro__}
    if not names & {"OperationalError", "InterfaceError"}:
        return False
    codes = (getattr(cause, "pgcode", None) for cause in (exc, exc.__cause__, exc.__context__, *exc.args[:1]))
    return not any(isinstance(code, str) and code.startswith("54") for code in codes)
