"""Hostile input at the store, on SQLite and PostgreSQL: text fields bounded and storable by construction, the
database, CSV mirror and export agreeing on them, a row the database refuses costing only itself (also racing a
thousand calls under gunicorn), and a cap on the number of rows."""

from __future__ import annotations

import csv
import json
import logging
import os
import secrets
import threading
import typing
from datetime import timedelta

import pytest
import requests

from proxy_app import calls, config
from proxy_app.calls import COLUMNS, Call
from proxy_app.dashboard import filters, queries
from proxy_app.state import state_of
from proxy_app.store import export, models, retention, schema, writes
from proxy_app.store.csvlog import CsvLog
from proxy_app.store.models import CallRow
from proxy_app.store.writer import Writer
from tests.conftest import postgres_schema
from tests.fake_ollama import FakeOllama
from tests.test_csvlog import NOW, parse, sample_call
from tests.test_store import one_call, read_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store with its tables: a SQLite file, or a throwaway schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'calls.db'}"
        return
    with postgres_schema("test_hostile") as url:
        yield url


@pytest.fixture
def store_writer(store_url, tmp_path):
    """A Writer on ``store_url`` with a CSV mirror in ``tmp_path``; closed afterwards."""
    db = models.open_database(store_url)
    schema.create_tables(db)
    db.close()
    writer = Writer(db, CsvLog(tmp_path / "calls.csv", clock=lambda: NOW), 1000, retry_seconds=5)
    writer.schema_ready = True
    yield writer
    writer.close()
    db.close()


# Megabytes where a client or an upstream can put them, and characters no UTF-8 database or file accepts.
HUGE = {
    "ip_source": "2001:db8::" + "f" * 5000, "user_agent": "agent/" + "u" * 100_000, "http_method": "PATCH" * 40,
    "endpoint": "/api/" + "p" * 20_000, "session_id": "s" * 10_000, "model": "m\ud800" * 500_000,
    "model_parameters": '{"stop":["' + "x" * 2_000_000 + '"]}', "error_message": "e" * 100_000,
    "done_reason": "r" * 5000, "prompt": "q\x00" * 5000, "response_preview": "\udc00a" * 5000,
    "remote_model": "c" * 5000, "remote_host": "https://" + "h" * 5000,
}  # fmt: skip


def test_calls_every_text_field_has_a_bound():
    hints = typing.get_type_hints(Call)
    text_fields = [name for name in COLUMNS if str in (typing.get_args(hints[name]) or (hints[name],))]
    assert list(calls.TEXT_CHARS) == text_fields
    assert calls.TEXT_CHARS["prompt"] == 1000 and max(calls.TEXT_CHARS.values()) == 4096


def test_calls_text_bounded_and_storable_when_built():
    call = sample_call(**HUGE)
    for name, limit in calls.TEXT_CHARS.items():
        value = getattr(call, name)
        assert len(value) <= limit and "\x00" not in value, name
        value.encode("utf-8")  # no lone surrogate left
    assert call.model == "m\ufffd" * 100 and call.prompt == "q" * 500 and call.response_preview == "\ufffda" * 100
    assert call.user_agent == HUGE["user_agent"][:512] and call.model_parameters == HUGE["model_parameters"][:4096]
    assert sample_call(prompt="ünïcode ✓ \U0001f600 =").prompt == "ünïcode ✓ \U0001f600 ="  # valid text is kept
    one_bad = sample_call(session_id="s\x00" * 300)  # one field out of bounds among short ASCII ones
    assert one_bad.as_dict() == {**sample_call().as_dict(), "session_id": "s" * 100}  # cut to 200, then NULs out


def test_store_huge_values_agree_in_database_mirror_and_export(store_writer):
    call = Call(**{**sample_call().as_dict(), **HUGE})
    store_writer.submit(call)
    assert store_writer.flush(10) and store_writer.written == 1
    db = store_writer.database
    stored = CallRow.select().dicts().execute(db)[0]
    mirrored = dict(zip(COLUMNS, parse(store_writer.csv_log.path.read_text(encoding="utf-8"))[1], strict=True))
    chunks = queries.iter_chunks(db, filters.parse_filters({"since": "all"}))
    exported = dict(zip(COLUMNS, parse("".join(export.iter_csv(chunks)))[1], strict=True))
    for name, limit in calls.TEXT_CHARS.items():
        assert stored[name] == mirrored[name] == exported[name] == getattr(call, name), name
        assert 0 < len(stored[name]) <= limit, name


