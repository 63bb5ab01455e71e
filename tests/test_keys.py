"""API keys on the relay: who a call is from, what it may do, and its limits, through real sockets and a real store.

The limits' exactness across processes and instances is tests/test_keys_shared.py's.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_app.apikeys import SECRET_PREFIX, Policy
from proxy_app.state import state_of
from proxy_app.store import counters, keystate, limits
from proxy_app.store.keys import KeyChange, KeyRing, KeyTable

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def make_key(app, name: str = "team", **limits_) -> str:
    """Create a key in the app's store and make the app see it at once; return its secret."""
    keys = state_of(app).keys
    with keys.connection as db:
        secret = KeyTable(db).create(name, KeyChange(**limits_))
    keys.ring.refresh()
    return secret


def in_one_minute() -> None:
    """Wait, if needed, so that a test counting one minute's requests runs inside one minute (windows are UTC)."""
    if time.time() % 60 > 40:
        time.sleep(60.5 - time.time() % 60)


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keyed(proxy_with):
    """An app on a real port with its recorder; keys are created with make_key."""
    app, handle, recorder = proxy_with()
    return app, handle, recorder


def test_keys_no_key_stored_leaves_every_authorization_untouched(keyed, fake):
    app, handle, recorder = keyed
    made_up = SECRET_PREFIX + "x" * 43
    answer = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(made_up), timeout=10)
    assert answer.status_code == 200
    assert fake.seen[-1]["headers"]["Authorization"] == f"Bearer {made_up}"


def test_keys_proxy_key_is_removed_and_other_authorization_passes(keyed, fake):
    app, handle, recorder = keyed
    secret = make_key(app)
    answer = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10)
    assert answer.status_code == 200
    assert "Authorization" not in fake.seen[-1]["headers"]
    answer = requests.post(f"{handle.url}/v1/messages", json={**CHAT, "max_tokens": 5}, timeout=10,
                           headers={"X-API-Key": secret, "Authorization": "Bearer cloud-key"})  # fmt: skip
    assert answer.status_code == 200
    assert fake.seen[-1]["headers"]["Authorization"] == "Bearer cloud-key"
    assert "X-Api-Key" not in fake.seen[-1]["headers"]
    cloud = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer("cloud-key"), timeout=10)
    assert cloud.status_code == 200  # not ours, and keys are not required: anonymous
    assert fake.seen[-1]["headers"]["Authorization"] == "Bearer cloud-key"


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/api/chat", CHAT, lambda doc: doc["error"]),
        ("/v1/chat/completions", CHAT, lambda doc: doc["error"]["message"]),
        ("/v1/messages", {**CHAT, "max_tokens": 5}, lambda doc: doc["type"] == "error" and doc["error"]["message"]),
    ],
)
def test_keys_required_refuses_a_call_without_one_in_its_api_shape(proxy_with, fake, path, body, shape):
    app, handle, recorder = proxy_with(REQUIRE_KEY=True)
    answer = requests.post(f"{handle.url}{path}", json=body, timeout=10)
    assert answer.status_code == 401
    assert "API key" in shape(answer.json())
    assert fake.seen == []
    (call,) = recorder.wait_for(1)
    assert (call.outcome, call.http_status, call.endpoint) == ("rejected", 401, path)
    secret = make_key(app)
    assert requests.post(f"{handle.url}{path}", json=body, headers=bearer(secret), timeout=10).status_code == 200


def test_keys_revoked_expired_or_unknown_key_is_refused_even_when_not_required(keyed, fake):
    app, handle, recorder = keyed
    revoked, expired = make_key(app, "gone"), make_key(app, "old", expires=datetime.now(UTC) - timedelta(days=1))
    with state_of(app).keys.connection as db:
        KeyTable(db).revoke("gone")
    state_of(app).keys.ring.refresh()
    for secret, words in ((revoked, "revoked"), (expired, "expired"), (SECRET_PREFIX + "y" * 43, "not valid")):
        answer = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10)
        assert answer.status_code == 401 and words in answer.json()["error"]
    assert fake.seen == []
    calls = recorder.wait_for(3)
    assert [(call.outcome, call.key_name) for call in calls] == [
        ("rejected", "gone"),
        ("rejected", "old"),
        ("rejected", ""),
    ]
    with state_of(app).keys.connection as db, pytest.raises(ValueError, match="reserved"):
        KeyTable(db).create("None", KeyChange())


