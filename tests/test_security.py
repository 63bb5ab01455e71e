"""Security (issue 7): secrets stay out of rows, CSV, logs and metrics; tokens; the default bind and its warning.

The dashboard's own headers, CSV formula cells and path tricks are tested with the dashboard.
"""

from __future__ import annotations

import ast
import logging
import socket
import sqlite3
from pathlib import Path

import openai
import pytest
import requests

from proxy_app import config as config_module
from proxy_app import create_app, shutdown, warn_if_exposed
from proxy_app.ollama.hosts import HostRule, host_of

SECRETS = {"authorization": "Bearer sk-SECRET-AUTH-4242", "cookie": "session=SECRET-COOKIE-7373; theme=dark"}
SECRET_WORDS = ("SECRET-AUTH-4242", "SECRET-COOKIE-7373", "SECRET-PROXY-5151")
METRICS_TOKEN = "metrics-SECRET-9191"
PACKAGE = Path(__file__).resolve().parent.parent / "proxy_app"


@pytest.fixture
def settings(upstream, tmp_path) -> dict:
    """This module's app: a small body limit (to provoke a 413) and a metrics token."""
    return {"UPSTREAM": upstream.url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "DEBUG", "MAX_BODY_BYTES": 10_000,
            "METRICS_TOKEN": METRICS_TOKEN}  # fmt: skip


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
    client = closing(openai.OpenAI(base_url=url + "/v1", api_key="sk-SECRET-AUTH-4242", max_retries=0))
    client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True)
    recorder.wait_for(5)
    assert fake.seen[0]["headers"]["Authorization"] == SECRETS["authorization"]  # still relayed: Ollama may need it
    writer = app.extensions["writer"]
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


@pytest.mark.parametrize(
    "host",
    ["localhost:11434", "localhost", "LocalHost:11434", "127.0.0.1", "127.0.0.1:11434", "127.1.2.3", "[::1]",
     "[::1]:11434", "::1", "api.localhost", "api.localhost:8080", "printer.local", "db.internal", "0.0.0.0",
     "10.1.2.3:11434", "192.168.1.20", "172.16.0.1", "[fd00::1]:11434", "[::ffff:127.0.0.1]", "", socket.gethostname()],
)  # fmt: skip
def test_security_local_hosts_allowed_on_a_loopback_bind(client, fake, host):
    assert client.get("/api/version", headers={"Host": host}).status_code == 200
    assert client.get("/health", headers={"Host": host}).status_code in (200, 503)


@pytest.mark.parametrize(
    "host",
    [EVIL_HOST, "evil.example:11434", "localhost.evil.example", "127.0.0.1.nip.io", "8.8.8.8", "[2001:4860::8888]",
     "localhost.", "evillocalhost", "172.32.0.1", "xn--localhost", "local", "[::1"],
)  # fmt: skip
def test_security_foreign_hosts_refused_on_a_loopback_bind(client, fake, host):
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
