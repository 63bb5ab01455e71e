"""Security (issue 7): secrets stay out of rows, CSV, logs and metrics; tokens; the default bind and its warning;
the dashboard's sign-in (guessing throttled per client address, sessions signed with a revocable secret).

The dashboard's own headers, CSV formula cells and path tricks are tested with the dashboard.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import hmac
import logging
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from proxy_app import config as config_module
from proxy_app import create_app, shutdown, warn_if_exposed
from proxy_app.ollama.hosts import HostRule, host_of
from proxy_app.state import state_of
from tests.conftest import app_settings, postgres_schema
from tests.fake_ollama import FakeOllama, serve

SECRETS = {"authorization": "Bearer sk-SECRET-AUTH-4242", "cookie": "session=SECRET-COOKIE-7373; theme=dark"}
SECRET_WORDS = ("SECRET-AUTH-4242", "SECRET-COOKIE-7373", "SECRET-PROXY-5151")
METRICS_TOKEN = "metrics-SECRET-9191"
PACKAGE = Path(__file__).resolve().parent.parent / "proxy_app"


@pytest.fixture
def settings(settings) -> dict:
    """conftest's settings with a small body limit (to provoke a 413), a metrics token and every log line."""
    return {**settings, "LOG_LEVEL": "DEBUG", "MAX_BODY_BYTES": 10_000, "METRICS_TOKEN": METRICS_TOKEN}


def test_security_secrets_never_in_rows_csv_logs_or_metrics(app, live_proxy, fake, recorder, caplog, closing):
    caplog.set_level(logging.DEBUG)
    url = live_proxy.url
    headers = {**SECRETS, "Proxy-Authorization": "Basic SECRET-PROXY-5151"}
    with requests.Session() as session:
        session.trust_env = False
        assert session.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "hi"}, headers=headers).ok
        missing = session.post(url + "/api/chat", json={"model": "nope", "messages": []}, headers=headers)
        assert missing.status_code == 404
        assert session.post(url + "/api/generate", data=b"x" * 20_000, headers=headers).status_code == 413
        fake.tokens, fake.token_delay = ["t"] * 50, 0.02
        with session.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}, headers=headers,
                          stream=True) as cut:  # fmt: skip
            next(cut.iter_content(64))  # then leave mid-stream
    fake.tokens, fake.token_delay = ["ok"], 0.0
    import openai  # here: importing it takes about a second, which every other test of this unit-tier module spares

    client = closing(openai.OpenAI(base_url=url + "/v1", api_key="sk-SECRET-AUTH-4242", max_retries=0))
    client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True)
    recorder.wait_for(5)
    assert fake.seen[0]["headers"]["Authorization"] == SECRETS["authorization"]  # still relayed: Ollama may need it
    writer = state_of(app).writer
    assert writer.flush(10)
    places = {
        "rows": "\n".join(repr(row) for row in _rows(app)),
        "csv": Path(app.config["CSV_FILE"]).read_text(),
        "logs": caplog.text + "\n".join(repr(record.args) for record in caplog.records),
        "metrics": requests.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text,
        "calls": "\n".join(repr(call) for call in recorder.calls),
    }
    assert len(_rows(app)) >= 5 and "llama3.2" in places["csv"] and "ollama_requests_total" in places["metrics"]
    assert any("api/generate" in record.getMessage() for record in caplog.records)  # DEBUG logging did run
    for place, text in places.items():
        for secret in SECRET_WORDS:
            assert secret not in text, f"{secret} leaked into {place}"


def _rows(app) -> list[tuple]:
    database = app.config["DATABASE"].removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT * FROM calls").fetchall()


def test_security_metrics_wrong_token_gets_401_without_hints(client):
    answers = [client.get("/metrics", headers=headers) for headers in
               ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
                {"Authorization": f"Basic {METRICS_TOKEN}"}, {"Authorization": METRICS_TOKEN})]  # fmt: skip
    for answer in answers:  # the same answer whatever was wrong: nothing to learn from it
        assert (answer.status_code, answer.data, answer.headers["WWW-Authenticate"]) == (401, b"unauthorized\n",
                                                                                          "Bearer")  # fmt: skip
    assert client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200


