"""Peewee models: the ``calls`` table (one row per finished call, a column per ``COLUMNS`` entry), its version, and
``model_events`` (models the upstream loaded and unloaded, as its ``/api/ps`` showed).

``open_database(url)`` opens SQLite (the default, in WAL mode) or PostgreSQL from a URL. schema.py creates and
migrates the tables, writes.py inserts and deletes rows for the writer thread (writer.py), and the dashboard reads
them (dashboard/queries.py). Nothing here runs at import, and nothing here writes rows on the request path.
"""

from __future__ import annotations

import logging
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
    Model,
    SqliteDatabase,
    TextField,
    fn,
)
from playhouse import db_url

from proxy_app.calls import TEXT_CHARS

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
