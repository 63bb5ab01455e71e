"""Model residency: the fake's changing /api/ps, the poller's events and gauges, cold_start, /analytics/models, and a
failing /api/ps that backs off without breaking calls."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import requests

from proxy_app.state import state_of
from proxy_app.store import models, schema
from proxy_app.store.models import CallRow, ModelEvent, open_database
from proxy_app.store.retention import Retention
from tests.conftest import postgres_schema
from tests.test_dashboard import model_table

LLAMA, QWEN = "llama3.2:latest", "qwen3:latest"
LLAMA_SIZE, QWEN_SIZE = 2019393189, 5225388164  # the fake's catalogue sizes


def events_of(app) -> list[tuple]:
    db = state_of(app).writer.database
    with db.connection_context():
        rows = ModelEvent.select().order_by(ModelEvent.id).execute(db)
        return [(row.event, row.model, row.size_bytes, row.vram_bytes, row.context_length, row.request_id)
                for row in rows]  # fmt: skip


def metric_lines(handle, prefix: str) -> list[str]:
    text = requests.get(handle.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith(prefix)]


def wait_until(predicate, timeout: float = 10.0):
    """Return the predicate's first true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_residency_fake_ps_follows_set_loaded(fake, upstream):
    def names():
        return [entry["name"] for entry in requests.get(upstream.url + "/api/ps", timeout=5).json()["models"]]

    assert names() == []
    fake.set_loaded("llama3.2", "qwen3")
    assert names() == [LLAMA, QWEN]
    fake.set_loaded("qwen3")
    assert names() == [QWEN]
    fake.ps_omit = ("context_length", "size_vram")
    [entry] = requests.get(upstream.url + "/api/ps", timeout=5).json()["models"]
    assert "context_length" not in entry and "size_vram" not in entry and entry["size"] == QWEN_SIZE
    fake.ps_fail_status = 500
    assert requests.get(upstream.url + "/api/ps", timeout=5).status_code == 500


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_residency_poller_records_loads_unloads_and_gauges(proxy_with, fake, backend):
    overrides = {"PS_INTERVAL": 0}  # no thread: the test polls
    if backend == "postgresql":
        schema = postgres_schema("test_residency")
        overrides["DATABASE_URL"] = schema.__enter__()
    try:
        app, handle, _ = proxy_with(**overrides)
        residency = state_of(app).residency
        fake.set_loaded("llama3.2")
        residency.poll()
        assert events_of(app) == [("load", LLAMA, LLAMA_SIZE, LLAMA_SIZE, 4096, None)]
        residency.poll()  # nothing changed: nothing recorded
        assert fake.ps_polls == 2 and not [entry for entry in fake.seen if entry["path"] == "/api/ps"]
        fake.set_loaded("qwen3")
        residency.poll()
        assert events_of(app)[1:] == [("unload", LLAMA, LLAMA_SIZE, LLAMA_SIZE, 4096, None),
                                      ("load", QWEN, QWEN_SIZE, QWEN_SIZE, 4096, None)]  # fmt: skip
        assert metric_lines(handle, "ollama_model_") == [
            f'ollama_model_loaded{{model="{LLAMA}"}} 0.0',
            f'ollama_model_loaded{{model="{QWEN}"}} 1.0',
            f'ollama_model_size_bytes{{model="{LLAMA}"}} 0.0',
            f'ollama_model_size_bytes{{model="{QWEN}"}} 5.225388164e+09',
            f'ollama_model_vram_bytes{{model="{LLAMA}"}} 0.0',
            f'ollama_model_vram_bytes{{model="{QWEN}"}} 5.225388164e+09',
            f'ollama_model_context_length{{model="{LLAMA}"}} 4096.0',
            f'ollama_model_context_length{{model="{QWEN}"}} 4096.0',
            f'ollama_model_loads_total{{model="{LLAMA}"}} 1.0',
            f'ollama_model_loads_total{{model="{QWEN}"}} 1.0',
        ]
        document = requests.get(handle.url + "/analytics/models", timeout=10).json()
        [loaded] = document["loaded"]
        assert {key: loaded[key] for key in ("event", "model", "size_bytes", "context_length")} == {
            "event": "load", "model": QWEN, "size_bytes": QWEN_SIZE, "context_length": 4096}  # fmt: skip
        assert [(event["event"], event["model"]) for event in document["events"]] == [
            ("load", LLAMA), ("unload", LLAMA), ("load", QWEN)]  # fmt: skip
        assert document["events"][0]["timestamp"].endswith("Z")
        # a restarted proxy (or another process taking over) reads the stored state and adds no duplicate
        again, _, _ = proxy_with(**{**overrides, "DATABASE_URL": app.config["DATABASE"]})
        state_of(again).residency.poll()
        assert len(events_of(app)) == 3 and state_of(again).residency.loaded.keys() == {QWEN}
    finally:
        if backend == "postgresql":
            schema.__exit__(None, None, None)


