"""The analytics store end to end: what each column means, through the fake Ollama and a live proxy, then the same
under gunicorn with SQLite (WAL) and PostgreSQL, SIGTERM under load, and a database that is locked or gone."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import openai
import psycopg2
import pytest
import requests
from peewee import CharField, DataError, PostgresqlDatabase
from playhouse.migrate import SchemaMigrator, migrate

from proxy_app.apikeys import Policy
from proxy_app.calls import COLUMNS
from proxy_app.ollama.intake import read_intake
from proxy_app.ollama.usage import Usage
from proxy_app.relay.inflight import CallInFlight
from proxy_app.relay.settle import settle
from proxy_app.state import state_of
from proxy_app.store import models, schema
from proxy_app.store.csvlog import CsvLog
from proxy_app.store.keys import KeyChange, KeyTable
from proxy_app.store.models import CallRow, SchemaVersion, open_database
from proxy_app.store.schema import create_tables
from proxy_app.store.writer import Writer
from proxy_app.store.writes import row_of
from tests.conftest import POSTGRES, CallRecorder, free_port, hold_write_lock, postgres_schema, release
from tests.fake_ollama import MODEL_ERROR
from tests.test_csvlog import sample_call

MESSAGES = [{"role": "user", "content": "why is the sky blue"}]


@pytest.fixture
def settings(settings) -> dict:
    """conftest's settings with the load sampled, as by default: these rows carry the CPU and memory figures."""
    return {**settings, "SAMPLE_INTERVAL": "5"}


def stored(app, recorder: CallRecorder, count: int) -> list[dict]:
    """The stored rows, oldest first, once ``count`` calls have finished and the writer has caught up."""
    recorder.wait_for(count)
    writer = state_of(app).writer
    assert writer.flush(10)
    return list(CallRow.select().order_by(CallRow.id).dicts().execute(writer.database))


def csv_rows(app) -> list[dict]:
    with open(app.config["CSV_FILE"], newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def post(url: str, path: str, document: dict, **headers) -> requests.Response:
    return requests.post(url + path, data=json.dumps(document), headers={"Content-Type": "application/json", **headers})


def test_store_native_stream_row(live_proxy, app, fake, recorder):
    fake.token_delay = 0.05
    document = {"model": "llama3.2", "prompt": "why is the sky blue", "options": {"temperature": 0.2},
                "keep_alive": "5m"}  # fmt: skip
    before = datetime.now(UTC)
    response = post(live_proxy.url, "/api/generate?verbose=1", document, **{"X-Session-ID": "alice-1",
                                                                           "User-Agent": "store-test/1"})  # fmt: skip
    after = datetime.now(UTC)
    [row] = stored(app, recorder, 1)
    assert before <= row["timestamp"] <= after and row["timestamp"].tzinfo == UTC
    assert row["request_id"] == response.headers["X-Request-ID"] and len(row["request_id"]) == 32
    assert (row["ip_source"], row["user_agent"], row["http_method"]) == ("127.0.0.1", "store-test/1", "POST")
    assert (row["endpoint"], row["session_id"], row["model"]) == ("/api/generate", "alice-1", "llama3.2")
    prompt_tokens = fake.expected_prompt_tokens("why is the sky blue")
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (prompt_tokens, 5, prompt_tokens + 5)
    assert json.loads(row["model_parameters"]) == {"keep_alive": "5m", "temperature": 0.2}
    assert row["stream_mode"] is True
    assert row["request_size_bytes"] == len(json.dumps(document))
    assert row["response_size_bytes"] == len(response.content)
    assert 0 <= row["queue_time_ms"] < 50
    assert 250 <= row["processing_time_ms"] <= row["total_time_ms"] < 2000  # 5 pauses of 50 ms between 6 lines
    assert 0 < row["ttft_ms"] < row["processing_time_ms"] - 150  # the first token came at once
    assert (row["http_status"], row["error_message"], row["outcome"]) == (200, None, "completed")
    assert 0 < row["system_load_memory"] < 100 and row["concurrent_requests"] == 1
    assert 0 <= row["system_load_cpu"] <= 100  # the first call of the process carries one too
    assert (row["eval_duration_ms"], row["tokens_per_second"], row["load_duration_ms"]) == (250.0, 20.0, 1.0)
    assert row["prompt_eval_duration_ms"] == prompt_tokens * 1.0 and row["done_reason"] == "stop"
    assert (row["api"], row["prompt"], row["response_preview"]) == ("native", "why is the sky blue", "The sky is blue.")


def test_store_native_and_openai_streamed_and_not(live_proxy, app, fake, recorder):
    post(live_proxy.url, "/api/chat", {"model": "llama3.2", "messages": MESSAGES, "stream": False})
    client = openai.OpenAI(base_url=live_proxy.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True))
    reply = client.chat.completions.create(model="llama3.2", messages=MESSAGES)
    client.embeddings.create(model="all-minilm", input=["one two", "three"])
    client.close()
    rows = {(row["endpoint"], row["stream_mode"]): row for row in stored(app, recorder, 4)}  # finish order varies
    chat, embeddings = rows["/api/chat", False], rows["/v1/embeddings", False]
    oai_stream, oai_plain = rows["/v1/chat/completions", True], rows["/v1/chat/completions", False]
    prompt_tokens = fake.expected_chat_prompt_tokens(MESSAGES)
    expected = {"input_tokens": prompt_tokens, "output_tokens": 5, "total_tokens": prompt_tokens + 5}
    for row in (chat, oai_stream, oai_plain):
        assert {name: row[name] for name in expected} == expected
        assert row["prompt"] == "why is the sky blue" and row["response_preview"] == "The sky is blue."
    assert (chat["endpoint"], chat["api"], chat["stream_mode"]) == ("/api/chat", "native", False)
    assert (oai_stream["endpoint"], oai_stream["api"], oai_stream["stream_mode"]) == ("/v1/chat/completions",
                                                                                     "openai", True)  # fmt: skip
    assert oai_stream["ttft_ms"] is not None and all(chunk.usage is None for chunk in chunks)  # none injected
    assert (oai_plain["stream_mode"], reply.usage.total_tokens) == (False, oai_plain["total_tokens"])
    assert embeddings["input_tokens"] == fake.expected_embed_tokens(["one two", "three"])
    assert (embeddings["output_tokens"], embeddings["endpoint"]) == (None, "/v1/embeddings")


