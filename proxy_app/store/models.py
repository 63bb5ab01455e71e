"""Peewee models: the ``calls`` table (one row per finished call, a column per ``COLUMNS`` entry), its version, and
``model_events`` (models the upstream loaded and unloaded, as its ``/api/ps`` showed).

``open_database(url)`` opens SQLite (the default, in WAL mode) or PostgreSQL from a URL; ``create_tables`` creates or
migrates the schema. Nothing here runs at import, and nothing here writes rows on the request path: the writer
thread (writer.py) does the inserts, and queries.py does the reading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from peewee import (
    SQL,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    Database,
    DatabaseProxy,
    DateTimeField,
    FloatField,
    IntegerField,
    InterfaceError,
    Model,
    OperationalError,
    PostgresqlDatabase,
    SchemaManager,
    SqliteDatabase,
    TextField,
    fn,
)
from playhouse import db_url
from playhouse.migrate import SchemaMigrator, SqliteMigrator, migrate

from proxy_app.calls import COLUMNS, TEXT_CHARS, Call, values_of

log = logging.getLogger(__name__)

# The read side binds to this; open_database() fills it. The writer always passes its own database explicitly.
database = DatabaseProxy()
# The tables' names, also used where SQL is written by hand (the batched insert) or a table is looked for.
CALLS_TABLE = "calls"
SCHEMA_VERSION_TABLE = "schema_version"
MODEL_EVENTS_TABLE = "model_events"

# Why: WAL lets the dashboard read while the writer writes; NORMAL is durable across crashes of the process (not of
# the OS) at a fraction of FULL's cost; the busy timeout covers the other gunicorn workers' short write transactions
# (wsgi-stack.md 4.2, rule 13). A URL query (e.g. ?timeout=0.5) overrides these.
SQLITE_DEFAULTS = {
    "pragmas": {"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1},
    "timeout": 5,
    "lock_type": "IMMEDIATE",  # every atomic() is BEGIN IMMEDIATE: no failed lock upgrades (wsgi-stack.md 4.3)
}
POSTGRES_DEFAULTS = {"connect_timeout": 5}  # an unroutable host must not hang the writer for minutes

# How psycopg2 words a connection the server has closed (restart, idle timeout, pg_terminate_backend).
DROPPED_CONNECTION = ("server closed the connection", "terminating connection", "connection already closed")
# Why: a text column added to a table that has rows needs a default; '' is what a Call holds when the value is absent
# (an anonymous call's key_name), and a constant default lets SQLite and PostgreSQL add the column in place.
EMPTY_TEXT = SQL("DEFAULT ''")


class UTCDateTimeField(DateTimeField):
    """A UTC moment stored without an offset (sortable text in SQLite, TIMESTAMP in PostgreSQL); read back aware."""

    def db_value(self, value):
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return super().db_value(value)

    def python_value(self, value):
        value = super().python_value(value)
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def to_datetime(value) -> datetime:
    """Return a timestamp read raw from the table (ISO text on SQLite, naive datetime on PostgreSQL) as aware UTC."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class BaseModel(Model):
    class Meta:
        database = database


class CallRow(BaseModel):
    """One stored call; the fields are ``calls.COLUMNS`` in order (a test holds them to it). Text arrives bounded by
    ``calls.TEXT_CHARS`` (a changed bound of a CharField needs a migration)."""

    id = BigAutoField()
    timestamp = UTCDateTimeField(index=True)
    request_id = CharField(max_length=TEXT_CHARS["request_id"], index=True)
    ip_source = TextField(index=True)
    user_agent = TextField()
    http_method = CharField(max_length=TEXT_CHARS["http_method"])
    endpoint = TextField()
    session_id = TextField(index=True)
    model = TextField(null=True)
    input_tokens = BigIntegerField(null=True)
    output_tokens = BigIntegerField(null=True)
    total_tokens = BigIntegerField(null=True)
    model_parameters = TextField(null=True)
    stream_mode = BooleanField()
    request_size_bytes = BigIntegerField()
    response_size_bytes = BigIntegerField()
    queue_time_ms = FloatField()
    processing_time_ms = FloatField(null=True)
    total_time_ms = FloatField()
    http_status = IntegerField()
    error_message = TextField(null=True)
    system_load_cpu = FloatField(null=True)
    system_load_memory = FloatField(null=True)
    concurrent_requests = IntegerField()
    outcome = CharField(max_length=TEXT_CHARS["outcome"], index=True)
    ttft_ms = FloatField(null=True)
    tokens_per_second = FloatField(null=True)
    load_duration_ms = FloatField(null=True)
    prompt_eval_duration_ms = FloatField(null=True)
    eval_duration_ms = FloatField(null=True)
    done_reason = TextField(null=True)
    api = CharField(max_length=TEXT_CHARS["api"])
    prompt = TextField(null=True)
    response_preview = TextField(null=True)
    cached_input_tokens = BigIntegerField(null=True)
    remote_model = TextField(null=True)
    remote_host = TextField(null=True)
    cold_start = BooleanField(null=True)
    key_name = TextField(constraints=[EMPTY_TEXT])
    instance = TextField(constraints=[EMPTY_TEXT])
    upstream = TextField(constraints=[EMPTY_TEXT])

    class Meta:
        table_name = CALLS_TABLE
        # The dashboard filters by time, then by model, endpoint, outcome, key or instance, and groups by model over
        # a time range.
        indexes = ((("model", "timestamp"), False), (("endpoint", "timestamp"), False),
                   (("key_name", "timestamp"), False), (("instance", "timestamp"), False))  # fmt: skip