def test_security_health_and_test_keep_details_for_a_token_holder(client, upstream):
    """With a token set, anyone gets the bare status; the upstream's address and the parts' state need a token."""
    bare = [client.get(path, headers=headers) for path in ("/health", "/test")
            for headers in ({}, {"Authorization": "Bearer wrong"})]  # fmt: skip
    assert [(answer.status_code, answer.get_json()) for answer in bare] == [
        (200, {"status": "ok"}), (200, {"status": "ok"}), (200, {"ok": True}), (200, {"ok": True})]  # fmt: skip
    assert all(upstream.url.encode() not in answer.data for answer in bare)
    for path in ("/health", "/test"):
        full = client.get(path, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).get_json()
        assert full["upstream"]["url"] == upstream.url and full["upstream"]["reachable"] is True


def test_security_tokens_compared_in_constant_time():
    """No token is compared with == or != anywhere (hmac.compare_digest instead); a plain AST scan of the package."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                operands = [ast.unparse(part) for part in (node.left, *node.comparators)]
                if any(_names_a_token(text) for text in operands):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def _names_a_token(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("token'", 'token"', "_token", "password", "secret")) or lowered == "token"


def test_security_default_bind_is_loopback():
    assert config_module.load({}, env_file=None)["HOST"] == "127.0.0.1"
    with socket.socket() as probe:  # what the proxy binds by default is only reachable from this machine
        probe.bind((config_module.load({}, env_file=None)["HOST"], 0))
        assert probe.getsockname()[0] == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "admin_token", "warns"),
    [("0.0.0.0", "", True), ("192.168.1.20", "", True), ("", "", True), ("::", "", True), ("myhost", "", True),
     ("0.0.0.0", "s3cret", False), ("127.0.0.1", "", False), ("::1", "", False), ("[::1]", "", False),
     ("localhost", "", False), ("127.0.0.2", "", False)],
)  # fmt: skip
def test_security_exposed_bind_warning(host, admin_token, warns):
    message = warn_if_exposed({"HOST": host, "ADMIN_TOKEN": admin_token})
    assert (message is not None) == warns
    if warns:
        assert "OLLAMA_PROXY_ADMIN_TOKEN" in message and "127.0.0.1" in message


def test_security_exposed_bind_warns_at_start(tmp_path, caplog):
    app = create_app({"HOST": "0.0.0.0", "DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}, environ={})
    shutdown(app)
    warnings = [record for record in caplog.records if "ADMIN_TOKEN" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# ---- the dashboard's sign-in: throttled guessing, revocable sessions -------------------------------------------

ADMIN_TOKEN = "admin-SECRET-6161"
LOGIN = "/analytics/login"


class FakeClock:
    """A wall clock that moves only when a test says so."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def locked(upstream, tmp_path):
    """Factory: an app with ADMIN_TOKEN (or ``token``) on a store of its own, or on ``database`` when given."""
    started = []

    def start(token: str = ADMIN_TOKEN, database: str = "", data_dir=None, **settings):
        app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(data_dir or tmp_path), "LOG_LEVEL": "WARNING",
                          "ADMIN_TOKEN": token, "DATABASE_URL": database, **settings}, environ={})  # fmt: skip
        started.append(app)
        return app

    yield start
    for app in started:
        shutdown(app)


def sign_in(client, token: str = ADMIN_TOKEN, **headers):
    return client.post(LOGIN, data={"token": token, "next": "/analytics/stats"}, headers=headers)


def session_cookie(client) -> str | None:
    cookie = client.get_cookie("ollama_proxy_admin", path="/analytics")
    return cookie and cookie.value


def is_signed_in(app, cookie: str) -> bool:
    client = app.test_client()
    client.set_cookie("ollama_proxy_admin", cookie, path="/analytics")
    answer = client.get("/analytics/stats")
    assert answer.status_code in (200, 401)
    return answer.status_code == 200


