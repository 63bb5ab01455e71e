"""API key limits shared through the database: two proxy instances under gunicorn (2 workers each) on one PostgreSQL,
and gunicorn workers on one SQLite file, each a real subprocess in front of the fake Ollama.

A limit holds exactly here only because the counters are the database's (store/limits.py); nothing in these processes
talks to another. The limits' behaviour within one process (shapes, headers, recording) is tests/test_keys.py's.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from peewee import fn

from proxy_app.calls import COLUMNS
from proxy_app.store import counters
from proxy_app.store.keys import KeyChange, KeyTable
from proxy_app.store.models import CallRow, open_database
from tests.conftest import GunicornProxy, postgres_schema
from tests.fake_ollama import FakeOllama, serve
from tests.test_keys import CHAT, bearer, in_one_minute

RPM = 20  # small enough that every lease is one request (keystate.lease_size), so every grant is used at once
# Each test's key on the two instances, created before they start: a running process sees a new key only at its next
# read of the table (store/keys.py), and these tests need none to wait for.
SHARED_KEYS = {"rpm": KeyChange(rpm=RPM), "tokens": KeyChange(tokens_per_day=100), "streams": KeyChange(max_streams=2)}


@dataclass
class Shared:
    """Two proxy instances on one PostgreSQL schema, in front of one fake Ollama."""

    fake: FakeOllama
    url: str  # the database
    secrets: dict[str, str]  # SHARED_KEYS' name -> secret
    a: GunicornProxy
    b: GunicornProxy


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Started once for the module: each test has its own key (and a User-Agent of its own to find its stored calls)."""
    fake = FakeOllama()
    upstream = serve(fake)
    started: list[GunicornProxy] = []
    try:
        with postgres_schema("test_keys_shared") as url:
            secrets = {name: create_key(url, name, change) for name, change in SHARED_KEYS.items()}
            for name in ("a", "b"):
                env = {"OLLAMA_PROXY_UPSTREAM": upstream.url, "OLLAMA_PROXY_DATABASE_URL": url,
                       "OLLAMA_PROXY_DATA_DIR": str(tmp_path_factory.mktemp(f"instance-{name}")),
                       "OLLAMA_PROXY_INSTANCE": name}  # fmt: skip
                started.append(GunicornProxy(env, workers=2, threads=16))
            yield Shared(fake, url, secrets, *started)
            for proxy in started:  # before the schema is dropped: the workers hold connections to it
                proxy.stop()
    finally:
        for proxy in started:
            proxy.stop()
            proxy.log.close()
        upstream.close()


def create_key(url: str, name: str, change: KeyChange) -> str:
    """Store a key straight in the database (as the `keys` command does); return its secret."""
    db = open_database(url)
    try:
        counters.create_tables(db)
        return KeyTable(db).create(name, change)
    finally:
        db.close()


def burst(urls: list[str], secret: str, calls: int, agent: str, threads: int = 16) -> list[requests.Response]:
    """``calls`` non-streaming chats from ``threads`` threads at once, each on a new connection (so the workers of
    an instance share them), call i to ``urls[i % len(urls)]``."""

    def one(number: int) -> requests.Response:
        headers = {**bearer(secret), "User-Agent": agent}
        return requests.post(f"{urls[number % len(urls)]}/api/chat", json=CHAT, headers=headers, timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(calls)))