class SchemaVersion(BaseModel):
    """A single row holding the schema version this database was last migrated to."""

    version = IntegerField()

    class Meta:
        table_name = SCHEMA_VERSION_TABLE


class ModelEvent(BaseModel):
    """A model the upstream loaded or unloaded: ``event`` is ``load`` or ``unload``, with the model's size, VRAM and
    context length from ``/api/ps`` and, for a load, the request_id of the call that paid it when this process saw it.
    """

    id = BigAutoField()
    timestamp = UTCDateTimeField(index=True)
    event = CharField(max_length=8)
    model = TextField()
    size_bytes = BigIntegerField(null=True)
    vram_bytes = BigIntegerField(null=True)
    context_length = IntegerField(null=True)
    request_id = CharField(max_length=TEXT_CHARS["request_id"], null=True)

    class Meta:
        table_name = MODEL_EVENTS_TABLE


MODELS = (CallRow, SchemaVersion)
# The Python type a field stores unchanged: a value of exactly that type skips db_value (half a microsecond a column);
# any other value, and every value of a field not listed here (timestamps), still goes through it.
_STORED_AS = {IntegerField: int, BigIntegerField: int, FloatField: float, TextField: str, CharField: str,
              BooleanField: bool}  # fmt: skip
_COLUMN_PLAN = tuple(
    (field, _STORED_AS.get(type(field))) for field in (getattr(CallRow, name) for name in COLUMNS)
)  # a model's attribute is its Field


def open_database(url: str, **options) -> Database:
    """Return a Database for ``url`` (SQLite gets WAL, a busy timeout and IMMEDIATE writes); not yet connected.

    ``options`` go to peewee's Database (e.g. ``thread_safe=False`` for a connection threads share under a lock)."""
    scheme = urlsplit(url).scheme
    given = parse_qs(urlsplit(url).query)
    defaults = SQLITE_DEFAULTS if scheme.startswith("sqlite") else POSTGRES_DEFAULTS if "postgres" in scheme else {}
    db = db_url.connect(url, **{key: value for key, value in defaults.items() if key not in given}, **options)
    if isinstance(db, SqliteDatabase) and db.database != ":memory:":
        Path(db.database).parent.mkdir(parents=True, exist_ok=True)
    return db


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


# ---- model residency --------------------------------------------------------------------------------------------

EVENT_FIELDS = ("timestamp", "event", "model", "size_bytes", "vram_bytes", "context_length", "request_id")


class ModelEventStore:
    """The residency poller's view of ``model_events``: what is loaded by the last events, and new events to add."""

    def __init__(self, db: Database | DatabaseProxy = database) -> None:
        self.db = db

    def loaded(self) -> dict[str, dict]:
        """Return model -> its last load event, for every model whose last event is a load."""
        with self.db.connection_context():
            return loaded_models(self.db)

    def record(self, events: list[dict]) -> None:
        """Insert events (dicts with EVENT_FIELDS) in one transaction; raises whatever the database raises."""
        with self.db.connection_context(), self.db.atomic():
            for event in events:
                ModelEvent.insert(**{name: event.get(name) for name in EVENT_FIELDS}).as_rowcount().execute(self.db)


def loaded_models(db: Database) -> dict[str, dict]:
    """Return model -> its last event as a dict, for the models whose last event is a load (loaded now)."""
    latest = ModelEvent.select(fn.MAX(ModelEvent.id)).group_by(ModelEvent.model)
    rows = ModelEvent.select().where(ModelEvent.id.in_(latest)).order_by(ModelEvent.model).dicts().execute(db)
    return {row["model"]: row for row in rows if row["event"] == "load"}


COLD_SAMPLE_ROWS = 20_000  # the newest cold calls a p50 is taken over, per request