def test_store_huge_client_values_bounded_alike_through_the_proxy(live_proxy, app, recorder):
    options = {"stop": ["x" * 3_000_000], "temperature": 0.2}  # a 3 MB options object
    document = {"model": "m" * 100_000 + "\ud800", "prompt": "p" * 50_000, "options": options, "stream": False}
    headers = {"User-Agent": "agent/" + "u" * 100_000, "X-Session-ID": "s" * 50_000}
    answer = requests.post(live_proxy.url + "/api/generate", data=json.dumps(document), headers=headers)
    assert answer.status_code == 404  # the fake knows no such model; the call is recorded all the same
    assert requests.get(live_proxy.url + "/api/" + "x" * 6000).status_code == 404
    recorder.wait_for(2)
    writer = state_of(app).writer
    assert writer.flush(10) and (writer.written, writer.dropped) == (2, 0)
    db = writer.database
    stored = list(CallRow.select().order_by(CallRow.id).dicts().execute(db))
    with open(app.config["CSV_FILE"], newline="", encoding="utf-8") as handle:
        mirrored = [dict(zip(COLUMNS, line, strict=True)) for line in list(csv.reader(handle))[1:]]
    chunks = queries.iter_chunks(db, filters.parse_filters({"since": "all"}))
    exported = [dict(zip(COLUMNS, line, strict=True)) for line in parse("".join(export.iter_csv(chunks)))[1:]]
    for name, limit in calls.TEXT_CHARS.items():
        for row, line, cell in zip(stored, mirrored, exported, strict=True):
            assert (row[name] or "") == line[name] == cell[name], name
            assert len(line[name]) <= limit, name
    first, second = mirrored
    assert first["model"] == "m" * 200 and first["user_agent"] == "agent/" + "u" * 506
    assert first["model_parameters"].startswith('{"stop":["xxx') and len(first["model_parameters"]) == 4096
    assert second["endpoint"] == "/api/" + "x" * 507


def stored_ids(db) -> list[str]:
    return [row.request_id for row in CallRow.select(CallRow.request_id).order_by(CallRow.id).execute(db)]


def mirrored_ids(writer: Writer) -> list[str]:
    return [row[1] for row in parse(writer.csv_log.path.read_text(encoding="utf-8"))[1:]]


def poisoned(request_id: str, **fields):
    """A call holding a value the database refuses (set after construction, so nothing has made it storable)."""
    call = sample_call(request_id=request_id)
    for name, value in fields.items():
        setattr(call, name, value)
    return call


