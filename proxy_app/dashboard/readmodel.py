"""SQLite only: the read model that keeps the dashboard fast at a million rows, kept beside the store's table.

- ``calls_rollup``: per 10-minute slot, model, endpoint, outcome and status: calls, input/output tokens, and for
  the calls that reported cached prompt tokens their number, cached tokens and input tokens (the cache-hit ratio),
  and the calls that paid a model load (cold starts).
- ``calls_rollup_clients``: per hour and model, the calls of each client IP (for the distinct-clients card).
- ``calls_rollup_keys``: per 10-minute slot, key name, model, endpoint, outcome and status: calls and input/output
  tokens (for the by-key table and /analytics/me).
- ``calls_fts``: an FTS5 trigram index over prompt and response preview (a copy of the two columns, so that rows the
  retention deletes can be dropped from it by id).

Each has a watermark in ``dashboard_state``: the highest ``calls.id`` folded in. Readers take the folded part from
here and the rows above the watermark from ``calls``, so answers are exact at every moment. A background thread
per process folds new rows in, one chunk per short write transaction. There are no triggers, and the one index the
read model adds to ``calls`` (COLD_INDEX, the cold starts' times, for their load times without a scan) holds only
cold calls: the writer's inserts cost what they cost without a dashboard. This module does not answer queries
(queries.py and stats.py do).
"""

from __future__ import annotations

import logging
import sqlite3

from peewee import Database, DatabaseError, SqliteDatabase

from proxy_app.ticker import Ticker

log = logging.getLogger(__name__)

SLOT_CHARS = 15  # "YYYY-MM-DD HH:M": the leading characters of a stored timestamp that name its 10-minute slot
HOUR_CHARS = 13  # "YYYY-MM-DD HH": an hour
# Rows per write transaction: each holds the write lock < ~0.3 s.
FOLD_ROWS = {"rollup": 50_000, "fts": 5_000, "keys": 50_000}
DENSE_MATCHES = 50_000  # a text query matching more rows than this is answered by a scan in time order instead
REFRESH_SECONDS = 5.0  # how often a process looks for new rows to fold
PAUSE_SECONDS = 0.05  # between two chunks of a long catch-up, so the writer gets the lock in between
FIRST_DELAY_SECONDS = 1.0  # the first fold waits, so that it does not slow down the page view that started it
# calls_rollup's columns in order (SCHEMA creates them; stats.py reads them). A rollup with other columns, made by
# an older proxy, is dropped and folded again from the rows.
ROLLUP_COLUMNS = ("slot", "model", "endpoint", "outcome", "http_status", "calls", "input_tokens", "output_tokens",
                  "cache_calls", "cached_input_tokens", "cache_input_tokens", "cold_starts")  # fmt: skip
COLD_INDEX = "calls_cold_start_timestamp"
LIKE = """("prompt" LIKE ? ESCAPE '\\' OR "response_preview" LIKE ? ESCAPE '\\')"""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS dashboard_state (name TEXT PRIMARY KEY, upto INTEGER NOT NULL,
       upto_request_id TEXT)""",
    """CREATE TABLE IF NOT EXISTS calls_rollup (slot TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL,
       outcome TEXT NOT NULL, http_status INTEGER NOT NULL, calls INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
       output_tokens INTEGER NOT NULL, cache_calls INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL,
       cache_input_tokens INTEGER NOT NULL, cold_starts INTEGER NOT NULL,
       PRIMARY KEY (slot, model, endpoint, outcome, http_status)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS calls_rollup_clients (slot TEXT NOT NULL, model TEXT NOT NULL,
       ip_source TEXT NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (slot, model, ip_source)) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO dashboard_state (name, upto) VALUES ('rollup', 0)",
    f'CREATE INDEX IF NOT EXISTS {COLD_INDEX} ON calls ("timestamp") WHERE "cold_start"',
)
KEYS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS calls_rollup_keys (slot TEXT NOT NULL, key_name TEXT NOT NULL, model TEXT NOT NULL,
       endpoint TEXT NOT NULL, outcome TEXT NOT NULL, http_status INTEGER NOT NULL, calls INTEGER NOT NULL,
       input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
       PRIMARY KEY (slot, key_name, model, endpoint, outcome, http_status)) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO dashboard_state (name, upto) VALUES ('keys', 0)",
)
FTS_SCHEMA = (
    """CREATE VIRTUAL TABLE IF NOT EXISTS calls_fts USING fts5(prompt, response_preview, tokenize='trigram')""",
    "INSERT OR IGNORE INTO dashboard_state (name, upto) VALUES ('fts', 0)",
)
FOLDS = {
    "rollup": (
        f"""INSERT INTO calls_rollup SELECT substr("timestamp", 1, {SLOT_CHARS}), coalesce("model", ''), "endpoint",
        "outcome", "http_status", count(*), coalesce(sum("input_tokens"), 0), coalesce(sum("output_tokens"), 0),
        count("cached_input_tokens"), coalesce(sum("cached_input_tokens"), 0),
        coalesce(sum(CASE WHEN "cached_input_tokens" IS NOT NULL THEN "input_tokens" END), 0),
        coalesce(sum("cold_start"), 0) FROM calls WHERE "id" > ? AND "id" <= ? GROUP BY 1, 2, 3, 4, 5
        ON CONFLICT DO UPDATE SET calls = calls + excluded.calls, input_tokens = input_tokens +
        excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
        cache_calls = cache_calls + excluded.cache_calls,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_input_tokens = cache_input_tokens + excluded.cache_input_tokens,
        cold_starts = cold_starts + excluded.cold_starts""",
        f"""INSERT INTO calls_rollup_clients SELECT substr("timestamp", 1, {HOUR_CHARS}), coalesce("model", ''),
        "ip_source", count(*) FROM calls WHERE "id" > ? AND "id" <= ? GROUP BY 1, 2, 3
        ON CONFLICT DO UPDATE SET calls = calls + excluded.calls""",
    ),
    "fts": (
        """INSERT INTO calls_fts (rowid, prompt, response_preview) SELECT "id", "prompt", "response_preview"
        FROM calls WHERE "id" > ? AND "id" <= ? AND ("prompt" IS NOT NULL OR "response_preview" IS NOT NULL)""",
    ),
    "keys": (
        f"""INSERT INTO calls_rollup_keys SELECT substr("timestamp", 1, {SLOT_CHARS}), "key_name",
        coalesce("model", ''), "endpoint", "outcome", "http_status", count(*), coalesce(sum("input_tokens"), 0),
        coalesce(sum("output_tokens"), 0) FROM calls WHERE "id" > ? AND "id" <= ? GROUP BY 1, 2, 3, 4, 5, 6
        ON CONFLICT DO UPDATE SET calls = calls + excluded.calls, input_tokens = input_tokens +
        excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens""",
    ),
}
TARGETS = {"rollup": ("calls_rollup", "calls_rollup_clients"), "fts": ("calls_fts",), "keys": ("calls_rollup_keys",)}