def test_keys_model_list_and_model_use_follow_the_key(keyed, fake):
    app, handle, recorder = keyed
    secret = make_key(app, models="llama3.2,all-minilm:latest")
    tags = requests.get(f"{handle.url}/api/tags", headers=bearer(secret), timeout=10)
    assert tags.status_code == 200
    assert sorted(model["name"] for model in tags.json()["models"]) == ["all-minilm:latest", "llama3.2:latest"]
    assert int(tags.headers["Content-Length"]) == len(tags.content)
    listed = requests.get(f"{handle.url}/v1/models", headers=bearer(secret), timeout=10).json()
    assert sorted(model["id"] for model in listed["data"]) == ["all-minilm:latest", "llama3.2:latest"]
    everything = requests.get(f"{handle.url}/api/tags", timeout=10).json()  # anonymous: the whole list
    assert len(everything["models"]) > 2
    fake.set_loaded("llama3.2", "qwen3")  # what is loaded, too, is shown only for the key's models
    loaded = requests.get(f"{handle.url}/api/ps", headers=bearer(secret), timeout=10).json()
    assert [model["name"] for model in loaded["models"]] == ["llama3.2:latest"]
    assert len(requests.get(f"{handle.url}/api/ps", timeout=10).json()["models"]) == 2
    other = {**CHAT, "model": "qwen3"}
    refused = requests.post(f"{handle.url}/api/chat", json=other, headers=bearer(secret), timeout=10)
    assert refused.status_code == 403 and "qwen3" in refused.json()["error"]
    assert not any(seen["path"] == "/api/chat" for seen in fake.seen)
    assert requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10).status_code == 200


def test_keys_copy_and_create_name_only_models_the_key_may_use(keyed, fake):
    """/api/copy and /api/create name two models (api/types.go: CopyRequest's source and destination,
    CreateRequest's model and from): a key restricted to some may neither overwrite another model by copying one of
    its own onto its name, nor reach another model through one of its own names created from it."""
    app, handle, recorder = keyed
    secret = make_key(app, models="llama3.2,mine", manage=True)
    onto_other = {"source": "llama3.2", "destination": "qwen3"}
    refused = requests.post(f"{handle.url}/api/copy", json=onto_other, headers=bearer(secret), timeout=10)
    assert refused.status_code == 403
    assert refused.json() == {"error": "the API key 'team' may not use the model 'qwen3'"}
    assert not any(seen["path"] == "/api/copy" for seen in fake.seen)
    onto_own = {"source": "llama3.2", "destination": "mine"}
    assert requests.post(f"{handle.url}/api/copy", json=onto_own, headers=bearer(secret), timeout=10).status_code == 200
    from_other = {"model": "mine", "from": "qwen3", "stream": False}
    refused = requests.post(f"{handle.url}/api/create", json=from_other, headers=bearer(secret), timeout=10)
    assert refused.status_code == 403 and "'qwen3'" in refused.json()["error"]
    assert not any(seen["path"] == "/api/create" for seen in fake.seen)
    calls = recorder.wait_for(3)
    assert sorted((call.http_status, call.outcome) for call in calls) == [
        (200, "completed"), (403, "rejected"), (403, "rejected")
    ]  # fmt: skip


def test_keys_manage_the_models_the_key_may_use_and_no_other(keyed, fake):
    """Management calls name their model as any call does (api/types.go DeleteRequest, PullRequest): a key allowed
    to manage (--manage) may delete or pull a model it may use, and gets 403 for any other."""
    app, handle, recorder = keyed
    secret = make_key(app, models="llama3.2", manage=True)
    other = requests.delete(f"{handle.url}/api/delete", json={"model": "qwen3"}, headers=bearer(secret), timeout=10)
    assert other.status_code == 403 and "'qwen3'" in other.json()["error"]
    pull = {"model": "llama3.2", "stream": False}
    assert requests.post(f"{handle.url}/api/pull", json=pull, headers=bearer(secret), timeout=10).status_code == 200
    own = requests.delete(f"{handle.url}/api/delete", json={"model": "llama3.2"}, headers=bearer(secret), timeout=10)
    assert own.status_code == 200
    assert [seen["path"] for seen in fake.seen] == ["/api/pull", "/api/delete"]
    assert sorted(call.outcome for call in recorder.wait_for(3)) == ["completed", "completed", "rejected"]