POISONS = {
    "lone surrogate": {"prompt": "a\ud800b"},  # UnicodeEncodeError from both drivers
    "integer too big": {"input_tokens": 2**63},  # OverflowError (sqlite3), integer out of range (PostgreSQL)
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_writer_poisoned_call_costs_only_itself(store_writer, poison, caplog):
    good = [sample_call(request_id=f"good{n}") for n in range(20)]
    with caplog.at_level(logging.WARNING, logger="proxy_app.store.writer"):
        for call in good[:10] + [poisoned("poison", **POISONS[poison])] + good[10:]:
            store_writer.submit(call)
        assert store_writer.flush(10)
    expected = [call.request_id for call in good]
    assert stored_ids(store_writer.database) == expected and mirrored_ids(store_writer) == expected
    assert (store_writer.written, store_writer.dropped, store_writer.refused) == (20, 1, 1)
    assert store_writer.health()["ok"] is True
    refusals = [record.getMessage() for record in caplog.records if "poison" in record.getMessage()]
    assert len(refusals) == 1 and "refused call poison" in refusals[0]


def test_writer_row_the_csv_cannot_encode_costs_only_its_line(tmp_path, monkeypatch):
    # A database that stores any text (standing in for one whose encoding is wider than the mirror's UTF-8).
    monkeypatch.setattr(writes, "insert_calls", lambda db, calls: None)
    writer = Writer(models.open_database("sqlite:///:memory:"), CsvLog(tmp_path / "calls.csv", clock=lambda: NOW), 10)
    for call in [sample_call(request_id="a"), poisoned("poison", prompt="\ud800"), sample_call(request_id="b")]:
        writer.submit(call)
    assert writer.flush(10) and writer.health()["alive"] is True
    assert mirrored_ids(writer) == ["a", "b"] and (writer.written, writer.csv_failed, writer.dropped) == (3, 1, 0)
    writer.close()


def test_writer_postgres_index_entry_too_big_costs_only_its_row(tmp_path):
    # PostgreSQL reports a btree entry over its size limit as an OperationalError (SQLSTATE 54000), the class of a
    # database that is down; it is still one row's fault, so it must not hold up or drop the batch.
    with postgres_schema("test_hostile") as url:
        db = models.open_database(url)
        schema.create_tables(db)
        db.close()
        writer = Writer(db, CsvLog(tmp_path / "calls.csv", clock=lambda: NOW), 100, retry_seconds=30)
        writer.schema_ready = True
        writer.submit(sample_call(request_id="before"))
        writer.submit(poisoned("huge", session_id=secrets.token_urlsafe(9000)))  # random text does not compress
        writer.submit(sample_call(request_id="after"))
        assert writer.flush(20)
        writer.close()
        assert stored_ids(db) == mirrored_ids(writer) == ["before", "after"]
        assert (writer.written, writer.refused, writer.retries) == (2, 1, 0)
        db.close()


POISON_PROMPT = "poison \ud800 \udc00"


def test_store_poison_call_racing_1000_calls_under_gunicorn(gunicorn_proxy, tmp_path):
    proxy = gunicorn_proxy(workers=2, threads=16)
    expected, failures, lock = {}, [], threading.Lock()
    poison_id: list[str] = []

    def client(index: int, clients: int = 24) -> None:
        with requests.Session() as session:
            for number in range(index, 1000, clients):
                try:
                    request_id, counts = one_call(session, proxy.url, number)
                    if index == 0 and number == 5 * clients:  # mid-run, while the other clients' calls are in flight
                        poison_id.append(send_poison(session, proxy.url))
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    failures.append(repr(exc))
                    continue
                with lock:
                    expected[request_id] = counts

    threads = [threading.Thread(target=client, args=(index,)) for index in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures, failures[:3]
    assert len(expected) == 1000 and len(poison_id) == 1
    assert proxy.stop() == 0  # SIGTERM: each worker flushes its writer on the way out
    data = tmp_path / "data"
    rows, mirrored = read_store(f"sqlite:///{data / 'ollama-proxy.db'}", data / "ollama-proxy.csv")
    expected[poison_id[0]] = (FakeOllama.expected_prompt_tokens(POISON_PROMPT), 1)  # one token asked for
    assert rows == expected and mirrored == expected
    db = models.open_database(f"sqlite:///{data / 'ollama-proxy.db'}")
    stored_prompt = CallRow.select(CallRow.prompt).where(CallRow.request_id == poison_id[0]).scalar(db)
    db.close()
    with open(data / "ollama-proxy.csv", newline="", encoding="utf-8") as handle:
        mirrored_prompt = {line[1]: line[COLUMNS.index("prompt")] for line in csv.reader(handle)}[poison_id[0]]
    assert stored_prompt == mirrored_prompt == "poison \ufffd \ufffd"


def send_poison(session: requests.Session, url: str) -> str:
    """A generate call whose prompt holds lone surrogate escapes (valid JSON, and Python's json keeps them)."""
    body = json.dumps({"model": "llama3.2", "prompt": POISON_PROMPT, "stream": False})  # ensure_ascii: \ud800 escapes
    assert "\\ud800" in body
    response = session.post(url + "/api/generate", data=body, headers={"X-Fake-Tokens": "1"})
    assert response.status_code == 200 and response.json()["done"] is True
    return response.headers["X-Request-ID"]


# ---- the row cap (MAX_ROWS) ------------------------------------------------------------------------------------


def test_store_max_rows_setting():
    assert config.merge(environ={})["MAX_ROWS"] == 5_000_000
    assert config.merge(environ={"OLLAMA_PROXY_MAX_ROWS": "0"})["MAX_ROWS"] == 0  # no cap
    with pytest.raises(config.SettingError, match="OLLAMA_PROXY_MAX_ROWS"):
        config.merge(environ={"OLLAMA_PROXY_MAX_ROWS": "-1"})


def test_store_max_rows_reaches_the_writer(app):
    assert state_of(app).writer.retention.max_rows == app.config["MAX_ROWS"] == 5_000_000


def aged(count: int, prefix: str, first_second: int = 0) -> list:
    """Calls a second apart, oldest first, from ``first_second`` seconds after NOW."""
    start = NOW + timedelta(seconds=first_second)
    return [sample_call(request_id=f"{prefix}{n}", timestamp=start + timedelta(seconds=n)) for n in range(count)]


def test_retention_max_rows_deletes_the_oldest_beyond_the_cap(store_writer, monkeypatch):
    monkeypatch.setattr(retention, "BATCH_ROWS", 7)  # several batches
    store_writer.retention.max_rows = 20
    # Long streams are stored when they end, after calls that arrived later: the oldest arrivals go first.
    writes.insert_calls(store_writer.database, aged(40, "n", first_second=10) + aged(10, "stream"))
    evicted = store_writer.retain()
    assert evicted == store_writer.evicted == 30
    assert sorted(stored_ids(store_writer.database)) == sorted(f"n{n}" for n in range(20, 40))
    assert store_writer.retain() == 0 and store_writer.evicted == 30


def test_retention_max_rows_deletes_the_mirror_files_of_the_rows_it_deleted(store_writer, tmp_path):
    """With no age limit the cap alone bounds the store: the rotated CSV files whose rows all went beyond it go too,
    and a file still holding a kept row stays."""
    store_writer.retention.max_rows, store_writer.retention.retention_days = 20, 0
    writes.insert_calls(store_writer.database, aged(40, "n"))  # n0..n19 are beyond the cap, n20.. stay
    files = {}
    for name, last_row in (("beyond", 5), ("straddling", 25)):
        files[name] = tmp_path / f"calls.2025-05-01T0000{last_row:02d}Z.csv"
        files[name].write_text("timestamp,request_id\r\n")
        moment = (NOW + timedelta(seconds=last_row)).timestamp()  # when its last row was written
        os.utime(files[name], (moment, moment))
    assert store_writer.retain() == 20
    assert not files["beyond"].exists() and files["straddling"].exists()


def test_writer_thread_keeps_the_store_within_max_rows(store_writer, caplog):
    store_writer.retention.max_rows = 10
    writes.insert_calls(store_writer.database, aged(25, "old"))
    with caplog.at_level(logging.WARNING, logger="proxy_app.store.retention"):
        store_writer.submit(sample_call(request_id="new", timestamp=NOW + timedelta(days=1)))
        assert store_writer.flush(10)  # the first batch of a process also starts a retention pass
    assert sorted(stored_ids(store_writer.database)) == sorted([f"old{n}" for n in range(16, 25)] + ["new"])
    assert store_writer.evicted == 16 and store_writer.health()["ok"] is True
    assert "16 row(s) beyond OLLAMA_PROXY_MAX_ROWS=10" in caplog.text


def test_retention_max_rows_zero_keeps_everything(store_writer):
    writes.insert_calls(store_writer.database, aged(30, "a"))
    assert (
        store_writer.retention.max_rows == 0
        and store_writer.retain() == 0
        and len(stored_ids(store_writer.database)) == 30
    )


def test_retention_age_then_cap_in_one_pass(store_writer):
    store_writer.retention.retention_days, store_writer.retention.max_rows = 1, 5
    store_writer.retention.clock = lambda: NOW + timedelta(days=2)
    writes.insert_calls(store_writer.database, aged(3, "old") + aged(10, "new", first_second=2 * 86400 - 60))
    assert store_writer.retain() == 8 and (store_writer.retention.expired, store_writer.evicted) == (3, 5)
    assert stored_ids(store_writer.database) == [f"new{n}" for n in range(5, 10)]