def is_sqlite(db: Database) -> bool:
    """True for a SQLite store (the only one with a read model; PostgreSQL aggregates the rows directly)."""
    return isinstance(db, SqliteDatabase)


def has_trigram() -> bool:
    """True when this SQLite can build an FTS5 trigram index (3.34 or later, compiled with FTS5)."""
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE probe USING fts5(x, tokenize='trigram')")
        return True
    except sqlite3.Error:
        return False


def ensure_read_model(db: Database) -> bool:
    """Create the read model's tables if missing, or a rollup of an older layout anew (no rows are read here);
    False when the store is not SQLite."""
    if not is_sqlite(db):
        return False
    with db.atomic():
        _drop_stale_rollup(db)
        for statement in SCHEMA + KEYS_SCHEMA + (FTS_SCHEMA if has_trigram() else ()):
            db.execute_sql(statement)
    return True


def _drop_stale_rollup(db: Database) -> None:
    """Drop a rollup whose columns are not ROLLUP_COLUMNS and restart its watermark, so that the refresher folds every
    row again; meanwhile readers count the rows above the watermark directly, so answers stay exact."""
    found = tuple(row[1] for row in db.execute_sql("PRAGMA table_info(calls_rollup)").fetchall())
    if not found or found == ROLLUP_COLUMNS:
        return
    log.warning("the dashboard's rollup lacks columns this version reads; rebuilding it from the stored calls")
    db.execute_sql("DROP TABLE calls_rollup")
    db.execute_sql("DELETE FROM calls_rollup_clients")  # folded under the same watermark
    db.execute_sql("UPDATE dashboard_state SET upto = 0, upto_request_id = NULL WHERE name = 'rollup'")


def watermarks(db: Database) -> dict[str, int]:
    """Return {structure: highest calls.id folded in}; empty when there is no read model."""
    if not is_sqlite(db):
        return {}
    try:
        return dict(db.execute_sql("SELECT name, upto FROM dashboard_state").fetchall())
    except DatabaseError:
        return {}


def catch_up(db: Database) -> int:
    """Fold one chunk of new rows into each structure and drop what retention deleted; return the rows folded."""
    folded = 0
    for name in watermarks(db):
        folded += _fold(db, name, FOLD_ROWS[name])
    _prune(db)
    return folded


