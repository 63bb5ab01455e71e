"""The writer and the schema, without a network: batching, drops, crashes, forks, retention, migrations, pragmas."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
import typing
from dataclasses import fields
from datetime import timedelta

import pytest
from peewee import IntegrityError, OperationalError, TextField

from proxy_app.calls import COLUMNS, TEXT_CHARS, Call
from proxy_app.store import models, retention, schema, writes
from proxy_app.store import writer as writer_module
from proxy_app.store.csvlog import CsvLog
from proxy_app.store.models import CallRow, SchemaVersion
from proxy_app.store.writer import Writer
from tests.conftest import free_port, hold_write_lock, release
from tests.test_csvlog import NOW, parse, sample_call


def open_store(tmp_path, query: str = ""):
    """A fresh SQLite store in ``tmp_path`` with its tables."""
    db = models.open_database(f"sqlite:///{tmp_path / 'calls.db'}{query}")
    schema.create_tables(db)
    return db


def make_writer(tmp_path, maxsize: int = 100, query: str = "", **options) -> Writer:
    db = open_store(tmp_path, query)
    writer = Writer(db, CsvLog(tmp_path / "calls.csv", clock=lambda: NOW), maxsize, **options)
    writer.schema_ready = True
    return writer


def stored_ids(db) -> list[str]:
    return [row.request_id for row in CallRow.select(CallRow.request_id).order_by(CallRow.id).execute(db)]


@pytest.fixture
def writer(tmp_path):
    made = make_writer(tmp_path, maxsize=5000)
    yield made
    made.close()


def test_models_columns_follow_calls():
    names = [name for name in CallRow._meta.sorted_field_names if name != "id"]
    assert tuple(names) == COLUMNS
    hints = typing.get_type_hints(Call)
    for field in fields(Call):
        is_optional = type(None) in typing.get_args(hints[field.name])
        assert CallRow._meta.fields[field.name].null == is_optional, field.name


def test_models_sqlite_pragmas_and_url_overrides(tmp_path):
    db = models.open_database(f"sqlite:///{tmp_path / 'sub' / 'x.db'}?timeout=0.25")
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 250
    with db.atomic():  # IMMEDIATE: the write lock is taken at BEGIN, so another writer cannot start
        other = sqlite3.connect(tmp_path / "sub" / "x.db", timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
    db.close()


def test_models_row_holds_the_calls_bounded_text():
    row = dict(zip(COLUMNS, writes.row_of(sample_call(session_id="s" * 5000, prompt="a\x00b")), strict=True))
    assert row["session_id"] == "s" * TEXT_CHARS["session_id"] and row["prompt"] == "ab"


def test_models_create_tables_twice_keeps_rows(tmp_path):
    db = open_store(tmp_path)
    writes.insert_calls(db, [sample_call()])
    assert schema.create_tables(db) == schema.SCHEMA_VERSION
    assert stored_ids(db) == [sample_call().request_id]
    assert [row.version for row in SchemaVersion.select().execute(db)] == [schema.SCHEMA_VERSION]


def test_models_migration_adds_column_and_keeps_rows(tmp_path, monkeypatch):
    db = open_store(tmp_path)
    writes.insert_calls(db, [sample_call(request_id="old")])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 1)
    add = {schema.SCHEMA_VERSION: lambda m: [m.add_column("calls", "gpu_name", TextField(null=True))]}
    monkeypatch.setattr(schema, "MIGRATIONS", add)
    assert schema.create_tables(db) == schema.SCHEMA_VERSION
    assert "gpu_name" in [column.name for column in db.get_columns("calls")]
    assert stored_ids(db) == ["old"]
    assert [row.version for row in SchemaVersion.select().execute(db)] == [schema.SCHEMA_VERSION]


def test_models_newer_schema_is_left_alone(tmp_path, monkeypatch):
    db = open_store(tmp_path)
    stored = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 0)
    assert schema.create_tables(db) == stored


def test_writer_stores_batches_then_mirrors_them(writer, monkeypatch):
    sizes = []
    insert = writes.insert_calls
    monkeypatch.setattr(writes, "insert_calls", lambda db, calls: (sizes.append(len(calls)), insert(db, calls)))
    for n in range(1200):
        writer.submit(sample_call(request_id=f"r{n}"))
    assert writer.flush(10)
    assert stored_ids(writer.database) == [f"r{n}" for n in range(1200)]
    assert sum(sizes) == 1200 and max(sizes) <= writer_module.BATCH_ROWS
    rows = parse(writer.csv_log.path.read_text())
    assert [row[1] for row in rows[1:]] == [f"r{n}" for n in range(1200)]
    assert (writer.written, writer.dropped, writer.depth) == (1200, 0, 0)
    assert writer.health() == {"ok": True, "alive": True, "depth": 0, "written": 1200, "dropped": 0, "error": None}


def test_writer_full_queue_drops_without_blocking(tmp_path, monkeypatch):
    writer = make_writer(tmp_path, maxsize=3)
    entered, release = threading.Event(), threading.Event()
    store = writer._store

    def slow_store(calls):
        entered.set()
        release.wait(5)
        store(calls)

    monkeypatch.setattr(writer, "_store", slow_store)
    writer.submit(sample_call(request_id="first"))
    assert entered.wait(5)
    started = time.perf_counter()
    for n in range(5):
        writer.submit(sample_call(request_id=f"q{n}"))
    assert time.perf_counter() - started < 1  # the store is held for 5 s: submit never waits for it
    assert (writer.dropped, writer.depth) == (2, 3)
    release.set()
    assert writer.flush(5)
    assert stored_ids(writer.database) == ["first", "q0", "q1", "q2"] and writer.written == 4
    writer.close()


def test_writer_locked_database_retries_until_released(tmp_path):
    writer = make_writer(tmp_path, query="?timeout=0.1", retry_seconds=30)
    holder = hold_write_lock(tmp_path / "calls.db")
    for n in range(3):
        writer.submit(sample_call(request_id=f"held{n}"))
    assert not writer.flush(1.5)  # still refused: the batch is held, not dropped
    assert (writer.written, writer.dropped) == (0, 0) and writer.retries >= 3
    assert writer.health()["ok"] is False and "locked" in writer.health()["error"]
    writer.submit(sample_call(request_id="queued"))  # arrives while the batch waits
    release(holder)
    assert writer.flush(10)
    assert stored_ids(writer.database) == ["held0", "held1", "held2", "queued"]
    assert (writer.written, writer.dropped) == (4, 0) and writer.health()["ok"] is True
    assert [row[1] for row in parse(writer.csv_log.path.read_text())[1:]] == ["held0", "held1", "held2", "queued"]
    writer.close()


def test_writer_stop_ends_a_retry_and_counts_the_batch(tmp_path):
    writer = make_writer(tmp_path, query="?timeout=0.1", retry_seconds=600)
    holder = hold_write_lock(tmp_path / "calls.db")
    writer.submit(sample_call(request_id="held"))
    assert not writer.flush(0.5)
    started = time.monotonic()
    assert writer.stop(5) and time.monotonic() - started < 2  # a pause in the retry is cut short
    assert (writer.written, writer.dropped) == (0, 1)
    release(holder)


def test_writer_drops_at_once_a_batch_the_database_will_never_take(writer, monkeypatch):
    def refuse(db, calls):
        raise IntegrityError("NOT NULL constraint failed: calls.endpoint")

    monkeypatch.setattr(writes, "insert_calls", refuse)
    writer.retry_seconds = 60
    writer.submit(sample_call())
    assert writer.flush(5) and (writer.dropped, writer.retries) == (1, 0)  # not retried: it would fail for ever
    assert writer.health()["error"] == "IntegrityError: NOT NULL constraint failed: calls.endpoint"


def test_writer_locked_database_drops_and_recovers(tmp_path):
    writer = make_writer(tmp_path, query="?timeout=0.1", retry_seconds=0)
    holder = hold_write_lock(tmp_path / "calls.db")
    for n in range(3):
        writer.submit(sample_call(request_id=f"locked{n}"))
    assert writer.flush(5)
    assert (writer.written, writer.dropped) == (0, 3)
    health = writer.health()
    assert health["ok"] is False and "locked" in health["error"]
    release(holder)
    writer.submit(sample_call(request_id="after"))
    assert writer.flush(5)
    assert stored_ids(writer.database) == ["after"] and writer.health()["ok"] is True
    assert parse(writer.csv_log.path.read_text())[1][1] == "after"  # only committed rows reach the CSV
    writer.close()


def test_writer_reports_the_real_error_behind_a_failed_rollback(writer, monkeypatch):
    def disk_full(db, calls):  # the chain peewee leaves: its error, from sqlite3's, while handling the real one
        try:
            raise OperationalError("database or disk is full")  # SQLite has already ended the transaction
        except OperationalError:
            try:
                raise sqlite3.OperationalError("cannot rollback - no transaction is active")  # noqa: B904
            except sqlite3.OperationalError as exc:
                raise OperationalError(str(exc))  # noqa: B904

    monkeypatch.setattr(writes, "insert_calls", disk_full)
    writer.retry_seconds = 0
    writer.submit(sample_call())
    assert writer.flush(5) and writer.dropped == 1
    assert writer.health()["error"] == "OperationalError: database or disk is full"


def test_writer_unreachable_database_drops_and_never_raises(tmp_path):
    db = models.open_database(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    writer = Writer(db, CsvLog(tmp_path / "calls.csv"), 10, retry_seconds=0)
    for _ in range(4):
        writer.submit(sample_call())
    assert writer.flush(10)
    assert (writer.written, writer.dropped, writer.schema_ready) == (0, 4, False)
    assert writer.health()["ok"] is False and not (tmp_path / "calls.csv").exists()
    writer.close()


def test_writer_crashed_thread_is_replaced(writer, monkeypatch, caplog):
    store = writer._store
    calls = iter([RuntimeError("a bug"), None])

    def store_once_broken(batch):
        failure = next(calls)
        if failure:
            raise failure
        store(batch)

    monkeypatch.setattr(writer, "_store", store_once_broken)
    writer.submit(sample_call(request_id="lost"))
    crashed = writer._thread
    crashed.join(5)  # not flush(): it would already start the replacement
    assert writer.health()["ok"] is False and writer.health()["alive"] is False and writer.dropped == 1
    writer.submit(sample_call(request_id="kept"))
    assert writer.flush(5)
    assert stored_ids(writer.database) == ["kept"] and writer.restarts == 1 and writer.health()["ok"] is True
    assert "crashed" in caplog.text


def test_writer_stop_drains_then_drops(writer):
    for n in range(300):
        writer.submit(sample_call(request_id=f"s{n}"))
    assert writer.stop(10)
    assert len(stored_ids(writer.database)) == 300
    writer.submit(sample_call())
    assert writer.dropped == 1 and writer.flush(1) and writer.stop(1)


def _submit_in_child(writer: Writer) -> None:
    writer.submit(sample_call(request_id="child"))
    os._exit(0 if writer.flush(5) and writer.written == 1 else 1)


def _inspect_in_child(writer: Writer, parent_lock) -> None:
    reset = writer._thread is None and writer.depth == 0 and writer._lock is not parent_lock
    os._exit(0 if reset and writer._pid == os.getpid() else 1)


def run_forked(target, *args) -> int:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(10)
    return child.exitcode


@pytest.mark.skipif(os.name == "nt", reason="fork")
def test_writer_forked_worker_starts_its_own_thread(writer):
    # The gunicorn case: the app (and its writer) is built, the database closed, then workers fork.
    assert run_forked(_submit_in_child, writer) == 0
    writer.submit(sample_call(request_id="parent"))
    assert writer.flush(5)
    assert sorted(stored_ids(writer.database)) == ["child", "parent"]


@pytest.mark.skipif(os.name == "nt", reason="fork")
def test_writer_fork_while_busy_leaves_the_parent_queue_behind(writer, monkeypatch):
    # The child must not inherit a running thread's queue or its locks. (It must not use SQLite either:
    # SQLite does not survive fork() while another thread holds a connection, hence this test's narrow check.)
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(writer, "_store", lambda calls: (entered.set(), release.wait(5)))
    writer.submit(sample_call())
    assert entered.wait(5)
    writer.submit(sample_call())
    assert writer.depth == 1
    with writer._lock:  # held at fork time, as a busy parent thread might
        code = run_forked(_inspect_in_child, writer, writer._lock)
    release.set()
    assert code == 0 and writer.flush(5)


def test_writer_retention_deletes_exactly_what_is_older(tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "BATCH_ROWS", 7)  # several batches
    writer = make_writer(tmp_path, retention_days=7, clock=lambda: NOW)
    cutoff = NOW - timedelta(days=7)
    old = [sample_call(request_id=f"old{n}", timestamp=cutoff - timedelta(hours=n + 1)) for n in range(20)]
    edge = [
        sample_call(request_id="just-older", timestamp=cutoff - timedelta(milliseconds=1)),
        sample_call(request_id="exactly", timestamp=cutoff),
        sample_call(request_id="just-newer", timestamp=cutoff + timedelta(milliseconds=1)),
    ]
    writes.insert_calls(writer.database, old + edge)
    assert writer.retain() == 21
    assert stored_ids(writer.database) == ["exactly", "just-newer"]
    assert writer.retain() == 0
    writer.close()


def test_writer_thread_applies_retention_to_rows_and_files(tmp_path):
    writer = make_writer(tmp_path, retention_days=1, clock=lambda: NOW)
    stale = tmp_path / "calls.2025-04-20T000000Z.csv"
    stale.write_text("old")
    os.utime(stale, (NOW.timestamp() - 3 * 86400,) * 2)
    writer.submit(sample_call(request_id="ancient", timestamp=NOW - timedelta(days=2)))
    writer.submit(sample_call(request_id="fresh"))
    assert writer.flush(5)
    assert stored_ids(writer.database) == ["fresh"] and not stale.exists()
    writer.close()


def test_writer_retention_zero_keeps_everything(tmp_path):
    writer = make_writer(tmp_path, retention_days=0, clock=lambda: NOW)
    writer.submit(sample_call(timestamp=NOW - timedelta(days=4000)))
    assert writer.flush(5) and writer.retain() == 0
    assert len(stored_ids(writer.database)) == 1
    writer.close()


@pytest.mark.parametrize(
    "changes",
    [{}, {"input_tokens": True, "queue_time_ms": 3, "model": None, "stream_mode": 1}],
    ids=["usual types", "other types"],
)
def test_models_row_of_gives_what_each_fields_db_value_gives(changes):
    call = sample_call(**changes)
    fields = CallRow._meta.fields
    expected = tuple(fields[name].db_value(getattr(call, name)) for name in COLUMNS)
    assert writes.row_of(call) == expected
    assert [type(value) for value in writes.row_of(call)] == [type(value) for value in expected]
