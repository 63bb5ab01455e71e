"""Settings: defaults, environment, .env, overrides and clear errors (the README table: test_docs.py)."""

from __future__ import annotations

import re
import socket

import pytest

from proxy_app import config, create_app


def test_config_defaults():
    values = config.merge(environ={})
    assert values["UPSTREAM"] == "http://127.0.0.1:11435"
    assert (values["HOST"], values["PORT"], values["DATA_DIR"]) == ("127.0.0.1", 11434, "./ollama_analytics")
    assert values["READ_TIMEOUT"] == 3600 and values["CONNECT_TIMEOUT"] == 5
    assert values["DATABASE"] == "sqlite:///ollama_analytics/ollama-proxy.db"


def test_config_environment_and_overrides():
    values = config.merge({"PORT": 9000}, environ={"OLLAMA_PROXY_PORT": "8000", "OLLAMA_PROXY_CAPTURE_CONTENT": "no"})
    assert values["PORT"] == 9000 and values["CAPTURE_CONTENT"] is False


def test_config_instance_is_the_host_name_unless_named():
    assert config.merge(environ={})["INSTANCE"] == socket.gethostname()
    assert config.merge(environ={"OLLAMA_PROXY_INSTANCE": " edge-1 "})["INSTANCE"] == "edge-1"
    assert config.merge({"INSTANCE": "edge-2"}, environ={"OLLAMA_PROXY_INSTANCE": "edge-1"})["INSTANCE"] == "edge-2"


def test_config_dotenv_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OLLAMA_PROXY_UPSTREAM=http://10.0.0.5:11435\nOLLAMA_PROXY_PORT=1234\n")
    values = config.load({"OLLAMA_PROXY_PORT": "4321"}, env_file=env_file)
    assert values["UPSTREAM"] == "http://10.0.0.5:11435" and values["PORT"] == 4321  # the real environment wins


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("UPSTREAM", "ftp://x", "OLLAMA_PROXY_UPSTREAM='ftp://x': must be an http"),
        ("PORT", "70000", "OLLAMA_PROXY_PORT='70000': must be between 0 and 65535"),
        ("READ_TIMEOUT", "soon", "OLLAMA_PROXY_READ_TIMEOUT='soon'"),
        ("TRUSTED_PROXIES", "not-an-ip", "OLLAMA_PROXY_TRUSTED_PROXIES"),
    ],
)
def test_config_bad_value_names_the_setting(name, value, message):
    with pytest.raises(config.SettingError, match=re.escape(message)):
        config.load({f"OLLAMA_PROXY_{name}": value}, env_file=None)


def test_config_create_app_fails_on_bad_setting():
    with pytest.raises(config.SettingError, match="OLLAMA_PROXY_MAX_CONCURRENT"):
        create_app(environ={"OLLAMA_PROXY_MAX_CONCURRENT": "-1"})


def test_config_secrets_masked():
    values = config.merge({"ADMIN_TOKEN": "hunter2"}, environ={})
    assert config.masked(values)["ADMIN_TOKEN"] == "***"