def test_residency_cold_call_marked_and_its_load_recorded(proxy_with, fake):
    app, handle, recorder = proxy_with(PS_INTERVAL=3600)  # only a cold call makes the poller read /api/ps
    residency = state_of(app).residency
    assert requests.get(handle.url + "/api/version", timeout=10).status_code == 200  # starts the poller
    assert residency._ticker.thread.is_alive() and residency.polled_at is None and fake.ps_polls == 0
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    cold = requests.post(handle.url + "/api/generate", json=body, headers={"X-Fake-Load-Delay": "0.3"}, timeout=10)
    warm = requests.post(handle.url + "/api/generate", json=body, timeout=10)
    assert cold.status_code == warm.status_code == 200
    recorder.wait_for(3)
    assert state_of(app).writer.flush(10)
    db = state_of(app).writer.database
    with db.connection_context():
        rows = {row.request_id: row.cold_start for row in CallRow.select().execute(db)}
    assert rows[cold.headers["X-Request-ID"]] is True and rows[warm.headers["X-Request-ID"]] is False
    wait_until(lambda: events_of(app))
    assert events_of(app) == [("load", LLAMA, LLAMA_SIZE, LLAMA_SIZE, 4096, cold.headers["X-Request-ID"])]
    assert metric_lines(handle, "ollama_model_load_seconds_count") == [
        'ollama_model_load_seconds_count{model="llama3.2"} 1.0'
    ]
    document = requests.get(handle.url + "/analytics/models", timeout=10).json()
    assert document["cold_starts"] == [{"model": "llama3.2", "cold_starts": 1, "load_duration_ms_p50": 300.0}]
    assert [(row["model"], row["request_id"]) for row in document["loaded"]] == [(LLAMA, cold.headers["X-Request-ID"])]
    page = requests.get(handle.url + "/analytics", timeout=10).text
    panel = page[page.index('id="loaded-now"') :]
    headers, rows = model_table(page)
    assert headers[-2:] == ["Cold starts", "Load p50"] and rows["llama3.2"][-2:] == ["1", "300 ms"]
    assert rows["llama3.2"][0] == "2" and rows["(none)"][-2:] == ["0", "–"]  # the warm call and /api/version
    assert f"<td>{LLAMA}</td>" in panel and panel.count(f"<title>{LLAMA}</title>") == 1  # its row and its lane
    timeline = panel[panel.index('id="chart-residency"') :]
    assert timeline.count("<circle") == 1 and f"<title>{LLAMA} loaded " in timeline