def test_store_unknown_counts_are_null_and_empty_cells(live_proxy, app, recorder):
    post(live_proxy.url, "/api/embeddings", {"model": "all-minilm", "prompt": "hello"})
    requests.get(live_proxy.url + "/api/tags")
    rows = {row["endpoint"]: row for row in stored(app, recorder, 2)}
    for row in rows.values():
        assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (None, None, None)
        assert row["outcome"] == "completed" and row["http_status"] == 200
    tags = rows["/api/tags"]
    assert tags["model"] is None and tags["http_method"] == "GET" and tags["stream_mode"] is False
    for line in csv_rows(app):
        assert (line["input_tokens"], line["output_tokens"], line["total_tokens"]) == ("", "", "")


def test_store_errors_and_broken_streams(live_proxy, app, fake, recorder):
    generate = {"model": "llama3.2", "prompt": "x"}
    missing = post(live_proxy.url, "/api/generate", {"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    knobs = (("Error-After", "2"), ("Cut-After", "2"), ("Omit-Done", "1"))
    answers = [missing] + [post(live_proxy.url, "/api/generate", generate, **{f"X-Fake-{k}": v}) for k, v in knobs]
    rows = {row["request_id"]: row for row in stored(app, recorder, 4)}
    missing, error_line, cut, no_done = (rows[answer.headers["X-Request-ID"]] for answer in answers)
    assert (missing["http_status"], missing["outcome"], missing["model"]) == (404, "upstream_error", "nope")
    assert "not found" in missing["error_message"] and missing["input_tokens"] is None
    assert (error_line["http_status"], error_line["outcome"], error_line["error_message"]) == (
        200, "upstream_error", MODEL_ERROR)  # fmt: skip
    assert (cut["outcome"], cut["output_tokens"]) == ("upstream_error", None)
    assert cut["error_message"].startswith("upstream connection lost")
    assert (no_done["outcome"], no_done["output_tokens"], no_done["error_message"]) == ("incomplete", None, None)


def test_store_unreachable_upstream(proxy_with):
    app, proxy, recorder = proxy_with(UPSTREAM=f"http://127.0.0.1:{free_port()}")
    response = post(proxy.url, "/v1/chat/completions", {"model": "llama3.2", "messages": MESSAGES})
    [row] = stored(app, recorder, 1)
    assert (response.status_code, row["http_status"], row["outcome"], row["api"]) == (502, 502, "unreachable", "openai")
    assert row["error_message"].startswith("cannot reach the Ollama upstream")
    assert row["response_size_bytes"] == len(response.content) and row["input_tokens"] is None


def test_store_client_disconnect(live_proxy, app, fake, recorder):
    fake.tokens = ["tok"] * 200
    fake.token_delay = 0.02
    body = json.dumps({"model": "llama3.2", "prompt": "x"}).encode()
    with socket.create_connection(("127.0.0.1", live_proxy.port)) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        received = b""
        while received.count(b"\n") < 10:
            received += sock.recv(4096)
    [row] = stored(app, recorder, 1)
    assert (row["outcome"], row["http_status"], row["output_tokens"]) == ("client_gone", 200, None)
    assert 0 < row["response_size_bytes"] < 200 * 80 and row["total_time_ms"] < 200 * 20
    assert state_of(app).in_flight.count == 0


def test_store_queue_time_and_rejection(proxy_with, fake):
    fake.token_delay = 0.05
    generate = {"model": "llama3.2", "prompt": "x"}
    for timeout, second_status in ((5, 200), (0.1, 503)):
        app, proxy, recorder = proxy_with(MAX_CONCURRENT=1, QUEUE_TIMEOUT=timeout)
        first = threading.Thread(target=post, args=(proxy.url, "/api/generate", generate))
        seen = len(fake.seen)
        first.start()
        fake.wait_for(lambda seen=seen: len(fake.seen) > seen)  # the first call holds the only slot
        assert post(proxy.url, "/api/generate", generate).status_code == second_status
        first.join(5)
        rows = {row["queue_time_ms"] < 20: row for row in stored(app, recorder, 2)}
        holder, waiter = rows[True], rows[False]
        assert waiter["concurrent_requests"] == 2 and holder["concurrent_requests"] == 1
        assert waiter["total_time_ms"] >= waiter["queue_time_ms"]
        if second_status == 200:
            assert 100 <= waiter["queue_time_ms"] <= holder["total_time_ms"] + 50 and waiter["outcome"] == "completed"
        else:
            assert 100 <= waiter["queue_time_ms"] < 250
            assert (waiter["outcome"], waiter["http_status"]) == ("rejected", 503)
            assert "queue" in waiter["error_message"] and waiter["processing_time_ms"] < 5


def test_store_client_address_and_session(proxy_with):
    # Through the test client: waitress 3 itself strips X-Forwarded-For from peers it was not told to trust.
    for trusted, address in (("127.0.0.1/32", "203.0.113.9"), ("", "127.0.0.1")):
        app, _, recorder = proxy_with(TRUSTED_PROXIES=trusted)
        client = app.test_client()
        for session in ({}, {"X-Session-ID": "tab-7"}):
            headers = {"X-Forwarded-For": "203.0.113.9", **session}
            client.get("/api/version", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"}).close()
        rows = stored(app, recorder, 2)
        assert sorted((row["ip_source"], row["session_id"]) for row in rows) == [(address, address), (address, "tab-7")]


def test_store_capture_content_off_keeps_the_rest(proxy_with, fake):
    app, proxy, recorder = proxy_with(CAPTURE_CONTENT="false")
    post(proxy.url, "/api/chat", {"model": "llama3.2", "messages": MESSAGES})
    [row] = stored(app, recorder, 1)
    assert (row["prompt"], row["response_preview"]) == (None, None)
    assert (row["model"], row["output_tokens"], row["outcome"]) == ("llama3.2", 5, "completed")
    [line] = csv_rows(app)
    assert (line["prompt"], line["response_preview"], line["output_tokens"]) == ("", "", "5")


def settle_chat(app, request_id: str, key: Policy | None) -> None:
    """Settle a finished /api/chat call as the relay does, with the key the key check found (None: anonymous)."""
    body = json.dumps({"model": "llama3.2", "messages": MESSAGES}).encode()
    now = time.perf_counter()
    call = CallInFlight(
        arrived=now, timestamp=datetime.now(UTC), request_id=request_id, ip_source="192.0.2.7", user_agent="t/1",
        http_method="POST", endpoint="/api/chat", session_id="", request_size_bytes=len(body),
        concurrent_requests=state_of(app).in_flight.enter(), intake=read_intake("/api/chat", body), sent=now,
        http_status=200, ended=now, key=key,
    )  # fmt: skip
    usage = Usage(input_tokens=12, output_tokens=5, is_complete=True, response_preview="The sky is blue.")
    settle(app, call, usage, "completed", None)


def test_store_no_capture_key_and_attribution_in_row_mirror_and_export(proxy_with):
    app, _, recorder = proxy_with(CAPTURE_CONTENT="true", INSTANCE="edge-1")
    settle_chat(app, "kept-out", Policy(name="alice", capture=False))
    settle_chat(app, "keyed", Policy(name="bob"))
    settle_chat(app, "anonymous", None)
    rows = {row["request_id"]: row for row in stored(app, recorder, 3)}
    mirror = {line["request_id"]: line for line in csv_rows(app)}
    export = app.test_client().get("/analytics/export.csv?since=all")
    exported = {line["request_id"]: line for line in csv.DictReader(io.StringIO(export.text, newline=""))}
    upstream, order = app.config["UPSTREAM"], ("kept-out", "keyed", "anonymous")
    attribution = ("key_name", "instance", "upstream", "prompt", "response_preview")
    assert [[rows[name][column] for column in attribution] for name in order] == [
        ["alice", "edge-1", upstream, None, None],
        ["bob", "edge-1", upstream, "why is the sky blue", "The sky is blue."],
        ["", "edge-1", upstream, "why is the sky blue", "The sky is blue."],
    ]
    for lines in (mirror, exported):  # the CSV writes an unknown value as an empty cell
        assert [[lines[name][column] for column in attribution] for name in order] == [
            ["alice", "edge-1", upstream, "", ""],
            ["bob", "edge-1", upstream, "why is the sky blue", "The sky is blue."],
            ["", "edge-1", upstream, "why is the sky blue", "The sky is blue."],
        ]
    assert rows["kept-out"]["output_tokens"] == 5  # the rest of the call is kept


def test_store_relayed_calls_of_a_no_capture_key_carry_its_name_and_no_content(proxy_with):
    app, proxy, recorder = proxy_with(CAPTURE_CONTENT="true")
    with state_of(app).keys.connection as db:
        secret = KeyTable(db).create("alice", KeyChange(capture=False, models="llama3.2"))
    state_of(app).keys.ring.refresh()
    chat = {"model": "llama3.2", "messages": MESSAGES}
    assert post(proxy.url, "/api/chat", chat, Authorization=f"Bearer {secret}").status_code == 200
    assert post(proxy.url, "/api/chat", {**chat, "model": "qwen3"}, **{"X-API-Key": secret}).status_code == 403
    assert post(proxy.url, "/api/chat", chat).status_code == 200
    rows = stored(app, recorder, 3)
    assert [(row["key_name"], row["outcome"], row["prompt"], row["response_preview"] is None) for row in rows] == [
        ("alice", "completed", None, True),
        ("alice", "rejected", None, True),
        ("", "completed", "why is the sky blue", False),
    ]
    assert {row["upstream"] for row in rows} == {app.config["UPSTREAM"]}
    assert {row["instance"] for row in rows} == {socket.gethostname()}
    exposition = requests.get(proxy.url + "/metrics", timeout=10).text  # the key's name is a label, never the key
    assert 'key="alice",model="llama3.2",outcome="completed"' in exposition and secret not in exposition


def test_store_prompt_and_preview_cut_by_characters(live_proxy, app, fake, recorder):
    fake.tokens = ["é"] * 300
    post(live_proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "ü" * 1500})
    [row] = stored(app, recorder, 1)
    assert row["prompt"] == "ü" * 1000 and row["response_preview"] == "é" * 200


CSV_LITERAL = (
    ",".join(COLUMNS) + "\r\n"
    "<timestamp>,<request_id>,127.0.0.1,store-test/1,POST,/api/generate,s-9,llama3.2,15,5,20,"
    '"{""num_ctx"":4096}",false,107,<response_size_bytes>,<queue_time_ms>,<processing_time_ms>,<total_time_ms>,200,,'
    "<system_load_cpu>,<system_load_memory>,1,completed,<ttft_ms>,100.0,1.0,15.0,50.0,stop,native,"
    '"\'=why, is the ""sky"" blue",The sky is blue.,,,,false,,<instance>,<upstream>\r\n'
)
VOLATILE = ("timestamp", "request_id", "response_size_bytes", "queue_time_ms", "processing_time_ms", "total_time_ms",
            "system_load_cpu", "system_load_memory", "ttft_ms", "instance", "upstream")  # fmt: skip


def test_store_csv_whole_text_for_a_known_call(live_proxy, app, recorder):
    document = {"model": "llama3.2", "prompt": '=why, is the "sky" blue', "stream": False, "options": {"num_ctx": 4096}}
    response = post(live_proxy.url, "/api/generate", document, **{"X-Session-ID": "s-9", "User-Agent": "store-test/1"})
    [row] = stored(app, recorder, 1)
    with open(app.config["CSV_FILE"], newline="", encoding="utf-8") as handle:
        text = handle.read()
    header, line = list(csv.reader(io.StringIO(text, newline="")))
    assert line[COLUMNS.index("request_id")] == response.headers["X-Request-ID"]
    assert line[0].endswith("Z") and datetime.fromisoformat(line[0]) == row["timestamp"].replace(
        microsecond=row["timestamp"].microsecond // 1000 * 1000)  # fmt: skip
    assert line[COLUMNS.index("instance")] == socket.gethostname()  # the default INSTANCE
    assert line[COLUMNS.index("upstream")] == app.config["UPSTREAM"]
    for name in VOLATILE:
        line[COLUMNS.index(name)] = f"<{name}>"
    normalised = io.StringIO(newline="")
    csv.writer(normalised).writerows([header, line])
    assert normalised.getvalue() == CSV_LITERAL
    assert text.count("\r\n") == 2


# ---- machine load on every row ----------------------------------------------------------------------------------


def test_store_first_call_of_a_process_has_cpu_and_memory(proxy_with):
    app, proxy, recorder = proxy_with(SAMPLE_INTERVAL="60")  # the second sample comes a minute later
    assert requests.get(proxy.url + "/api/version", timeout=10).ok  # a call of a millisecond or two
    [row] = stored(app, recorder, 1)
    assert 0 <= row["system_load_cpu"] <= 100 and 0 < row["system_load_memory"] < 100


def test_store_every_row_has_cpu_and_memory_from_each_workers_first_call(gunicorn_proxy, tmp_path):
    proxy = gunicorn_proxy(workers=2, threads=8, OLLAMA_PROXY_SAMPLE_INTERVAL="60")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: post(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x",
                                                                           "stream": False}), range(40)))  # fmt: skip
    assert [answer.status_code for answer in answers] == [200] * 40
    assert proxy.stop() == 0
    db = open_database(f"sqlite:///{tmp_path / 'data' / 'ollama-proxy.db'}")
    loads = [(row.system_load_cpu, row.system_load_memory) for row in CallRow.select().execute(db)]
    db.close()
    assert len(loads) == 40 and all(0 <= cpu <= 100 and 0 < memory < 100 for cpu, memory in loads), loads