def cold_starts(db: Database, since: datetime | None = None, until: datetime | None = None) -> list[dict]:
    """Return per model the calls marked cold_start in the range and their p50 load_duration_ms (nearest rank)."""
    query = CallRow.select(CallRow.model, CallRow.load_duration_ms).where(CallRow.cold_start == True)  # noqa: E712
    if since is not None:
        query = query.where(CallRow.timestamp >= since)
    if until is not None:
        query = query.where(CallRow.timestamp < until)
    durations: dict[str, list[float]] = {}
    for model, load_ms in query.order_by(CallRow.id.desc()).limit(COLD_SAMPLE_ROWS).tuples().execute(db):
        durations.setdefault(model or "", []).append(load_ms)
    rows = []
    for model, values in sorted(durations.items()):
        values.sort()
        p50 = values[(len(values) - 1) // 2]
        rows.append({"model": model, "cold_starts": len(values), "load_duration_ms_p50": p50})
    return rows


def model_events(
    db: Database, since: datetime | None = None, limit: int = 1000, until: datetime | None = None
) -> list[dict]:
    """Return the newest ``limit`` events (since ``since`` and before ``until`` when given), oldest first."""
    query = ModelEvent.select()
    if since is not None:
        query = query.where(ModelEvent.timestamp >= since)
    if until is not None:
        query = query.where(ModelEvent.timestamp < until)
    rows = list(query.order_by(ModelEvent.id.desc()).limit(limit).dicts().execute(db))
    return rows[::-1]


# ---- schema versions and migrations ----------------------------------------------------------------------------

# Version N's migration takes a database at N - 1 to N. A new column is added here *and* on CallRow (and COLUMNS),
# e.g. ``3: lambda m: [m.add_column("calls", "gpu_name", TextField(null=True))]``. Version 1 is the first schema.
# Each migration spells out its fields rather than taking CallRow's, so it stays what it was when a later version
# changes a column.


def _add_cache_and_cloud_columns(migrator: SchemaMigrator) -> list:
    """Version 2: cached_input_tokens, remote_model and remote_host; ``api`` widens to hold ``anthropic``."""
    operations = [
        migrator.add_column(CALLS_TABLE, "cached_input_tokens", IntegerField(null=True)),
        migrator.add_column(CALLS_TABLE, "remote_model", TextField(null=True)),
        migrator.add_column(CALLS_TABLE, "remote_host", TextField(null=True)),
    ]
    if not isinstance(migrator, SqliteMigrator):  # SQLite does not enforce a VARCHAR's length; PostgreSQL does
        operations.append(migrator.alter_column_type(CALLS_TABLE, "api", CharField(max_length=16)))
    return operations


def _add_cold_start(migrator: SchemaMigrator) -> list:
    """Version 3: cold_start (the model_events table has its own step: create_tables makes it when missing)."""
    return [migrator.add_column(CALLS_TABLE, "cold_start", BooleanField(null=True))]


def _add_attribution_columns(migrator: SchemaMigrator) -> list:
    """Version 4: key_name, instance and upstream (rows stored before get ''), and the key and instance indexes;
    the token counts widen to 64 bits (an answer may claim more than 2**31 tokens; SQLite's integers are 64-bit)."""
    # NOT NULL DEFAULT '' in one ADD COLUMN each: no table rewrite (peewee's path for a default rebuilds SQLite's).
    operations = [
        migrator.add_column(CALLS_TABLE, name, TextField(constraints=[SQL("DEFAULT ''")]), allow_not_null=True)
        for name in ("key_name", "instance", "upstream")
    ]
    operations += [  # named as create_tables names CallRow's indexes
        migrator.add_index(CALLS_TABLE, (name, "timestamp"), name=f"callrow_{name}_timestamp")
        for name in ("key_name", "instance")
    ]
    if not isinstance(migrator, SqliteMigrator):
        operations += [
            migrator.alter_column_type(CALLS_TABLE, name, BigIntegerField(null=True))
            for name in ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens")
        ]
    return operations


MIGRATIONS: dict[int, Callable[[SchemaMigrator], list]] = {
    2: _add_cache_and_cloud_columns,
    3: _add_cold_start,
    4: _add_attribution_columns,
}
SCHEMA_VERSION = 4


def create_tables(db: Database) -> int:
    """Create the tables, or migrate an older schema to the current version keeping the rows; return the version."""
    with db.atomic():
        _lock_schema(db)
        found = _stored_version(db)
        SchemaManager(ModelEvent, database=db).create_all(safe=True)  # its own step, whatever the version
        if found is None:
            for model in MODELS:
                SchemaManager(model, database=db).create_all(safe=True)
            # as_rowcount: peewee would ask for the new id back (RETURNING) whenever the read side's database
            # (the proxy the model is bound to) supports it, whatever ``db`` is
            SchemaVersion.insert(version=SCHEMA_VERSION).as_rowcount().execute(db)
            return SCHEMA_VERSION
        return _migrate(db, found)


def _lock_schema(db: Database) -> None:
    """Serialise schema work between processes starting at once (SQLite's IMMEDIATE already does)."""
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_xact_lock(7469001)")  # any fixed key: it names our schema lock


def _stored_version(db: Database) -> int | None:
    if not db.table_exists(SCHEMA_VERSION_TABLE):
        return None
    row = SchemaVersion.select(SchemaVersion.version).limit(1).execute(db)
    versions = [found.version for found in row]
    return versions[0] if versions else None


def _migrate(db: Database, found: int) -> int:
    if found > SCHEMA_VERSION:
        log.warning("database schema version %s is newer than this proxy's %s; leaving it as is", found, SCHEMA_VERSION)
        return found
    migrator = SchemaMigrator.from_database(db)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        log.info("migrating the analytics schema to version %s", version)
        migrate(*MIGRATIONS[version](migrator))
        SchemaVersion.update(version=version).execute(db)
    return SCHEMA_VERSION