def test_residency_failing_ps_backs_off_and_calls_go_on(proxy_with, fake):
    app, handle, recorder = proxy_with(PS_INTERVAL=0)
    residency = state_of(app).residency
    fake.ps_fail_status = 500
    residency.poll()
    residency.poll()
    assert residency.failures == 2 and residency.error.startswith("HTTPError: 500")
    health = requests.get(handle.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["residency"]["error"].startswith("HTTPError: 500")
    fake.ps_fail_status, fake.ps_omit = None, ("size",)  # an Ollama whose /api/ps lacks what residency needs
    fake.set_loaded("llama3.2")
    residency.poll()
    assert residency.failures == 3 and "lacks its name or size" in residency.error
    answer = requests.post(handle.url + "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False},
                           timeout=10)  # fmt: skip
    assert answer.status_code == 200 and recorder.wait_for(1)[0].outcome == "completed"
    fake.ps_omit = ()
    residency.poll()
    assert (residency.failures, residency.error, list(residency.loaded)) == (0, None, [LLAMA])


def test_residency_poller_backoff_grows_and_is_capped(proxy_with, fake):
    app, _, _ = proxy_with(PS_INTERVAL=0)
    residency = state_of(app).residency
    residency.interval = 10
    fake.ps_fail_status = 503
    waits = []
    for _ in range(7):
        before = time.monotonic()
        residency.poll()
        waits.append(round(residency._due - before, -1))
    assert waits == [20, 40, 80, 160, 300, 300, 300]


def test_residency_events_deleted_with_the_calls_retention(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'calls.db'}")
    schema.create_tables(db)
    now = datetime.now(UTC)
    store = models.ModelEventStore(db)
    store.record([{"timestamp": now - timedelta(days=8), "event": "load", "model": LLAMA},
                  {"timestamp": now, "event": "load", "model": QWEN}])  # fmt: skip
    Retention(db, None, retention_days=7).run()
    assert [row.model for row in ModelEvent.select().execute(db)] == [QWEN]
    assert list(store.loaded()) == [QWEN]
    db.close()


def test_residency_under_gunicorn_one_worker_records(gunicorn_proxy, fake, tmp_path):
    fake.set_loaded("llama3.2")
    proxy = gunicorn_proxy(workers=3, OLLAMA_PROXY_PS_INTERVAL="0.1")  # every worker ticks; one polls and records
    for _ in range(30):  # calls reach every worker, each of which starts its poller
        assert requests.get(proxy.url + "/api/version", timeout=10).status_code == 200
    db = open_database(f"sqlite:///{tmp_path / 'data' / 'ollama-proxy.db'}")

    def stored() -> list[tuple]:
        with db.connection_context():
            return [(row.event, row.model) for row in ModelEvent.select().order_by(ModelEvent.id).execute(db)]

    wait_until(lambda: stored())
    fake.set_loaded("qwen3")
    wait_until(lambda: len(stored()) >= 3)
    for _ in range(10):  # more polls by whichever worker records: still no duplicates
        requests.get(proxy.url + "/api/version", timeout=10)
    time.sleep(0.5)  # several poll intervals: a second recording worker would add rows now
    assert stored() == [("load", LLAMA), ("unload", LLAMA), ("load", QWEN)]
    assert metric_lines(proxy, "ollama_model_loaded") == [
        f'ollama_model_loaded{{model="{LLAMA}"}} 0.0',
        f'ollama_model_loaded{{model="{QWEN}"}} 1.0',
    ]
    db.close()


def test_residency_models_json_keeps_to_the_range(app, client):
    now = datetime.now(UTC).replace(microsecond=0)
    hours = (30, 20, 10, 2)
    models.ModelEventStore(state_of(app).dashboard["db"]).record(
        [{"timestamp": now - timedelta(hours=h), "event": "load", "model": f"m{h}"} for h in hours]
    )
    since, until = (now - timedelta(hours=25)).isoformat(), (now - timedelta(hours=5)).isoformat()
    document = client.get("/analytics/models", query_string={"since": since, "until": until}).get_json()
    assert [event["model"] for event in document["events"]] == ["m20", "m10"]
    assert [row["model"] for row in document["loaded"]] == ["m10", "m2", "m20", "m30"]  # loaded now, whatever the range
    assert [event["model"] for event in client.get("/analytics/models?since=7d").get_json()["events"]] == [
        "m30", "m20", "m10", "m2"]  # fmt: skip