# ---- a database that is locked or gone ---------------------------------------------------------------------


def test_store_database_locked_for_10_s_fails_no_call_and_loses_no_row(proxy_with, tmp_path):
    path = tmp_path / "locked.db"
    app, proxy, recorder = proxy_with(DATABASE_URL=f"sqlite:///{path}?timeout=0.1")  # default WRITER_RETRY_SECONDS
    holder = hold_write_lock(path)
    locked_until = time.monotonic() + 10
    sent = 0
    while time.monotonic() < locked_until:
        response = post(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": f"locked {sent}"})
        assert response.status_code == 200 and response.elapsed.total_seconds() < 1  # the lock lasts 10 s
        sent += 1
        time.sleep(0.25)
    writer = state_of(app).writer
    assert writer.written == 0 and writer.dropped == 0 and writer.retries > 0  # held and tried again, not dropped
    assert requests.get(proxy.url + "/health").json()["writer"]["error"].endswith("database is locked")
    release(holder)
    recorder.wait_for(sent)
    assert writer.flush(10) and (writer.written, writer.dropped) == (sent, 0)
    assert len(stored(app, recorder, sent)) == sent and requests.get(proxy.url + "/health").status_code == 200


def test_store_locked_database_past_the_retry_window_drops_and_counts(proxy_with, tmp_path):
    path = tmp_path / "locked.db"
    app, proxy, recorder = proxy_with(DATABASE_URL=f"sqlite:///{path}?timeout=0.1", WRITER_RETRY_SECONDS="0")
    holder = hold_write_lock(path)
    for _ in range(5):
        response = post(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"})
        assert response.status_code == 200 and response.elapsed.total_seconds() < 1
    recorder.wait_for(5)
    writer = state_of(app).writer
    assert writer.flush(10)
    assert (writer.written, writer.dropped) == (0, 5)
    health = requests.get(proxy.url + "/health")
    assert health.status_code == 503 and health.json()["writer"]["ok"] is False
    release(holder)
    post(proxy.url, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    assert len(stored(app, recorder, 6)) == 1 and requests.get(proxy.url + "/health").status_code == 200


@pytest.mark.parametrize("gone", ["postgresql", "sqlite"])
def test_store_missing_database_never_fails_a_call(proxy_with, tmp_path, gone):
    if gone == "postgresql":
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    else:
        url = f"sqlite:///{tmp_path / 'gone' / 'x.db'}"
    app, proxy, recorder = proxy_with(DATABASE_URL=url, WRITER_RETRY_SECONDS="0.5")
    if gone == "sqlite":
        shutil.rmtree(tmp_path / "gone")
    for _ in range(3):
        assert post(proxy.url, "/api/chat", {"model": "llama3.2", "messages": MESSAGES}).status_code == 200
    recorder.wait_for(3)
    writer = state_of(app).writer
    assert writer.flush(10) and (writer.written, writer.dropped) == (0, 3)
    assert requests.get(proxy.url + "/health").json()["writer"]["error"]


# ---- many processes: gunicorn with SQLite and PostgreSQL, and SIGTERM under load ---------------------------


@pytest.fixture
def postgres_url():
    with postgres_schema("test_store") as url:
        yield url


def run_calls(url: str, total: int, clients: int) -> dict:
    """Make ``total`` calls from ``clients`` threads, mixing APIs and sizes; return request_id -> expected counts."""
    expected, failures, lock = {}, [], threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            for number in range(index, total, clients):
                try:
                    request_id, counts = one_call(session, url, number)
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    failures.append(repr(exc))
                    continue
                with lock:
                    expected[request_id] = counts

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]
    return expected


def one_call(session: requests.Session, url: str, number: int, **headers) -> tuple[str, tuple[int, int]]:
    """One call (OpenAI stream or native generate); return its id and the counts the fake sends."""
    tokens = 1 + number % 7
    headers["X-Fake-Tokens"] = str(tokens)
    words = " ".join(["word"] * (1 + number % 5))
    if number % 2:
        document = {"model": "llama3.2", "messages": [{"role": "user", "content": words}], "stream": True}
        response = session.post(url + "/v1/chat/completions", json=document, headers=headers)
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        response = session.post(url + "/api/generate", json={"model": "llama3.2", "prompt": words},
                                headers=headers)  # fmt: skip
        assert json.loads(response.text.splitlines()[-1])["done"] is True
    assert response.status_code == 200
    return response.headers["X-Request-ID"], (len(words.split()) + 10, tokens)  # the fake's prompt overhead is 10


def read_store(database_url: str, csv_path) -> tuple[dict, dict]:
    """Return request_id -> (input_tokens, output_tokens) from the database and from the CSV mirror."""
    db = open_database(database_url)
    rows = {row.request_id: (row.input_tokens, row.output_tokens) for row in CallRow.select().execute(db)}
    db.close()
    with open(csv_path, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == list(COLUMNS) and all(len(line) == len(COLUMNS) for line in lines)
    index = COLUMNS.index
    mirrored = {line[1]: (int(line[index("input_tokens")]), int(line[index("output_tokens")])) for line in lines[1:]}
    assert len(mirrored) == len(lines) - 1 == len(rows)  # no row twice, none missing from either
    return rows, mirrored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_2000_calls_through_gunicorn(gunicorn_proxy, tmp_path, request, backend):
    env = {}
    if backend == "postgresql":
        env["OLLAMA_PROXY_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    proxy = gunicorn_proxy(workers=4, threads=16, **env)
    expected = run_calls(proxy.url, total=2000, clients=64)
    assert len(expected) == 2000
    assert proxy.stop() == 0  # SIGTERM: each worker flushes its writer on the way out
    data = tmp_path / "data"
    url = env.get("OLLAMA_PROXY_DATABASE_URL", f"sqlite:///{data / 'ollama-proxy.db'}")
    rows, mirrored = read_store(url, data / "ollama-proxy.csv")
    assert rows == expected and mirrored == expected
    if backend == "sqlite":
        with sqlite3.connect(data / "ollama-proxy.db") as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_sigterm_under_load_loses_nothing_answered(gunicorn_proxy, tmp_path):
    proxy = gunicorn_proxy(workers=2, threads=8)
    answered, lock, busy, finished_at = {}, threading.Lock(), threading.Event(), []

    def client(index: int) -> None:
        with requests.Session() as session:
            for number in range(index, 10**6, 12):
                try:
                    request_id, counts = one_call(session, proxy.url, number, **{"X-Fake-Token-Delay": "0.03"})
                except (requests.RequestException, AssertionError, ValueError, KeyError):
                    return  # the server has gone: this call was not answered
                with lock:
                    answered[request_id] = counts
                    finished_at.append(time.monotonic())
                    if len(answered) >= 36:
                        busy.set()

    threads = [threading.Thread(target=client, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    assert busy.wait(30)  # every client has had calls answered and has one in flight
    signalled = time.monotonic()
    assert proxy.stop() == 0
    for thread in threads:
        thread.join(30)
    data = tmp_path / "data"
    rows, mirrored = read_store(f"sqlite:///{data / 'ollama-proxy.db'}", data / "ollama-proxy.csv")
    assert {request_id: rows.get(request_id) for request_id in answered} == answered
    assert any(moment > signalled for moment in finished_at)  # calls in flight at SIGTERM were answered, and kept
    assert mirrored == rows


def test_store_postgres_restart_between_batches_costs_no_rows(postgres_url, tmp_path):
    name = f"store-test-{uuid.uuid4().hex[:8]}"
    db = open_database(f"{postgres_url}&application_name={name}")
    create_tables(db)
    db.close()  # as init_app does: from here on only the writer thread holds a connection
    writer = Writer(db, CsvLog(tmp_path / "calls.csv"), 100)
    writer.submit(sample_call(request_id="before"))
    assert writer.flush(5)
    with contextlib.closing(psycopg2.connect(POSTGRES)) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,))
        assert cursor.fetchone()[0] is True  # the writer's connection is gone, as after a server restart
    writer.submit(sample_call(request_id="after"))
    assert writer.flush(5) and (writer.written, writer.dropped) == (2, 0)
    writer.close()
    assert sorted(row.request_id for row in CallRow.select().execute(db)) == ["after", "before"]
    db.close()


# ---- older schemas, migrated in place ---------------------------------------------------------------------------

ADDED_IN = {2: ("cached_input_tokens", "remote_model", "remote_host"), 3: ("cold_start",),
            4: ("key_name", "instance", "upstream")}  # fmt: skip
INDEXED_IN_4 = ("callrow_key_name_timestamp", "callrow_instance_timestamp")


def columns_at(version: int) -> tuple[str, ...]:
    """The columns of the calls table at schema ``version``, in order."""
    added = {name for later, names in ADDED_IN.items() if later > version for name in names}
    return tuple(name for name in COLUMNS if name not in added)


def make_old_store(db, version: int) -> None:
    """Give ``db`` the tables as schema ``version`` made them: without the later columns and their indexes, and below
    version 2 with ``api`` a VARCHAR(8)."""
    create_tables(db)
    migrator = SchemaMigrator.from_database(db)
    operations = [migrator.drop_index("calls", name) for name in INDEXED_IN_4] if version < 4 else []
    operations += [migrator.drop_column("calls", name) for name in COLUMNS if name not in columns_at(version)]
    if isinstance(db, PostgresqlDatabase) and version < 2:
        operations.append(migrator.alter_column_type("calls", "api", CharField(max_length=8)))
    with db.atomic():
        migrate(*operations)
        SchemaVersion.update(version=version).execute(db)
    assert [column.name for column in db.get_columns("calls")] == ["id", *columns_at(version)]


def insert_old_row(db, call, version: int) -> None:
    """Insert a row as a proxy at schema ``version`` did: that version's columns of the call only."""
    columns = columns_at(version)
    names, marks = ", ".join(f'"{name}"' for name in columns), ", ".join([db.param] * len(columns))
    with db.atomic():
        db.execute_sql(f'INSERT INTO "calls" ({names}) VALUES ({marks})', row_of(call)[: len(columns)])


def test_store_create_tables_whatever_database_the_read_side_has(tmp_path, monkeypatch):
    monkeypatch.setattr(models.database, "obj", PostgresqlDatabase("unused"))  # as a PostgreSQL app leaves it
    db = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    assert create_tables(db) == schema.SCHEMA_VERSION  # not RETURNING on SQLite for PostgreSQL's sake
    assert [row.version for row in SchemaVersion.select().execute(db)] == [schema.SCHEMA_VERSION]
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_version_1_database_migrated_in_place_at_start(proxy_with, tmp_path, request, backend):
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'v1.db'}"
    db = open_database(url)
    make_old_store(db, 1)
    insert_old_row(db, sample_call(request_id="kept", api="openai", timestamp=datetime.now(UTC)), 1)  # not expired
    if backend == "postgresql":  # what version 2 widens: a VARCHAR(8) refuses "anthropic"
        with pytest.raises(DataError, match="character varying\\(8\\)"), db.atomic():
            insert_old_row(db, sample_call(request_id="refused", api="anthropic"), 1)
    db.close()
    app, proxy, recorder = proxy_with(DATABASE_URL=url)  # start-up migrates
    answer = post(proxy.url, "/v1/messages", {"model": "llama3.2", "max_tokens": 64, "messages": MESSAGES},
                  **{"X-Fake-Cached-Tokens": "4"})  # fmt: skip
    assert answer.status_code == 200
    old, new = stored(app, recorder, 1)
    assert (old["request_id"], old["api"], old["input_tokens"]) == ("kept", "openai", 12)
    assert [old[name] for name in ADDED_IN[2] + ADDED_IN[3]] == [None, None, None, None]
    assert [old[name] for name in ADDED_IN[4]] == ["", "", ""]
    assert (new["api"], new["input_tokens"], new["cached_input_tokens"]) == ("anthropic", 15, 4)
    db = open_database(url)
    assert [column.name for column in db.get_columns("calls")] == ["id", *COLUMNS]
    assert [row.version for row in SchemaVersion.select().execute(db)] == [schema.SCHEMA_VERSION]
    db.close()


def calls_schema(db) -> tuple[list, set]:
    """The calls table's columns (name, type, null, default) and indexes (name, columns, unique), to compare; not the
    index the dashboard's read model adds on SQLite when an app starts (dashboard/readmodel.py)."""
    from proxy_app.dashboard.readmodel import COLD_INDEX

    columns = [(column.name, column.data_type, column.null, column.default) for column in db.get_columns("calls")]
    indexes = {(index.name, tuple(index.columns), index.unique) for index in db.get_indexes("calls")}
    return columns, {index for index in indexes if index[0] != COLD_INDEX}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_store_version_3_database_gets_key_instance_and_upstream_keeping_rows(proxy_with, tmp_path, request, backend):
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            url, fresh_url = (stack.enter_context(postgres_schema(f"test_store_{name}")) for name in ("v3", "v4"))
        else:
            url, fresh_url = f"sqlite:///{tmp_path / 'v3.db'}", f"sqlite:///{tmp_path / 'v4.db'}"
        db = open_database(url)
        make_old_store(db, 3)
        insert_old_row(db, sample_call(request_id="kept", timestamp=datetime.now(UTC)), 3)
        db.close()
        app, proxy, recorder = proxy_with(DATABASE_URL=url, INSTANCE="edge-1")  # start-up migrates
        assert post(proxy.url, "/api/chat", {"model": "llama3.2", "messages": MESSAGES}).status_code == 200
        old, new = stored(app, recorder, 1)
        assert (old["request_id"], old["input_tokens"], old["cold_start"]) == ("kept", 12, False)
        assert [old[name] for name in ADDED_IN[4]] == ["", "", ""]  # what rows stored before the columns hold
        assert (new["key_name"], new["instance"], new["upstream"]) == ("", "edge-1", app.config["UPSTREAM"])
        db, fresh = open_database(url), open_database(fresh_url)
        stack.callback(db.close)
        stack.callback(fresh.close)
        create_tables(fresh)
        assert [row.version for row in SchemaVersion.select().execute(db)] == [schema.SCHEMA_VERSION]
        assert calls_schema(db) == calls_schema(fresh)  # migrated is what a new store gets, indexes included
        assert {name for name, *_ in calls_schema(db)[1]} >= set(INDEXED_IN_4)


def test_store_postgres_keeps_token_counts_past_32_bits(postgres_url, tmp_path):
    """An answer may claim more tokens than a 32-bit column holds; the row is kept whole, not refused."""
    db = open_database(postgres_url)
    create_tables(db)
    db.close()
    writer = Writer(db, CsvLog(tmp_path / "calls.csv"), 100)
    many = 3_000_000_000
    writer.submit(sample_call(request_id="big", input_tokens=many, output_tokens=many, total_tokens=2 * many,
                              cached_input_tokens=many))  # fmt: skip
    assert writer.flush(5) and (writer.written, writer.dropped) == (1, 0)
    writer.close()
    (row,) = CallRow.select().execute(db)
    assert (row.input_tokens, row.total_tokens, row.cached_input_tokens) == (many, 2 * many, many)
