"""Helpers for tests that run the proxy (``python -m proxy_app ...``) and the fake ``ollama`` binary as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
FAKE_OLLAMA = ROOT / "tests" / "bin" / "ollama"  # runs tests/fake_ollama_cli.py


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def fake_ollama_env(tmp_path: Path, **settings: str) -> dict:
    """Environment for a proxy process: data in tmp_path/data, the fake ollama binary, quiet logs, extra settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OLLAMA_PROXY_")}
    env.update(
        OLLAMA_PROXY_DATA_DIR=str(tmp_path / "data"), OLLAMA_PROXY_OLLAMA_BIN=str(FAKE_OLLAMA),
        OLLAMA_PROXY_LOG_LEVEL="WARNING", FAKE_OLLAMA_PYTHON=sys.executable,
        FAKE_OLLAMA_CRASH_FILE=str(tmp_path / "crash"), FAKE_OLLAMA_RECORD=str(tmp_path / "record.jsonl"),
    )  # fmt: skip
    env.update({f"OLLAMA_PROXY_{name}": value for name, value in settings.items()})
    return env


def records(tmp_path: Path) -> list[dict]:
    """What the fake ollama client commands recorded (argv, OLLAMA_HOST, status, answer), in order."""
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def health(url: str) -> dict | None:
    """The proxy's /health document, or None while it does not answer."""
    try:
        return requests.get(url + "/health", timeout=2).json()
    except (requests.RequestException, ValueError):
        return None


class ServeProcess:
    """``python -m proxy_app serve ARGS`` on ``port``, output in tmp_path/serve.log; ready once /health answers."""

    def __init__(self, tmp_path: Path, port: int, args: list[str], env: dict) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log_path = tmp_path / "serve.log"
        command = [sys.executable, "-m", "proxy_app", "serve", "--port", str(port), *args]
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        wait_until(self._is_ready, timeout=20, message=f"serve on {self.url}")

    def _is_ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}: {self.output()}")
        return health(self.url) is not None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code (killing it if it hangs, so no test leaves it behind)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"serve did not stop within {timeout} s: {self.output()}") from None