MANAGEMENT_CALLS = [  # every management route of server/routes.go, with a body its handler would take
    ("POST", "/api/pull", {"model": "llama3.2", "stream": False}),
    ("POST", "/api/push", {"model": "llama3.2", "stream": False}),
    ("POST", "/api/create", {"model": "llama3.2", "from": "llama3.2", "stream": False}),
    ("POST", "/api/copy", {"source": "llama3.2", "destination": "llama3.2"}),
    ("DELETE", "/api/delete", {"model": "llama3.2"}),
    ("POST", "/api/blobs/sha256:" + "0" * 64, None),
    ("POST", "/api/signout", None),
    ("DELETE", "/api/user/keys/a2V5", None),
]


@pytest.mark.parametrize("models", ["", "llama3.2"], ids=["every-model", "one-model"])
def test_keys_may_not_manage_models_unless_created_to(keyed, fake, models):
    """A key without --manage, even one allowed every model, may neither pull, push, create, copy nor delete models,
    nor sign the server out of ollama.com: those change what every caller has. Each gets 403 in Ollama's shape before
    reaching it and is recorded as rejected; the key's other calls go on."""
    app, handle, recorder = keyed
    secret = make_key(app, models=models)
    for method, path, body in MANAGEMENT_CALLS:
        refused = requests.request(method, handle.url + path, json=body, headers=bearer(secret), timeout=10)
        assert refused.status_code == 403, path
        assert refused.json() == {
            "error": "the API key 'team' may not manage models (pull, push, create, copy, "
            "delete) or the server's sign-in; `keys update --manage` allows it"
        }
    head = requests.head(f"{handle.url}/api/blobs/sha256:{'0' * 64}", headers=bearer(secret), timeout=10)
    assert head.status_code == 403
    assert fake.seen == []
    assert requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10).status_code == 200
    calls = recorder.wait_for(len(MANAGEMENT_CALLS) + 2)
    assert sorted(call.outcome for call in calls) == ["completed"] + ["rejected"] * (len(MANAGEMENT_CALLS) + 1)
    assert {call.key_name for call in calls} == {"team"}


def test_keys_with_manage_reach_every_management_route(keyed, fake):
    """--manage lets the same calls through to Ollama, unchanged."""
    app, handle, _recorder = keyed
    secret = make_key(app, manage=True)
    for method, path, body in MANAGEMENT_CALLS:
        answer = requests.request(method, handle.url + path, json=body, headers=bearer(secret), timeout=10)
        assert answer.status_code != 403, path
    assert [seen["path"] for seen in fake.seen] == [path for _, path, _ in MANAGEMENT_CALLS]


def test_keys_requests_per_minute_refuses_past_the_limit_with_retry_after(keyed, fake):
    app, handle, recorder = keyed
    secret = make_key(app, rpm=3)
    in_one_minute()
    statuses = [
        requests.post(f"{handle.url}/v1/chat/completions", json=CHAT, headers=bearer(secret), timeout=10)
        for _ in range(5)
    ]
    assert [answer.status_code for answer in statuses] == [200, 200, 200, 429, 429]
    refused = statuses[3]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "api_error" and "3 requests per minute" in error["message"]
    assert len([seen for seen in fake.seen if seen["path"] == "/v1/chat/completions"]) == 3
    calls = recorder.wait_for(5)
    assert [call.outcome for call in calls].count("rejected") == 2


