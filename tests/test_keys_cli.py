"""The ``keys`` command as a user runs it (``python -m proxy_app keys ...``, a real process) on SQLite and
PostgreSQL, and a key it creates used through a running proxy by the openai, anthropic and ollama clients."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone

import anthropic
import ollama
import openai
import pytest
import requests
from playhouse.migrate import SchemaMigrator, migrate

from proxy_app import config
from proxy_app.store import counters
from proxy_app.store.keys import KEYS_TABLE, REFRESH_SECONDS
from tests.conftest import postgres_schema
from tests.processes import ROOT, wait_until

SECRET = re.compile(r"opk_[A-Za-z0-9_-]{43}")
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> dict:
    """The settings (names without the prefix) the command and the proxy share: the default SQLite store in a
    data directory, or a fresh PostgreSQL schema."""
    settings = {"DATA_DIR": str(tmp_path / "data")}
    if request.param == "sqlite":
        yield settings
        return
    with postgres_schema("test_keys_cli") as url:
        yield {**settings, "DATABASE_URL": url}


def keys(database: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m proxy_app keys ARGS`` with exactly these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OLLAMA_PROXY_")}
    env.update({f"OLLAMA_PROXY_{name}": value for name, value in database.items()})
    command = [sys.executable, "-m", "proxy_app", "keys", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def listed(database: dict) -> list[dict]:
    result = keys(database, "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def create(database: dict, name: str, *options: str) -> str:
    """Create a key; return its secret, the last line of the output."""
    result = keys(database, "create", name, *options)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.splitlines()[-1]
    assert SECRET.fullmatch(secret)
    return secret


def test_keys_cli_create_list_update_revoke_usage(database):
    expires = (datetime.now(UTC) + timedelta(days=400)).replace(second=0, microsecond=0)
    given = expires.astimezone(timezone(timedelta(hours=2))).isoformat()  # an offset is turned into UTC
    result = keys(database, "create", "team", "--models", "llama3.2,Qwen3:8b", "--rpm", "5", "--tokens-per-day",
                  "1000", "--no-capture", "--expires", given)  # fmt: skip
    assert result.returncode == 0, result.stderr
    *shown, secret = result.stdout.splitlines()
    assert SECRET.fullmatch(secret) and result.stdout.count(secret) == 1
    assert shown[0].split() == ["NAME", "HINT", "CREATED", "EXPIRES", "REVOKED", "MODELS", "RPM", "TPM",
                                "TOKENS/DAY", "TOKENS/MONTH", "STREAMS", "CAPTURE", "MANAGE"]  # fmt: skip
    assert shown[1].split()[:2] == ["team", secret[:8]]
    (row,) = listed(database)
    assert datetime.fromisoformat(row.pop("created")) <= datetime.now(UTC)
    assert row == {
        "name": "team", "hint": secret[:8], "expires": expires.isoformat(), "revoked": None,
        "models": ["llama3.2:latest", "qwen3:8b"], "rpm": 5, "tpm": 0, "tokens_per_day": 1000, "tokens_per_month": 0,
        "max_streams": 0, "capture": False, "manage": False,
    }  # fmt: skip
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for output in (keys(database, "list").stdout, keys(database, "list", "--json").stdout):
        assert "team" in output and secret not in output and digest not in output

    assert (
        keys(
            database, "update", "team", "--models", "", "--rpm", "0", "--max-streams", "2", "--capture", "--manage"
        ).returncode
        == 0
    )
    (row,) = listed(database)
    assert (row["models"], row["rpm"], row["max_streams"], row["capture"], row["manage"]) == ([], 0, 2, True, True)
    assert (row["tokens_per_day"], row["expires"]) == (1000, expires.isoformat())  # not given: unchanged

    usage = json.loads(keys(database, "usage", "team").stdout)
    resets_at = usage["limits"]["tokens_per_day"].pop("resets_at")
    assert usage == {"name": "team", "models": [], "expires": expires.isoformat(), "revoked": False, "limits": {
        "tokens_per_day": {"limit": 1000, "used": 0, "remaining": 1000},
        "max_streams": {"limit": 2, "used": 0, "remaining": 2, "resets_at": None},
    }}  # fmt: skip
    assert 0 < resets_at - time.time() <= 86400

    assert keys(database, "update", "team", "--expires", "never").returncode == 0
    assert listed(database)[0]["expires"] is None

    revoked = keys(database, "revoke", "team")
    assert revoked.returncode == 0 and revoked.stdout.startswith("key 'team' is revoked")
    (row,) = listed(database)
    assert datetime.fromisoformat(row["revoked"]) <= datetime.now(UTC)
    assert json.loads(keys(database, "usage", "team").stdout)["revoked"] is True


def test_keys_cli_adds_manage_to_a_key_table_made_without_it(database):
    """An api_keys table made before keys had --manage gets the column as the command (or a proxy) next opens it:
    the keys it holds keep every other field and may not manage, and --manage can then be given."""
    create(database, "old", "--rpm", "5")
    environ = {f"OLLAMA_PROXY_{name}": value for name, value in database.items()}
    with counters.OneConnection(config.merge(environ=environ)["DATABASE"]) as db:
        migrate(SchemaMigrator.from_database(db).drop_column(KEYS_TABLE, "manage"))
        assert "manage" not in {column.name for column in db.get_columns(KEYS_TABLE)}
    (row,) = listed(database)
    assert (row["name"], row["rpm"], row["manage"]) == ("old", 5, False)
    assert listed(database) == [row]  # opening it again changes nothing
    assert keys(database, "update", "old", "--manage").returncode == 0
    assert listed(database)[0]["manage"] is True


def test_keys_cli_refusals_are_one_line_and_exit_non_zero(tmp_path):
    database = {"DATA_DIR": str(tmp_path / "data")}
    create(database, "team")
    for args, message in (
        (["create", "team"], "Error: a key named 'team' exists already\n"),
        (["update", "nobody", "--rpm", "1"], "Error: no key named 'nobody'\n"),
        (["revoke", "nobody"], "Error: no key named 'nobody'\n"),
        (["usage", "nobody"], "Error: no key named 'nobody'\n"),
        (["create", "a,b"], "Error: a key name is 1 to 64 printable characters without a comma\n"),
    ):
        result = keys(database, *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message)
    for when, words in (("2001-01-01", "is not in the future"), ("tomorrow", "is not an ISO date or datetime")):
        result = keys(database, "create", "late", "--expires", when)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines()[-1].startswith(f"Error: Invalid value for '--expires': {when!r} ")
        assert words in result.stderr
    assert [row["name"] for row in listed(database)] == ["team"]
    unreachable = keys({**database, "DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1:1/test"}, "list")
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("Error: the database cannot be used: ")
    assert unreachable.stderr.count("\n") == 1 and "hunter2" not in unreachable.stderr


def test_keys_cli_key_works_through_a_running_proxy_until_revoked(database, proxy_with, fake, closing):
    app, handle, recorder = proxy_with(REQUIRE_KEY=True, **database)
    secret = create(database, "team")
    bearer = {"Authorization": f"Bearer {secret}"}

    def status() -> int:
        return requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer, timeout=10).status_code

    wait_until(lambda: status() == 200, timeout=5, message="the new key to be accepted")
    ask = [{"role": "user", "content": "hi"}]
    openai_client = closing(openai.OpenAI(base_url=f"{handle.url}/v1", api_key=secret, max_retries=0))
    assert openai_client.chat.completions.create(model="llama3.2", messages=ask).choices[0].message.content
    anthropic_client = closing(anthropic.Anthropic(base_url=handle.url, api_key=secret, max_retries=0))
    assert anthropic_client.messages.create(model="llama3.2", max_tokens=5, messages=ask).content
    ollama_client = closing(ollama.Client(host=handle.url, headers=bearer))
    assert ollama_client.chat(model="llama3.2", messages=ask).message.content
    relayed = [seen for seen in fake.seen if seen["path"] in ("/api/chat", "/v1/chat/completions", "/v1/messages")]
    assert len(relayed) == 4 and not any(secret in str(seen["headers"]) for seen in relayed)  # removed before Ollama

    assert keys(database, "revoke", "team").returncode == 0
    wait_until(lambda: status() == 401, timeout=REFRESH_SECONDS + 3, message="the revoked key to be refused")
    relayed = len(fake.seen)
    refused = requests.post(f"{handle.url}/api/chat", json=CHAT, headers=bearer, timeout=10)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]
    assert len(fake.seen) == relayed