def _fold(db: Database, name: str, chunk: int) -> int:
    with db.atomic():
        upto, marker = db.execute_sql(
            "SELECT upto, upto_request_id FROM dashboard_state WHERE name = ?", (name,)
        ).fetchone()
        if upto and _was_reset(db, upto, marker):
            log.warning("the calls table was emptied and refilled; rebuilding the dashboard's %s", name)
            for target in TARGETS[name]:
                db.execute_sql(f"DELETE FROM {target}")
            upto = 0
        sql = 'SELECT max("id") FROM (SELECT "id" FROM calls WHERE "id" > ? ORDER BY "id" LIMIT ?)'
        high = db.execute_sql(sql, (upto, chunk)).fetchone()[0]
        if high is None:
            return 0
        for statement in FOLDS[name]:
            db.execute_sql(statement, (upto, high))
        marker = db.execute_sql('SELECT "request_id" FROM calls WHERE "id" = ?', (high,)).fetchone()[0]
        db.execute_sql("UPDATE dashboard_state SET upto = ?, upto_request_id = ? WHERE name = ?", (high, marker, name))
    return high - upto


def _was_reset(db: Database, upto: int, marker: str | None) -> bool:
    """True when ids were reused: the table was emptied (SQLite then restarts ids) and new rows arrived."""
    row = db.execute_sql('SELECT "request_id" FROM calls WHERE "id" = ?', (upto,)).fetchone()
    if row is not None:
        return row[0] != marker
    highest = db.execute_sql('SELECT max("id") FROM calls').fetchone()[0]
    return highest is None or highest < upto


def _prune(db: Database) -> None:
    """Drop rollup slots and indexed text older than the oldest stored row (retention deleted those rows).

    Rows are only ever deleted oldest first (the retention); a row deleted otherwise stays counted in its slot.
    """
    oldest, lowest = db.execute_sql('SELECT min("timestamp"), min("id") FROM calls').fetchone()
    if oldest is None:
        return
    with db.atomic():
        db.execute_sql("DELETE FROM calls_rollup WHERE slot < ?", (oldest[:SLOT_CHARS],))
        db.execute_sql("DELETE FROM calls_rollup_clients WHERE slot < ?", (oldest[:HOUR_CHARS],))
        db.execute_sql("DELETE FROM calls_rollup_keys WHERE slot < ?", (oldest[:SLOT_CHARS],))
        if "fts" in watermarks(db):
            sql = "SELECT rowid FROM calls_fts WHERE rowid < ? LIMIT ?"
            gone = db.execute_sql(sql, (lowest, FOLD_ROWS["fts"])).fetchall()
            # By rowid, not "DELETE ... WHERE rowid IN (SELECT ... FROM calls_fts)": with SQLite 3.40 that form
            # made the test run flaky (another part of the process lost a file descriptor); this one never did.
            if gone:
                db.cursor().executemany("DELETE FROM calls_fts WHERE rowid = ?", gone)


def escape_like(text: str) -> str:
    """Return ``text`` as a LIKE pattern matching it anywhere, with %, _ and the escape character taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def text_condition(db: Database, text: str) -> tuple[str, list]:
    """Return a WHERE clause (and parameters) for rows whose prompt or response preview contains ``text``.

    Case-insensitive. On SQLite with the trigram index, the indexed rows are looked up in it and the rows above its
    watermark scanned; text shorter than 3 characters or matching very many rows uses a plain scan.
    """
    pattern = escape_like(text)
    if not is_sqlite(db):
        return LIKE.replace("LIKE", "ILIKE"), [pattern, pattern]
    upto = watermarks(db).get("fts")
    match = '"' + text.replace('"', '""') + '"'
    if upto is None or len(text) < 3 or _is_dense(db, match):
        return LIKE, [pattern, pattern]
    clause = f'("id" IN (SELECT rowid FROM calls_fts WHERE calls_fts MATCH ?) OR ("id" > ? AND {LIKE}))'
    return clause, [match, upto, pattern, pattern]


def _is_dense(db: Database, match: str) -> bool:
    sql = "SELECT count(*) FROM (SELECT 1 FROM calls_fts WHERE calls_fts MATCH ? LIMIT ?)"
    return db.execute_sql(sql, (match, DENSE_MATCHES + 1)).fetchone()[0] > DENSE_MATCHES


class Refresher:
    """The background thread that keeps the read model caught up; started lazily, in the process that serves."""

    def __init__(self, db: Database, interval: float = REFRESH_SECONDS) -> None:
        self.db = db
        self.interval = interval
        self.ready = False  # the tables exist
        self._ticker = Ticker(
            "dashboard-read-model", self._step, interval, first_delay=FIRST_DELAY_SECONDS, on_exit=db.close
        )  # on_exit: the thread's own connection

    def ensure_running(self) -> None:
        """Start the thread in this process unless it runs (after a gunicorn fork, on first use, after a crash)."""
        if is_sqlite(self.db):
            self._ticker.ensure()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish its chunk and end; wait up to ``timeout`` seconds."""
        self._ticker.stop(timeout)

    def _step(self) -> float:
        """Fold one chunk; return how long to wait before the next one."""
        try:
            self.ready = self.ready or ensure_read_model(self.db)
            return PAUSE_SECONDS if catch_up(self.db) else self.interval
        except Exception as exc:  # a locked or missing database: try again later, never crash the process
            log.warning("dashboard read model: %s; retrying in %.0f s", exc, self.interval)
            return self.interval
