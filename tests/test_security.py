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
