"""The command line: ``python -m proxy_app serve | run MODEL | check | init-db | export-csv | keys``, and every other
``ollama`` subcommand (``list``, ``ps``, ``pull`` ...) passed through to ollama with OLLAMA_HOST set to the proxy.

A standalone click group rather than ``flask --app`` commands, so that ``serve`` and ``check`` work before (or
without) an app. Commands print for people and exit non-zero on a problem; the work lives in servers.py,
supervisor.py and the store modules.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from proxy_app import __version__
from proxy_app import config as config_module
from proxy_app.ops.probe import probe_upstream
from proxy_app.service import servers
from proxy_app.service.key_commands import keys
from proxy_app.service.supervisor import find_ollama

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
CHECK_TIMEOUT = (3.0, 5.0)  # connect, read: `check` may wait a little longer than /health for a busy upstream


class OllamaGroup(click.Group):
    """Our commands first; any other name is an ollama subcommand, run through the proxy."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or _ollama_command(name)


def _ollama_command(name: str) -> click.Command:
    @click.command(name, context_settings=PASS_THROUGH, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def passthrough(args: tuple[str, ...]) -> None:
        run_ollama([name, *args])

    return passthrough


@click.group(cls=OllamaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version")
def cli() -> None:
    """Ollama analytics proxy. Other commands (list, ps, pull, rm, ...) go to ollama through the proxy."""


cli.add_command(keys)


def load_settings(overrides: dict | None = None) -> dict:
    """Return the effective settings, or exit with the message naming a bad setting."""
    try:
        return config_module.merge(overrides)
    except config_module.SettingError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--host", help="Address to listen on [OLLAMA_PROXY_HOST].")
@click.option("--port", type=int, help="Port to listen on [OLLAMA_PROXY_PORT].")
@click.option("--upstream", help="Ollama URL to relay to [OLLAMA_PROXY_UPSTREAM].")
@click.option("--server", type=click.Choice(["auto", "gunicorn", "waitress"]), help="[OLLAMA_PROXY_SERVER]")
@click.option("--with-ollama/--without-ollama", default=None, help="Start and supervise `ollama serve` too.")
@click.option("--workers", type=int, help="gunicorn worker processes [OLLAMA_PROXY_WORKERS].")
@click.option("--threads", type=int, help="Threads per process [OLLAMA_PROXY_THREADS].")
@click.option("--grace-seconds", type=float, help="How long streams may finish on shutdown.")
@click.option("--data-dir", help="Store, CSV and logs directory [OLLAMA_PROXY_DATA_DIR].")
def serve(**options) -> None:
    """Run the proxy until SIGTERM or Ctrl-C (gunicorn on Linux/macOS, waitress on Windows)."""
    overrides = {name.upper(): value for name, value in options.items() if value is not None}
    settings = load_settings(overrides)
    try:
        code = servers.serve(settings, overrides)
    except servers.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@cli.command(context_settings=PASS_THROUGH)
@click.argument("model")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(model: str, args: tuple[str, ...]) -> None:
    """Chat with MODEL through the proxy (`ollama run MODEL ...`), starting the proxy and Ollama if needed."""
    run_ollama(["run", model, *args])


def run_ollama(argv: list[str]) -> None:
    """Make sure the proxy is up, then replace this process with `ollama ARGV` talking to the proxy."""
    settings = load_settings()
    binary = find_ollama(settings["OLLAMA_BIN"])
    if binary is None:
        raise click.ClickException("cannot find the ollama executable; install Ollama or set OLLAMA_PROXY_OLLAMA_BIN")
    try:
        address = servers.ensure_running(settings)
    except servers.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    environ = config_module.child_environ({"OLLAMA_HOST": address})
    if sys.platform == "win32":  # no real exec on Windows: run it and pass its exit code on
        sys.exit(subprocess.call([binary, *argv], env=environ))
    os.execve(binary, [binary, *argv], environ)


@cli.command()
def check() -> None:
    """Print the effective settings (secrets masked) and test the upstream, the data directory and the database."""
    settings = load_settings()
    click.echo("Settings:")
    for name, value in config_module.masked(settings).items():
        click.echo(f"  {name} = {_show(name, value)}")
    click.echo("Checks:")
    problems = 0
    for is_ok, message in (_check_upstream(settings), _check_data_dir(settings), _check_database(settings),
                           *_check_ollama(settings)):  # fmt: skip
        problems += not is_ok
        click.echo(f"  {'ok  ' if is_ok else 'FAIL'}  {message}")
    if problems:
        raise click.ClickException(f"{problems} problem(s) found")
    click.echo("All checks passed.")


@cli.command("init-db")
def init_db() -> None:
    """Create the analytics tables, or migrate them to this version (start-up does it too)."""
    from proxy_app.store import models, schema

    settings = load_settings()
    shown = _hide_password(settings["DATABASE"])
    try:
        database = models.open_database(settings["DATABASE"])
        with database.connection_context():
            version = schema.create_tables(database)
    except Exception as exc:  # any driver error (or a bad URL) is the answer we want to print
        raise click.ClickException(f"database {shown} cannot be used: {_first_line(exc)}") from None
    click.echo(f"database {shown} is ready (schema version {version})")


@cli.command("export-csv")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="File to write; default stdout.")
@click.option("--days", type=click.IntRange(min=1), help="Only calls from the last DAYS days.")
def export_csv(output: str | None, days: int | None) -> None:
    """Write the stored calls as CSV, oldest first, in the columns of the CSV mirror."""
    from proxy_app.store import csvlog, models

    settings = load_settings()
    database = models.open_database(settings["DATABASE"])
    models.database.initialize(database)
    query = models.CallRow.select().order_by(models.CallRow.timestamp, models.CallRow.id)
    if days:
        query = query.where(models.CallRow.timestamp >= datetime.now(UTC) - timedelta(days=days))
    with database.connection_context(), _open_output(output) as out:
        for line in csvlog.iter_csv(query.iterator()):
            out.write(line)


def _open_output(path: str | None):
    """The export's destination: a file (newline='' as csv wants), or stdout left open afterwards."""
    if path:
        return open(path, "w", encoding="utf-8", newline="")
    return contextlib.nullcontext(click.get_text_stream("stdout"))


def _check_upstream(settings: dict) -> tuple[bool, str]:
    url = settings["UPSTREAM"]
    probed = probe_upstream(url, timeout=CHECK_TIMEOUT)
    if probed["version"] is None:
        if settings["WITH_OLLAMA"] and find_ollama(settings["OLLAMA_BIN"]):
            return True, f"upstream {url} is not running yet; `serve` will start Ollama there (WITH_OLLAMA)"
        what = (probed["error"] or "no version").split(":")[0]  # the kind of failure: ConnectionError, HTTP 404 ...
        return False, (f"upstream {url} does not answer like Ollama ({what}); start Ollama there, "
                       "fix OLLAMA_PROXY_UPSTREAM, or use `serve --with-ollama`")  # fmt: skip
    return True, f"upstream {url} answers: Ollama {probed['version']}"


def _check_data_dir(settings: dict) -> tuple[bool, str]:
    data_dir = Path(settings["DATA_DIR"])
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        return False, f"data directory {data_dir} is not writable: {exc.strerror or exc}"
    return True, f"data directory {data_dir.resolve()} is writable"


def _check_database(settings: dict) -> tuple[bool, str]:
    from proxy_app.store import models

    shown = _hide_password(settings["DATABASE"])
    try:
        database = models.open_database(settings["DATABASE"])
        database.connect()
        database.execute_sql("SELECT 1")
        database.close()
    except Exception as exc:  # any driver error (or a bad URL) is the answer we want to print
        return False, f"database {shown} cannot be used: {_first_line(exc)}"
    return True, f"database {shown} accepts connections"


def _check_ollama(settings: dict) -> list[tuple[bool, str]]:
    if not settings["WITH_OLLAMA"]:
        return []
    binary = find_ollama(settings["OLLAMA_BIN"])
    if binary is None:
        return [(False, "ollama executable not found (WITH_OLLAMA is on); set OLLAMA_PROXY_OLLAMA_BIN")]
    return [(True, f"ollama executable {binary}")]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _show(name: str, value) -> str:
    if name == "DATABASE":
        return _hide_password(value)
    return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _hide_password(url: str) -> str:
    """Return a database URL with its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