def stored_rows(url: str, agent: str, count: int, timeout: float = 15.0) -> dict[str, dict]:
    """The stored calls sent with User-Agent ``agent``, by request id, once ``count`` are there (each instance's
    writer stores them within moments)."""
    db = open_database(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            rows = list(CallRow.select().where(CallRow.user_agent == agent).dicts().execute(db))
            if len(rows) >= count or time.monotonic() > deadline:
                return {row["request_id"]: row for row in rows}
            time.sleep(0.1)
    finally:
        db.close()


def upstream_calls(fake: FakeOllama, agent: str) -> int:
    return sum(1 for seen in fake.seen if seen["headers"].get("User-Agent") == agent)


def assert_exactly_rpm_admitted(answers: list[requests.Response], rows: dict[str, dict]) -> None:
    """RPM answers are 200 and the rest 429 with Retry-After; each is stored as what it was."""
    statuses = [answer.status_code for answer in answers]
    assert (statuses.count(200), statuses.count(429)) == (RPM, len(answers) - RPM)
    assert len(rows) == len(answers)
    for answer in answers:
        row = rows[answer.headers["X-Request-ID"]]
        assert row["http_status"] == answer.status_code
        if answer.status_code == 429:
            assert 1 <= int(answer.headers["Retry-After"]) <= 60
            assert row["outcome"] == "rejected" and f"{RPM} requests per minute" in row["error_message"]
        else:
            assert row["outcome"] == "completed"
        if "key_name" in COLUMNS:
            assert row["key_name"] == "rpm"


def test_keys_shared_rpm_exact_across_two_instances_on_postgres(shared):
    secret = shared.secrets["rpm"]
    in_one_minute()
    answers = burst([shared.a.url, shared.b.url], secret, 3 * RPM, agent="keys-shared-rpm")
    assert upstream_calls(shared.fake, "keys-shared-rpm") == RPM
    assert_exactly_rpm_admitted(answers, stored_rows(shared.url, "keys-shared-rpm", 3 * RPM))


def test_keys_shared_rpm_exact_across_workers_on_sqlite(gunicorn_proxy, fake, tmp_path):
    url = f"sqlite:///{tmp_path / 'data' / 'ollama-proxy.db'}"  # the store gunicorn_proxy's DATA_DIR gives
    secret = create_key(url, "rpm", KeyChange(rpm=RPM))
    proxy = gunicorn_proxy(workers=3, threads=16)
    in_one_minute()
    answers = burst([proxy.url], secret, 3 * RPM, agent="keys-shared-sqlite")
    assert upstream_calls(fake, "keys-shared-sqlite") == RPM
    assert_exactly_rpm_admitted(answers, stored_rows(url, "keys-shared-sqlite", 3 * RPM))


def test_keys_shared_token_overshoot_is_one_call_when_calls_alternate_instances(shared):
    secret = shared.secrets["tokens"]
    per_call = shared.fake.expected_chat_prompt_tokens(CHAT["messages"]) + 10
    headers = {**bearer(secret), "X-Fake-Tokens": "10"}
    admitted, answer = 0, None
    for number in range(20):
        instance = (shared.a, shared.b)[number % 2]
        answer = requests.post(f"{instance.url}/api/chat", json=CHAT, headers=headers, timeout=10)
        if answer.status_code != 200:
            break
        admitted += 1
        assert charged_tokens(shared.url, "tokens", admitted * per_call) == admitted * per_call  # then the next
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 60  # until the next UTC day
    assert admitted == -(-100 // per_call) >= 2  # both instances admitted calls; the first over 100 was the last
    used = charged_tokens(shared.url, "tokens", admitted * per_call)
    assert 100 <= used < 100 + per_call  # overshot by less than the one call in flight
    for instance in (shared.a, shared.b):  # spent is spent, whichever instance is asked
        refused = requests.post(f"{instance.url}/api/chat", json=CHAT, headers=headers, timeout=10)
        assert refused.status_code == 429 and "100 tokens per day" in refused.json()["error"]


def charged_tokens(url: str, name: str, expected: int, timeout: float = 10.0) -> int:
    """Today's tokens charged to key ``name`` in the database, once they reach ``expected`` (or at the timeout): a
    call is charged as it is settled, just after its answer."""
    where = (counters.KeyUsage.key_name == name) & (counters.KeyUsage.period == counters.DAY)
    db = open_database(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            used = counters.KeyUsage.select(fn.COALESCE(fn.SUM(counters.KeyUsage.tokens), 0)).where(where).scalar(db)
            if used >= expected or time.monotonic() > deadline:
                return used
            time.sleep(0.02)
    finally:
        db.close()


def streams_in_flight(url: str, name: str) -> int:
    db = open_database(url)
    try:
        stream = counters.KeyStream
        return stream.select(fn.COALESCE(fn.SUM(stream.streams), 0)).where(stream.key_name == name).scalar(db)
    finally:
        db.close()


def test_keys_shared_streams_at_once_count_both_instances(shared):
    secret = shared.secrets["streams"]
    slow = {**bearer(secret), "X-Fake-Token-Delay": "0.5"}  # five tokens: about 2 s a stream
    body = {**CHAT, "stream": True}
    with requests.Session() as one, requests.Session() as two:
        first = one.post(f"{shared.a.url}/api/chat", json=body, headers=slow, stream=True, timeout=10)
        second = two.post(f"{shared.a.url}/api/chat", json=body, headers=slow, stream=True, timeout=10)
        assert (first.status_code, second.status_code) == (200, 200)
        third = requests.post(f"{shared.b.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10)
        assert third.status_code == 429 and "2 calls at once" in third.json()["error"]
        assert int(third.headers["Retry-After"]) >= 1
        assert b'"done":true' in first.content and b'"done":true' in second.content  # both streams end
    deadline = time.monotonic() + 10
    while streams_in_flight(shared.url, "streams"):  # each freed in the database as its call is settled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert requests.post(f"{shared.b.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10).status_code == 200