def test_login_guessing_is_throttled_then_the_right_token_works(locked):
    app = locked()
    clock = state_of(app).dashboard["clock"] = FakeClock()
    client = app.test_client()
    for number in range(5):  # one guess a second
        assert sign_in(client, f"guess-{number}").status_code == 401
        clock.now += 1
    clock.now += 15
    refused = sign_in(client, "guess-6")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "40"  # when the first guess leaves
    assert "Too many failed sign-ins" in refused.get_data(as_text=True)
    right_too_soon = sign_in(client)  # within the window even the right token is not looked at
    assert right_too_soon.status_code == 429 and session_cookie(client) is None
    clock.now += 40
    assert sign_in(client, "guess-7").status_code == 401  # the first guess has left the window: one more try
    assert sign_in(client).headers["Retry-After"] == "1"  # and that try filled it again until the second leaves
    clock.now += 60
    right = sign_in(client)
    assert right.status_code == 302 and right.headers["Location"] == "/analytics/stats"
    assert is_signed_in(app, session_cookie(client))
    assert [sign_in(client, "typo").status_code for _ in range(5)] == [401] * 5  # a sign-in clears the failures


def test_login_throttle_counts_per_client_address(locked):
    app = locked(TRUSTED_PROXIES="127.0.0.1/32")
    state_of(app).dashboard["clock"] = FakeClock()
    client = app.test_client()
    for _ in range(5):
        assert sign_in(client, "guess", **{"X-Forwarded-For": "203.0.113.9"}).status_code == 401
    assert sign_in(client, "guess", **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    assert sign_in(client, "guess", **{"X-Forwarded-For": "198.51.100.7"}).status_code == 401
    assert sign_in(client, **{"X-Forwarded-For": "198.51.100.7"}).status_code == 302


def test_login_throttle_ignores_forwarded_for_from_an_untrusted_peer(locked):
    app = locked()  # no TRUSTED_PROXIES: X-Forwarded-For is the client's own word, and changing it gains nothing
    state_of(app).dashboard["clock"] = FakeClock()
    client = app.test_client()
    answers = [sign_in(client, "guess", **{"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(8)]
    assert answers == [401] * 5 + [429] * 3


def test_login_cookie_never_holds_the_token_and_a_cookie_of_another_secret_is_refused(locked, tmp_path):
    app, other = locked(data_dir=tmp_path / "a"), locked(data_dir=tmp_path / "b")  # the same token, two stores
    client = app.test_client()
    assert sign_in(client).status_code == 302
    cookie = session_cookie(client)
    assert ADMIN_TOKEN not in cookie and ADMIN_TOKEN.encode().hex() not in cookie
    assert is_signed_in(app, cookie) and not is_signed_in(other, cookie)  # each store signs with its own secret
    keyed_by_token = hmac.new(ADMIN_TOKEN.encode(), b"ollama-proxy dashboard session", hashlib.sha256).hexdigest()
    assert not is_signed_in(app, keyed_by_token)  # a hash of the token alone (anyone knowing it can make one)
    assert not is_signed_in(app, "") and not is_signed_in(app, cookie[:-1] + ("0" if cookie[-1] != "0" else "1"))


def test_login_cookie_from_before_a_token_change_is_refused(locked, tmp_path):
    before = locked(token="old-SECRET-1111")
    client = before.test_client()
    assert sign_in(client, "old-SECRET-1111").status_code == 302
    cookie = session_cookie(client)
    shutdown(before)
    after = locked(token="new-SECRET-2222")  # a restart with a new token, same data directory
    assert not is_signed_in(after, cookie)
    fresh = after.test_client()
    assert sign_in(fresh, "new-SECRET-2222").status_code == 302 and is_signed_in(after, session_cookie(fresh))


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_login_state_is_shared_by_every_worker_of_a_store(locked, tmp_path, store):
    """Two apps on one store stand for two gunicorn workers (or hosts): failures, sessions and sign-outs agree."""
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_schema("test_login")) if store == "postgresql" else ""
        one, two = locked(database=database), locked(database=database)
        clock = FakeClock()
        state_of(one).dashboard["clock"] = state_of(two).dashboard["clock"] = clock
        answers = [sign_in((one if n % 2 else two).test_client(), "guess").status_code for n in range(7)]
        assert answers == [401] * 5 + [429] * 2
        clock.now += 61
        first, second = one.test_client(), two.test_client()
        assert sign_in(first).status_code == 302 and sign_in(second).status_code == 302
        cookies = [session_cookie(first), session_cookie(second)]
        assert all(is_signed_in(app, cookie) for app in (one, two) for cookie in cookies)
        assert second.post("/analytics/logout-everywhere").status_code == 302
        assert not any(is_signed_in(app, cookie) for app in (one, two) for cookie in cookies)
        again = one.test_client()
        assert sign_in(again).status_code == 302 and is_signed_in(two, session_cookie(again))


def test_login_sign_out_everywhere_needs_a_session_and_post(locked):
    app = locked()
    client = app.test_client()
    assert client.post("/analytics/logout-everywhere").status_code == 401
    assert sign_in(client).status_code == 302
    cookie = session_cookie(client)
    assert '<form method="post" action="/analytics/logout-everywhere">' in client.get("/analytics").get_data(True)
    assert client.get("/analytics/logout-everywhere").status_code == 404 and is_signed_in(app, cookie)
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # a script with the token can end every browser session
    assert app.test_client().post("/analytics/logout-everywhere", headers=bearer).status_code == 302
    assert not is_signed_in(app, cookie)


def test_login_throttle_holds_under_concurrent_guesses(locked):
    """Guesses sent all at once through a real server: still at most LOGIN_FAILURES get their token checked."""
    handle = serve(locked(), threads=32)
    try:

        def guess(number: int) -> int:
            with requests.Session() as session:
                session.trust_env = False
                return session.post(
                    handle.url + LOGIN, data={"token": f"guess-{number}"}, allow_redirects=False
                ).status_code

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(guess, range(64)))
    finally:
        handle.close()
    assert set(answers) <= {401, 429} and answers.count(401) <= 5 and answers.count(429) >= 59


# ---- DNS rebinding: the Host a request names (Ollama's allowedHostsMiddleware) ------------------------------------

EVIL_HOST = "evil.example"


def test_security_foreign_host_refused_in_each_apis_shape(live_proxy, fake, recorder):
    """A page that re-points its name at 127.0.0.1 reads nothing: not the export, not Ollama, in each API's shape."""
    with requests.Session() as session:
        session.trust_env = False
        session.headers["Host"] = EVIL_HOST
        url = live_proxy.url
        export = session.get(url + "/analytics/export.csv")
        tags = session.get(url + "/api/tags")
        chat = session.post(url + "/v1/chat/completions", json={"model": "llama3.2", "messages": []})
        messages = session.post(url + "/v1/messages", json={"model": "llama3.2", "messages": [], "max_tokens": 5})
        own_pages = [session.get(url + path).status_code for path in ("/health", "/test", "/metrics", "/analytics")]
    message = f"the Host {EVIL_HOST!r} is not allowed here; to accept it, add it to OLLAMA_PROXY_ALLOWED_HOSTS"
    assert (export.status_code, export.json()) == (403, {"error": message})
    assert (tags.status_code, tags.json()) == (403, {"error": message})
    openai_error = {"message": message, "type": "api_error", "param": None, "code": None}  # Ollama's type for 403
    assert (chat.status_code, chat.json()) == (403, {"error": openai_error})
    anthropic_error = {"type": "permission_error", "message": message}
    assert (messages.status_code, messages.json()) == (403, {"type": "error", "error": anthropic_error})
    assert own_pages == [403, 403, 403, 403]
    assert fake.seen == []  # nothing reached Ollama
    calls = recorder.wait_for(3)  # the refused relayed calls are still recorded
    assert sorted((call.endpoint, call.http_status, call.outcome, call.error_message) for call in calls) == [
        ("/api/tags", 403, "rejected", message), ("/v1/chat/completions", 403, "rejected", message),
        ("/v1/messages", 403, "rejected", message),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def loopback_app(tmp_path_factory):
    """One app on the default (loopback) bind for the many Host headers below, which only read two pages each."""
    fake = FakeOllama()
    upstream = serve(fake)
    app = create_app(app_settings(upstream.url, tmp_path_factory.mktemp("hosts")), environ={})
    yield app, fake
    shutdown(app)
    upstream.close()


@pytest.fixture
def host_checked(loopback_app):
    """A test client of that app, and its fake Ollama with nothing seen yet."""
    app, fake = loopback_app
    fake.seen.clear()
    return app.test_client(), fake


@pytest.mark.parametrize(
    "host",
    ["localhost:11434", "localhost", "LocalHost:11434", "127.0.0.1", "127.0.0.1:11434", "127.1.2.3", "[::1]",
     "[::1]:11434", "::1", "api.localhost", "api.localhost:8080", "printer.local", "db.internal", "0.0.0.0",
     "10.1.2.3:11434", "192.168.1.20", "172.16.0.1", "[fd00::1]:11434", "[::ffff:127.0.0.1]", "", socket.gethostname()],
)  # fmt: skip
def test_security_local_hosts_allowed_on_a_loopback_bind(host_checked, host):
    client, _fake = host_checked
    assert client.get("/api/version", headers={"Host": host}).status_code == 200
    assert client.get("/health", headers={"Host": host}).status_code in (200, 503)


@pytest.mark.parametrize(
    "host",
    [EVIL_HOST, "evil.example:11434", "localhost.evil.example", "127.0.0.1.nip.io", "8.8.8.8", "[2001:4860::8888]",
     "localhost.", "evillocalhost", "172.32.0.1", "xn--localhost", "local", "[::1"],
)  # fmt: skip
def test_security_foreign_hosts_refused_on_a_loopback_bind(host_checked, host):
    client, fake = host_checked
    assert client.get("/api/version", headers={"Host": host}).status_code == 403
    assert client.get("/analytics/export.csv", headers={"Host": host}).status_code == 403
    assert fake.seen == []


@pytest.mark.parametrize(
    ("bind", "allowed", "expected"),
    [("0.0.0.0", "ollama.example.com, *.corp.example", {"ollama.example.com": 200, "OLLAMA.example.com:443": 200,
      "a.corp.example": 200, "corp.example": 403, EVIL_HOST: 403, "localhost:11434": 200, "127.0.0.1": 200}),
     ("0.0.0.0", "", {EVIL_HOST: 200, "ollama.example.com": 200}),  # Ollama's own behaviour on such a bind
     ("127.0.0.1", "ollama.example.com", {"ollama.example.com": 200, EVIL_HOST: 403, "localhost": 200}),  # nginx
     ("::", "*", {EVIL_HOST: 200}), ("192.168.1.20", "203.0.113.9", {"203.0.113.9:11434": 200, EVIL_HOST: 403})],
)  # fmt: skip
def test_security_allowed_hosts_setting_is_honoured(settings, fake, bind, allowed, expected):
    app = create_app({**settings, "HOST": bind, "ALLOWED_HOSTS": allowed}, environ={})
    try:
        client = app.test_client()
        answers = {host: client.get("/api/version", headers={"Host": host}).status_code for host in expected}
        assert answers == expected
    finally:
        shutdown(app)


def test_security_open_bind_without_allowed_hosts_says_so(tmp_path, caplog):
    app = create_app({"HOST": "0.0.0.0", "DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING", "ADMIN_TOKEN": "t"},
                     environ={})  # fmt: skip
    shutdown(app)
    warnings = [record.getMessage() for record in caplog.records if "ALLOWED_HOSTS" in record.getMessage()]
    assert len(warnings) == 1 and "any Host" in warnings[0]


@pytest.mark.parametrize("value", ["http://ollama.example.com", "ollama.example.com:443", "a b", "*.", "ex*ample"])
def test_security_allowed_hosts_bad_entry_names_the_setting(value):
    with pytest.raises(config_module.SettingError, match="OLLAMA_PROXY_ALLOWED_HOSTS"):
        config_module.load({"OLLAMA_PROXY_ALLOWED_HOSTS": value}, env_file=None)


def test_security_host_rule_own_addresses_asked_only_for_other_ips():
    asked = []

    def local_addresses():
        asked.append(1)
        return ["127.0.0.1", "203.0.113.7", "2001:db8::7%eth0"]

    rule = HostRule(checks_local=True, hostname="box", local_addresses=local_addresses)
    assert [rule.allows(host) for host in ("box:11434", "BOX", "localhost", "10.0.0.1")] == [True] * 4
    assert asked == []  # names, loopback and private addresses need no look-up
    assert rule.allows("203.0.113.7:11434") and rule.allows("[2001:db8::7]") and not rule.allows("203.0.113.8")
    assert len(asked) == 3
    headers = ("[::1]:80", "Example.COM:8080", "::1", "[::1")
    assert [host_of(header) for header in headers] == ["::1", "example.com", "::1", "[::1"]
