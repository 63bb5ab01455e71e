"""Usage per API key, through real sockets and a real store: a key holder's own page (/analytics/me, JSON and the
browser form) and the dashboard's by-key table (the stats JSON and the page)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import requests

from proxy_app.apikeys import SECRET_PREFIX
from proxy_app.dashboard import keyusage
from proxy_app.dashboard.filters import parse_filters
from proxy_app.state import state_of
from proxy_app.store import writes
from proxy_app.store.keys import KeyTable
from tests.conftest import postgres_schema
from tests.test_csvlog import sample_call
from tests.test_keys import CHAT, bearer, in_one_minute, make_key
from tests.test_queries import NOW, filled_store, known_calls

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
ADMIN_TOKEN = "admin-s3cret"


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


def me(handle, **headers) -> requests.Response:
    return requests.get(f"{handle.url}/analytics/me", headers=headers, timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request):
    """Settings for each store: PostgreSQL sums to Decimals, which the JSON must show as whole numbers."""
    if request.param == "sqlite":
        yield {}
        return
    with postgres_schema("test_key_usage") as url:
        yield {"DATABASE_URL": url}


@pytest.fixture
def locked(proxy_with):
    """An app with ADMIN_TOKEN set (/analytics/me must not need it) on a real port."""
    return proxy_with(ADMIN_TOKEN=ADMIN_TOKEN)


# ---- /analytics/me -----------------------------------------------------------------------------------------------


def test_me_shows_only_the_keys_own_calls_and_tokens(locked):
    app, handle, recorder = locked
    alice, bob = make_key(app, "alice"), make_key(app, "bob")
    statuses = [chat(handle, alice), chat(handle, bob), chat(handle, bob), chat(handle), chat(handle, bob)]
    assert statuses == [200] * 5
    calls = stored(app, recorder, 5)
    now = datetime.now(UTC)  # and a big call of bob's last month: in neither window, and never alice's
    older = [sample_call(request_id="bob-old", timestamp=now - timedelta(days=now.day), key_name="bob",
                         input_tokens=900_000, output_tokens=90_000)]  # fmt: skip
    writes.insert_calls(state_of(app).dashboard["db"], older)
    mine = totals(calls, "alice")
    assert mine["calls"] == 1 and mine["input_tokens"] > 0
    answer = me(handle, **bearer(alice))
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    document = answer.json()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert document == {
        "name": "alice",
        "today": {"since": today.strftime("%Y-%m-%dT00:00:00.000Z"), **mine},
        "month": {"since": today.strftime("%Y-%m-01T00:00:00.000Z"), **mine},
        "limits": {},
        "models": [],
        "expires": None,
    }
    assert "bob" not in answer.text
    theirs = me(handle, **{"X-API-Key": bob}).json()
    assert theirs["today"] == {"since": document["today"]["since"], **totals(calls, "bob")}
    assert theirs["today"]["calls"] == 3 and theirs["month"]["calls"] == 3


def test_me_reports_each_limit_with_what_remains(proxy_with, store):
    app, handle, recorder = proxy_with(**store)
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    secret = make_key(app, "team", rpm=5, tokens_per_day=100_000, max_streams=2, models="llama3.2",
                      expires=expires)  # fmt: skip
    in_one_minute()
    assert [chat(handle, secret), chat(handle, secret), chat(handle, secret, "qwen3")] == [200, 200, 403]
    calls = stored(app, recorder, 3)
    spent = sum((call.input_tokens or 0) + (call.output_tokens or 0) for call in calls)
    document = me(handle, **bearer(secret)).json()
    assert document["today"] == {**document["today"], "calls": 3, "errors": 1}  # the 403 is a rejected call
    limits = document["limits"]
    assert list(limits) == ["rpm", "tokens_per_day", "max_streams"]
    assert {name: (spend["limit"], spend["used"], spend["remaining"]) for name, spend in limits.items()} == {
        "rpm": (5, 2, 3), "tokens_per_day": (100_000, spent, 100_000 - spent), "max_streams": (2, 0, 2)}  # fmt: skip
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00.000Z")
    assert limits["tokens_per_day"]["resets_at"] == tomorrow and limits["max_streams"]["resets_at"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00\.000Z", limits["rpm"]["resets_at"])
    assert document["models"] == ["llama3.2:latest"]
    assert document["expires"] == expires.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_me_needs_a_valid_key_and_nothing_else_will_do(locked):
    app, handle, recorder = locked
    good, revoked = make_key(app, "good"), make_key(app, "gone")
    expired = make_key(app, "old", expires=datetime.now(UTC) - timedelta(days=1))
    with state_of(app).keys.connection as db:
        KeyTable(db).revoke("gone")
    state_of(app).keys.ring.refresh()
    refused = {
        "no key": {},
        "admin token": bearer(ADMIN_TOKEN),
        "unknown": bearer(SECRET_PREFIX + "z" * 43),
        "revoked": bearer(revoked),
        "expired": {"X-API-Key": expired},
        "not ours": {"X-API-Key": "sk-something-else"},
    }
    for why, headers in refused.items():
        answer = me(handle, **headers)
        assert answer.status_code == 401, why
        assert answer.headers["Content-Type"] == "application/json" and "error" in answer.json(), why
        assert "today" not in answer.text, why
    in_url = requests.get(f"{handle.url}/analytics/me", params={"key": good}, timeout=10)
    assert in_url.status_code == 401  # a key in the URL is never read
    posted_json = requests.post(f"{handle.url}/analytics/me", data={"key": good}, timeout=10)
    assert posted_json.status_code == 200 and posted_json.json()["name"] == "good"
    assert me(handle, **bearer(good)).status_code == 200  # no admin token, no cookie
    for path in ("/analytics", "/analytics/stats"):  # a key is no admin token
        assert requests.get(handle.url + path, headers=bearer(good), timeout=10).status_code == 401


def test_me_browser_form_posts_the_key_and_renders_escaped_figures(proxy_with):
    app, handle, recorder = proxy_with()
    secret = make_key(app, HOSTILE, tokens_per_month=1_000_000)
    assert chat(handle, secret) == 200
    calls = stored(app, recorder, 1)
    form = requests.get(f"{handle.url}/analytics/me", headers=BROWSER, timeout=10)
    assert form.status_code == 200 and form.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="/analytics/me">' in form.text and 'name="key"' in form.text
    assert 'id="usage"' not in form.text
    wrong = requests.post(f"{handle.url}/analytics/me", data={"key": SECRET_PREFIX + "q" * 43}, headers=BROWSER,
                          timeout=10)  # fmt: skip
    assert wrong.status_code == 401 and "the API key is not valid" in wrong.text and 'id="usage"' not in wrong.text
    page = requests.post(f"{handle.url}/analytics/me", data={"key": secret}, headers=BROWSER, timeout=10)
    html = page.text
    assert page.status_code == 200 and f"<h2>Usage of the key {ESCAPED}</h2>" in html and "<img" not in html
    mine = totals(calls, HOSTILE)
    row = re.search(r'<tr id="today">(.*?)</tr>', html, re.S)[1]
    assert re.findall(r'<td class="num">([\d,]+)</td>', row) == [f"{mine[name]:,}" for name in mine]
    assert f'<td>tokens/month</td><td class="num">{mine["input_tokens"] + mine["output_tokens"]:,}</td>' in html
    assert secret not in html  # the key is never echoed back
    assert 'href="/analytics"' not in form.text + html  # a key holder has no dashboard to go to
    assert page.headers["Cache-Control"] == "no-store"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/analytics/static/dashboard.js" defer>']


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
