"""The command line: `check` finds each kind of problem, `run MODEL` and other ollama commands go through the proxy."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import psutil
from click.testing import CliRunner

from proxy_app.calls import COLUMNS
from proxy_app.service.cli import cli
from proxy_app.service.supervisor import is_listening
from proxy_app.state import state_of
from tests.conftest import free_port
from tests.processes import ROOT, fake_ollama_env, records


def invoke_check(env: dict):
    """Run `check` in-process with exactly these OLLAMA_PROXY_* settings (the rest of the environment is cleared)."""
    cleared = {key: None for key in os.environ if key.startswith("OLLAMA_PROXY_")}
    return CliRunner().invoke(cli, ["check"], env={**cleared, **env})


def checks_section(output: str) -> str:
    return output[output.index("Checks:") :]


def test_cli_check_reports_each_problem(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    port = free_port()
    result = invoke_check({
        "OLLAMA_PROXY_UPSTREAM": f"http://127.0.0.1:{port}",
        "OLLAMA_PROXY_DATA_DIR": str(not_a_dir / "data"),
        "OLLAMA_PROXY_DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:1/x",
    })  # fmt: skip
    assert result.exit_code == 1
    lines = checks_section(result.output).splitlines()
    assert lines[0] == "Checks:"
    assert lines[1] == (
        f"  FAIL  upstream http://127.0.0.1:{port} does not answer like Ollama (ConnectionError); start Ollama "
        "there, fix OLLAMA_PROXY_UPSTREAM, or use `serve --with-ollama`"
    )
    assert lines[2] == f"  FAIL  data directory {not_a_dir / 'data'} is not writable: Not a directory"
    assert re.fullmatch(
        r"  FAIL  database postgresql://postgres:\*\*\*@127.0.0.1:1/x cannot be used: .*Connection refused.*", lines[3]
    )
    assert lines[4:] == ["Error: 3 problem(s) found"]
    assert "secret" not in result.output and "DATABASE_URL = ***" in result.output


def test_cli_check_bad_upstream_url():
    result = invoke_check({"OLLAMA_PROXY_UPSTREAM": "ftp://x"})
    assert result.exit_code == 1
    assert result.output == (
        "Error: OLLAMA_PROXY_UPSTREAM='ftp://x': must be an http:// or https:// URL with a host, "
        "e.g. http://127.0.0.1:11435\n"
    )


def test_cli_check_all_good(upstream, tmp_path):
    result = invoke_check({"OLLAMA_PROXY_UPSTREAM": upstream.url, "OLLAMA_PROXY_DATA_DIR": str(tmp_path),
                           "OLLAMA_PROXY_ADMIN_TOKEN": "hunter2"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert checks_section(result.output) == (
        "Checks:\n"
        f"  ok    upstream {upstream.url} answers: Ollama 0.12.6\n"
        f"  ok    data directory {tmp_path} is writable\n"
        f"  ok    database sqlite:///{tmp_path}/ollama-proxy.db accepts connections\n"
        "All checks passed.\n"
    )
    assert "ADMIN_TOKEN = ***" in result.output and "hunter2" not in result.output


def run_cli(tmp_path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "proxy_app", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_run_starts_proxy_and_ollama_then_execs_ollama_run(tmp_path):
    port, upstream_port = free_port(), free_port()
    env = fake_ollama_env(tmp_path, PORT=str(port), UPSTREAM=f"http://127.0.0.1:{upstream_port}", SERVER="waitress")
    result = run_cli(tmp_path, ["run", "llama3.2", "why is the sky blue?"], env)
    started = re.search(r"started the proxy in the background: pid (\d+)", result.stderr)
    background = psutil.Process(int(started.group(1))) if started else None
    try:
        assert result.returncode == 0, result.stderr
        [record] = records(tmp_path)
        assert record["argv"] == ["run", "llama3.2", "why is the sky blue?"]
        assert record["ollama_host"] == f"127.0.0.1:{port}"
        assert (record["status"], record["answer"]["response"]) == (200, "The sky is blue.")
        assert is_listening(upstream_port), "run must have started Ollama behind the proxy"
    finally:
        if background is not None:
            background.terminate()  # SIGTERM: the same graceful stop as `serve` in the foreground
            background.wait(20)
    assert not is_listening(port) and not is_listening(upstream_port)


def test_cli_other_ollama_commands_pass_through(live_proxy, tmp_path):
    args = ["list", "--verbose"]  # not our command: everything goes to ollama as it is, options included
    env = fake_ollama_env(tmp_path, PORT=str(live_proxy.port))
    result = run_cli(tmp_path, args, env)
    assert result.returncode == 0, result.stderr
    [record] = records(tmp_path)
    assert record["argv"] == args and record["ollama_host"] == f"127.0.0.1:{live_proxy.port}"
    assert [model["name"] for model in record["answer"]["models"]][:1] == ["llama3.2:latest"]


def test_cli_serve_refuses_a_taken_port_and_names_the_holder(upstream):
    result = CliRunner().invoke(cli, ["serve", "--port", str(upstream.port), "--server", "waitress"])
    assert result.exit_code == 1
    holder = psutil.Process().name()  # this test process serves the fake upstream
    assert result.output.startswith(f"Error: port {upstream.port} is already held by {holder} (pid {os.getpid()}: ")
    assert "If that is Ollama, move it behind the proxy" in result.output


def test_cli_init_db_and_export_csv(app, client, tmp_path):
    env = {"OLLAMA_PROXY_DATA_DIR": str(tmp_path), "OLLAMA_PROXY_DATABASE_URL": ""}
    result = CliRunner().invoke(cli, ["init-db"], env=env)
    assert result.output == f"database sqlite:///{tmp_path}/ollama-proxy.db is ready (schema version 4)\n"
    assert client.get("/api/tags").status_code == 200
    assert state_of(app).writer.flush(5)
    out = tmp_path / "calls.csv"
    result = CliRunner().invoke(cli, ["export-csv", "--days", "1", "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    with out.open(newline="") as exported:
        header, row = list(csv.reader(exported))
    assert header == list(COLUMNS)
    assert (row[COLUMNS.index("endpoint")], row[COLUMNS.index("http_status")]) == ("/api/tags", "200")
    assert row[COLUMNS.index("upstream")] == app.config["UPSTREAM"] and row[COLUMNS.index("key_name")] == ""
