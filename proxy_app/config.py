"""Configuration: the settings declared in settings.py, read from the environment once, parsed, merged and masked.

This is the only module that reads ``os.environ``. It does not start anything and does not touch the disk, except
reading a ``.env`` file in the working directory when asked to.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy_app.settings import OTEL_STANDARD, PREFIX, SETTINGS, Setting


class SettingError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


def read_environ(environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ".env") -> dict:
    """Return the variables to configure from: ``.env`` (if present) overlaid by the real environment."""
    merged: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


def child_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment plus ``extra``: what a child process (gunicorn, ollama) starts with."""
    return {**os.environ, **(extra or {})}


def load(environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ".env") -> dict:
    """Return every setting, typed, from defaults overlaid by ``.env`` and the environment; raise SettingError."""
    source = read_environ(environ, env_file)
    values = {
        setting.name: parse_setting(setting, source.get(PREFIX + setting.name, setting.default)) for setting in SETTINGS
    }
    values.update({setting.name: source.get(setting.name, setting.default) for setting in OTEL_STANDARD})
    return values


def parse_setting(setting: Setting, raw: Any) -> Any:
    """Parse one raw value (text from the environment, or an already typed override)."""
    if not isinstance(raw, str):
        return raw
    try:
        return setting.parse(raw)
    except ValueError as exc:
        shown = "***" if setting.secret else repr(raw)
        raise SettingError(f"{setting.variable}={shown}: {exc}") from None


def merge(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """Return defaults, then ``.env`` and env (or ``environ`` when given), then ``overrides`` (tests pass both)."""
    values = load(environ, env_file=".env" if environ is None else None)
    by_name = {setting.name: setting for setting in SETTINGS}
    for name, raw in (overrides or {}).items():
        values[name] = parse_setting(by_name[name], raw) if name in by_name else raw
    return derive(values)


def derive(values: dict) -> dict:
    """Fill the settings whose defaults depend on others (paths under DATA_DIR) or on the machine (INSTANCE); parse
    OTEL_STANDARD if OTEL is on."""
    data_dir = Path(values["DATA_DIR"])
    values["INSTANCE"] = values["INSTANCE"] or socket.gethostname()
    values.setdefault("CSV_FILE", values["CSV_PATH"] or str(data_dir / "ollama-proxy.csv"))
    values.setdefault("DATABASE", values["DATABASE_URL"] or f"sqlite:///{data_dir / 'ollama-proxy.db'}")
    if values.get("OTEL"):  # off, they stay as given: another program's OTEL_* values must not stop the proxy
        for setting in OTEL_STANDARD:
            values[setting.name] = parse_setting(setting, values.get(setting.name, setting.default))
    return values


def masked(values: Mapping[str, Any]) -> dict:
    """Return the settings with secrets replaced by '***' (for `check` and logs)."""
    secret = {setting.name for setting in (*SETTINGS, *OTEL_STANDARD) if setting.secret}
    return {name: ("***" if name in secret and values.get(name) else values.get(name)) for name in sorted(values)}
