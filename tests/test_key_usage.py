"""Usage per API key, through real sockets and a real store: the dashboard's by-key table (the stats JSON and the
page), and the figures per key from each store."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import requests

from proxy_app.dashboard import keyusage
from proxy_app.dashboard.queries import parse_filters
from proxy_app.state import state_of
from tests.test_keys import CHAT, bearer, in_one_minute, make_key
from tests.test_queries import NOW, filled_store, known_calls
from tests.test_store import postgres_schema

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def chat(handle, secret: str | None = None, model: str = "llama3.2") -> int:
    headers = bearer(secret) if secret else {}
    answer = requests.post(f"{handle.url}/api/chat", json={**CHAT, "model": model}, headers=headers, timeout=10)
    return answer.status_code


def stored(app, recorder, count: int) -> list:
    """The first ``count`` finished calls, once the writer has stored them."""
    calls = recorder.wait_for(count)
    assert state_of(app).writer.flush(10)
    return calls


def totals(calls, key: str) -> dict:
    """What the by-key table and /analytics/me must show for ``key``'s calls ("" for anonymous)."""
    mine = [call for call in calls if call.key_name == key]
    return {"calls": len(mine), "errors": sum(call.outcome == "rejected" for call in mine),
            "input_tokens": sum(call.input_tokens or 0 for call in mine),
            "output_tokens": sum(call.output_tokens or 0 for call in mine)}  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request):
    """Settings for each store: PostgreSQL sums to Decimals, which the JSON must show as whole numbers."""
    if request.param == "sqlite":
        yield {}
        return
    with postgres_schema("test_key_usage") as url:
        yield {"DATABASE_URL": url}


# ---- the dashboard's by-key table --------------------------------------------------------------------------------


def test_dashboard_by_key_table_in_json_and_page(proxy_with, store):
    app, handle, recorder = proxy_with(**store)
    limited = make_key(app, "limited", rpm=20, tokens_per_day=50_000)  # under 32 a minute: leases of one request
    hostile = make_key(app, HOSTILE, models="llama3.2")
    in_one_minute()
    statuses = [chat(handle, limited), chat(handle, limited), chat(handle, hostile), chat(handle, hostile, "qwen3"),
                chat(handle)]  # fmt: skip
    assert statuses == [200, 200, 200, 403, 200]
    calls = stored(app, recorder, 5)
    figures = requests.get(f"{handle.url}/analytics/stats", timeout=10).json()
    rows = {row["key"]: row for row in figures["by_key"]}
    assert list(rows) == [HOSTILE, "limited", None]  # by calls, then name
    for key, row in rows.items():
        assert {name: row[name] for name in ("calls", "errors", "input_tokens", "output_tokens")} == totals(
            calls, key or "")  # fmt: skip
    assert rows[HOSTILE]["errors"] == 1 and rows[None]["limits"] is None and rows[HOSTILE]["limits"] is None
    spent = rows["limited"]["input_tokens"] + rows["limited"]["output_tokens"]
    assert {name: (spend["limit"], spend["used"]) for name, spend in rows["limited"]["limits"].items()} == {
        "rpm": (20, 2), "tokens_per_day": (50_000, spent)}  # fmt: skip
    only = requests.get(f"{handle.url}/analytics/stats", params={"key": "limited"}, timeout=10).json()
    assert [row["key"] for row in only["by_key"]] == ["limited"]
    html = requests.get(f"{handle.url}/analytics", headers=BROWSER, timeout=10).text
    table = re.search(r'<section class="panel" id="keys-table">(.*?)</section>', html, re.S)[1]
    assert '<span class="muted">(anonymous)</span>' in table and "<img" not in table
    assert f'<a href="/analytics?key=%3Cimg+src%3Dx+onerror%3Dalert%281%29%3E">{ESCAPED}</a>' in table
    assert "requests/min 2 / 20</span><br><span" in table and f"tokens/day {spent:,} / 50,000</span>" in table


# ---- the figures per key, from each store (SQLite rows, SQLite's read model, PostgreSQL) -------------------------


@pytest.fixture(scope="module", params=["sqlite", "sqlite+rollup", "postgresql"])
def read_store(request, tmp_path_factory):
    """known_calls() (alice r1 r3 r5, bob r2 r7, anonymous r4 r6), in each of the three ways the dashboard reads."""
    with filled_store(request.param, known_calls(), tmp_path_factory) as db:
        yield db


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, [(None, 2, 0, 100, 200), ("alice", 2, 1, 15, 20), ("bob", 2, 1, 30, 40)]),
        ({"since": "7d"}, [("alice", 3, 1, 22, 23), (None, 2, 0, 100, 200), ("bob", 2, 1, 30, 40)]),
        ({"since": "2025-04-30T11:55", "until": "2025-05-01T11:52"},  # edges inside 10-minute slots
         [("alice", 2, 1, 15, 20), (None, 1, 0, 100, 200), ("bob", 1, 0, 30, 40)]),
        ({"key": "alice"}, [("alice", 2, 1, 15, 20)]),
        ({"model": "llama3.2"}, [("alice", 1, 0, 10, 20), ("bob", 1, 0, 30, 40)]),
        ({"status": "5xx"}, [("alice", 1, 1, 5, 0), ("bob", 1, 1, 0, 0)]),
        ({"client": "10.0.0.1"}, [("alice", 2, 1, 15, 20)]),
        ({"instance": "gpu-b", "outcome": "completed"}, [(None, 1, 0, 100, 200), ("bob", 1, 0, 30, 40)]),
    ],
)  # fmt: skip
def test_key_usage_by_key_in_each_store(read_store, args, expected):
    rows = keyusage.by_key(read_store, parse_filters(args, now=NOW), None, now=NOW)
    figures = [(row["key"], row["calls"], row["errors"], row["input_tokens"], row["output_tokens"]) for row in rows]
    assert figures == expected
    assert all(row["limits"] is None for row in rows)


def test_key_usage_own_usage_counts_one_key_today_and_this_month(read_store):
    zero = {"calls": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
    alice = {"calls": 2, "errors": 1, "input_tokens": 15, "output_tokens": 20}  # r5, on April 30, is in neither
    assert keyusage.own_usage(read_store, "alice", NOW) == {
        "today": {"since": "2025-05-01T00:00:00.000Z", **alice}, "month": {"since": "2025-05-01T00:00:00.000Z", **alice}
    }  # fmt: skip
    later = keyusage.own_usage(read_store, "bob", NOW + timedelta(days=1))
    assert later == {"today": {"since": "2025-05-02T00:00:00.000Z", **zero},
                     "month": {"since": "2025-05-01T00:00:00.000Z", "calls": 2, "errors": 1, "input_tokens": 30,
                               "output_tokens": 40}}  # fmt: skip
    assert keyusage.own_usage(read_store, "nobody", NOW)["month"] == {"since": "2025-05-01T00:00:00.000Z", **zero}