def test_keys_token_limit_is_overshot_by_at_most_the_calls_in_flight(keyed, fake):
    app, handle, recorder = keyed
    fake.tokens = ["w "] * 10  # ten output tokens a call, plus the prompt's
    secret = make_key(app, tokens_per_day=100)
    per_call = fake.expected_chat_prompt_tokens(CHAT["messages"]) + 10
    admitted = 0
    for _ in range(40):
        answer = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10)
        if answer.status_code == 429:
            break
        admitted += 1
        recorder.wait_for(admitted)  # settled, so charged: the next call sees it
    assert admitted == -(-100 // per_call)  # sequential: one call in flight, so it stops at the first over 100
    usage = state_of(app).keys.limiter.usage(state_of(app).keys.ring.by_name("team"))["tokens_per_day"]
    assert usage["used"] == admitted * per_call
    assert usage["used"] - 100 < per_call  # the overshoot is within the one call in flight


def test_keys_concurrent_calls_past_a_token_limit_are_bounded_by_those_in_flight(keyed, fake):
    app, handle, recorder = keyed
    fake.tokens, fake.token_delay = ["w "] * 5, 0.05
    secret = make_key(app, tokens_per_day=30)
    per_call = fake.expected_chat_prompt_tokens(CHAT["messages"]) + 5
    results, start = [], threading.Barrier(8)

    def one() -> None:
        start.wait()
        answer = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=30)
        results.append(answer.status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    recorder.wait_for(8)  # every call settled: charged
    used = state_of(app).keys.limiter.usage(state_of(app).keys.ring.by_name("team"))["tokens_per_day"]["used"]
    admitted = results.count(200)
    assert admitted + results.count(429) == 8
    assert used == admitted * per_call
    assert used - 30 < 8 * per_call  # never more than the calls that were in flight together
    after = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10)
    assert after.status_code == 429 and int(after.headers["Retry-After"]) > 60  # until the next UTC day


def test_keys_streams_at_once_are_limited_and_freed(keyed, fake):
    app, handle, recorder = keyed
    secret = make_key(app, max_streams=2)
    fake.token_delay = 0.2
    body = {**CHAT, "stream": True}
    with requests.Session() as one, requests.Session() as two:
        first = one.post(f"{handle.url}/api/chat", json=body, headers=bearer(secret), stream=True, timeout=10)
        second = two.post(f"{handle.url}/api/chat", json=body, headers=bearer(secret), stream=True, timeout=10)
        third = requests.post(f"{handle.url}/api/chat", json=body, headers=bearer(secret), timeout=10)
        assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
        first.content, second.content  # noqa: B018 - read to the end: both calls end
    fake.token_delay = 0.0
    recorder.wait_for(3)
    deadline = time.monotonic() + 5
    while state_of(app).keys.limiter.usage(state_of(app).keys.ring.by_name("team"))["max_streams"]["used"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(secret), timeout=10).status_code == 200


def test_keys_request_leases_never_grant_past_the_limit_across_limiters(tmp_path):
    """Four limiters (four processes' worth, each with its own connection) on one SQLite file, 16 threads."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    connection = counters.OneConnection(url)
    with connection as db:
        counters.create_tables(db)
        KeyTable(db).create("shared", KeyChange(rpm=250))
    policy = KeyRing(connection)
    policy.refresh()
    shared = policy.by_name("shared")
    limiters = [limits.Limiter(counters.OneConnection(url), f"instance{n}") for n in range(4)]
    admitted, lock = [], threading.Lock()
    in_one_minute()

    def take(limiter) -> None:
        for _ in range(100):
            if limiter.admit(shared) is None:
                with lock:
                    admitted.append(1)

    threads = [threading.Thread(target=take, args=(limiters[n % 4],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(admitted) == 250  # every limiter kept asking, so no lease was left unused


def test_keys_windows_are_kept_until_the_first_one_ends_or_the_limits_change():
    state, policy = keystate.KeyState(), Policy("team", tpm=100, tokens_per_day=1000, tokens_per_month=10_000)
    month = counters.window_start(counters.MONTH, time.time())
    now = counters.window_start(counters.MINUTE, month + 45 * 86400 + 3600)  # a minute in the middle of a month
    kept = keystate.current_windows(state, policy, now + 1)
    assert kept == keystate.windows(policy, now + 1)
    assert keystate.current_windows(state, policy, now + 59.9) is kept  # the same minute: the same windows
    for later in (now + 60, now + 86400, now - 0.1):  # the next minute, the next day, a clock set back
        assert keystate.current_windows(state, policy, later) == keystate.windows(policy, later) != kept
    changed = Policy("team", tpm=100)
    assert keystate.current_windows(state, changed, now - 0.1) == keystate.windows(changed, now - 0.1)


@settings(max_examples=60, deadline=None, database=None)
@given(steps=st.lists(st.one_of(st.integers(1, 4000), st.sampled_from(["admit", "flush", "read", "other"])),
                      max_size=40))  # fmt: skip
def test_keys_kept_headroom_is_what_the_counts_give(tmp_path_factory, steps):
    """The room above the margin that admit and charge keep between reads is always what the counts give now,
    whatever this process and another one charge, write and read in between."""
    url = f"sqlite:///{tmp_path_factory.mktemp('headroom') / 'keys.db'}"
    with counters.OneConnection(url) as db:
        counters.create_tables(db)
    here, other = (limits.Limiter(counters.OneConnection(url), name) for name in ("here", "other"))
    policy = Policy("team", tpm=30_000, tokens_per_day=60_000)
    for step in steps:
        if step == "other":  # another process's call, written at once
            other.charge(policy, 500)
            other.flush()
        elif step == "flush":
            here.flush()  # the batched charges written: the view takes them in
        elif isinstance(step, int):
            here.charge(policy, step)
        else:
            if step == "read":
                here._state("team").view_at = -math.inf  # the view too old: the next admission reads it again
            here.admit(policy)
        state = here._state("team")
        with state.lock:  # the limiter's own thread writes the batches
            if state.headroom is not None:
                margin = max(keystate.MIN_MARGIN_TOKENS, 4 * state.biggest)
                room = [limit - keystate.spent(state, period, start) - margin for period, limit, start in state.windows]
                assert state.headroom == min(room), step
    here.close()
    other.close()


def test_keys_limiter_closes_while_its_thread_writes_a_batch(tmp_path):
    """Shutdown meets the background writer between its two locks (the key's, then the connection): close() must
    take them in the same order, or each waits for the other forever."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with counters.OneConnection(url) as db:
        counters.create_tables(db)
    limiter = limits.Limiter(counters.OneConnection(url), "here")
    policy = Policy("team", tpm=30_000)
    limiter.charge(policy, 10)
    state, holding = limiter._state("team"), threading.Event()

    def write_a_batch() -> None:  # what the ticker's flush does: the key's lock, then the connection
        with state.lock:
            holding.set()
            time.sleep(0.3)  # close() begins meanwhile
            with limiter.connection:
                pass

    writer = threading.Thread(target=write_a_batch, daemon=True)
    writer.start()
    holding.wait(5)
    closer = threading.Thread(target=limiter.close, daemon=True)
    closer.start()
    closer.join(5)
    writer.join(5)
    assert not closer.is_alive() and not writer.is_alive()


def test_keys_database_down_at_start_refuses_keyed_calls_and_serves_the_rest(proxy_with, fake):
    from tests.conftest import free_port

    app, handle, recorder = proxy_with(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    keyed = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(SECRET_PREFIX + "z" * 43), timeout=20)
    assert keyed.status_code == 503 and "cannot be checked" in keyed.json()["error"]
    assert requests.post(f"{handle.url}/api/chat", json=CHAT, timeout=20).status_code == 200
    assert [seen["path"] for seen in fake.seen] == ["/api/chat"]
    assert "Authorization" not in fake.seen[0]["headers"]


def test_keys_limits_that_cannot_be_checked_refuse_the_call_with_503(proxy_with, fake, tmp_path):
    from tests.conftest import hold_write_lock, release

    path = tmp_path / "keys.db"
    app, handle, recorder = proxy_with(DATABASE_URL=f"sqlite:///{path}?timeout=0.2")
    limited, free = make_key(app, "limited", rpm=5), make_key(app, "free")
    holder = hold_write_lock(path)  # another process's long write: no lease can be taken
    try:
        refused = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(limited), timeout=20)
        assert refused.status_code == 503 and "cannot be checked" in refused.json()["error"]
        assert requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(free), timeout=20).status_code == 200
    finally:
        release(holder)
    assert requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer(limited), timeout=20).status_code == 200
    assert [seen["path"] for seen in fake.seen] == ["/api/chat", "/api/chat"]
    calls = recorder.wait_for(3)
    assert [(call.key_name, call.outcome) for call in calls][0] == ("limited", "rejected")
