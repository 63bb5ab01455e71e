"""The ``keys`` command: ``create``, ``list``, ``update``, ``revoke`` and ``usage`` of API keys in the configured
database (OLLAMA_PROXY_DATABASE_URL, or the SQLite store in DATA_DIR), whose key tables it creates when missing.

A new key's secret is printed once, as the last line of ``keys create``, and exists nowhere else: the database holds
its hash, and no other command shows either. Running proxies see a change within store/keys.py's REFRESH_SECONDS.
The work is store/keys.py's (KeyTable) and store/spending.py's (``usage``); this module parses options, prints for
people (``--json`` for programs) and exits 1 with a one-line message on a problem. It imports the store inside each
command, as cli.py does, so that the other commands start without it.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

import click

from proxy_app import apikeys
from proxy_app import config as config_module

LIMIT_HELP = {  # option -> help; the option's name is KeyChange's field
    "--rpm": "Requests per minute.",
    "--tpm": "Tokens (input + output) per minute.",
    "--tokens-per-day": "Tokens per UTC day.",
    "--tokens-per-month": "Tokens per UTC month.",
    "--max-streams": "Calls in flight at once.",
}
COLUMNS = {  # a row's field -> its heading in the table
    "name": "NAME", "hint": "HINT", "created": "CREATED", "expires": "EXPIRES", "revoked": "REVOKED",
    "models": "MODELS", "rpm": "RPM", "tpm": "TPM", "tokens_per_day": "TOKENS/DAY",
    "tokens_per_month": "TOKENS/MONTH", "max_streams": "STREAMS", "capture": "CAPTURE",
    "manage": "MANAGE",
}  # fmt: skip
CLIENT_HEADERS = "Authorization: Bearer KEY or X-API-Key: KEY"


class FutureMoment(click.ParamType):
    """An ISO date or datetime still to come, as aware UTC: no offset means UTC, and a date means its 00:00 UTC; or
    ``never`` (apikeys.NEVER), which takes an expiry away."""

    name = "DATE"

    def convert(self, value, param, ctx) -> datetime | str:
        if isinstance(value, datetime) or value == apikeys.NEVER:
            return value
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(f"{value!r} is not an ISO date or datetime, e.g. 2030-01-31 or 2030-01-31T18:00", param, ctx)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        if moment <= datetime.now(UTC):
            self.fail(f"{value!r} ({moment:%Y-%m-%d %H:%M} UTC) is not in the future", param, ctx)
        return moment


def _key_options(command):
    """The options ``create`` and ``update`` share: what a key may do."""
    options = [
        click.option("--models", help="Comma-separated models the key may use; '' (update) allows every model."),
        *(click.option(flag, type=click.IntRange(min=0), help=f"{text} 0 means no limit.")
          for flag, text in LIMIT_HELP.items()),
        click.option("--capture/--no-capture", default=None,
                     help="--no-capture: never store this key's prompts and previews."),
        click.option("--manage/--no-manage", default=None,
                     help="--manage: may also pull, push, create, copy and delete the models it may use (off by "
                          "default: those change the models of every caller)."),
        click.option("--expires", type=FutureMoment(),
                     help="When the key stops working: ISO date or datetime, UTC; never: no expiry."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def keys() -> None:
    """API keys: a client sends one as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""


@keys.command()
@click.argument("name")
@_key_options
def create(name: str, **options) -> None:
    """Create key NAME, print it, and print its secret once, as the last line."""
    from proxy_app.store.keys import KeyChange

    with _key_table() as (table, _connection):
        secret = table.create(name, KeyChange(**options))
        row = _one_row(table, name.strip())
    click.echo(_render_table([row]))
    click.echo(f"The key follows, shown this once; clients send it as {CLIENT_HEADERS}.")
    click.echo(secret)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_keys(as_json: bool) -> None:
    """Print every key (never a secret): its limits, when it expires, whether it is revoked."""
    with _key_table() as (table, _connection):
        rows = table.rows()
    if as_json:
        click.echo(json.dumps([_plain(row) for row in rows], indent=2))
    elif rows:
        click.echo(_render_table(rows))
    else:
        click.echo("No keys; `keys create NAME` makes one.")


@keys.command()
@click.argument("name")
@_key_options
def update(name: str, **options) -> None:
    """Change what key NAME may do: only the options given change."""
    from proxy_app.store.keys import KeyChange

    with _key_table() as (table, _connection):
        table.update(name, KeyChange(**options))
        row = _one_row(table, name)
    click.echo(_render_table([row]))


@keys.command()
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke key NAME for good: every proxy on this database refuses it within seconds."""
    from proxy_app.store.keys import REFRESH_SECONDS

    with _key_table() as (table, _connection):
        table.revoke(name)
    click.echo(f"key {name!r} is revoked; running proxies refuse it within {REFRESH_SECONDS:g} seconds")


@keys.command()
@click.argument("name")
def usage(name: str) -> None:
    """Print key NAME's limits as JSON: each one's limit, what is used, what remains and when it resets."""
    from proxy_app.store import limits

    with _key_table() as (table, connection):
        policy = table.policy(name)
        spent = limits.Limiter(connection, "keys-command").usage(policy)
    expires = policy.expires.isoformat() if policy.expires else None
    document = {"name": policy.name, "models": sorted(policy.models), "expires": expires, "revoked": policy.revoked,
                "limits": spent}  # fmt: skip
    click.echo(json.dumps(document, indent=2))


@contextlib.contextmanager
def _key_table():
    """The key table of the configured database and its connection; a problem ends the command with its message."""
    from peewee import PeeweeException

    from proxy_app.store import counters
    from proxy_app.store.keys import KeyError_, KeyTable

    try:
        url = config_module.merge()["DATABASE"]
    except config_module.SettingError as exc:
        raise click.ClickException(str(exc)) from None
    connection = counters.OneConnection(url)
    try:
        with connection as db:
            counters.create_tables(db)
    except Exception as exc:  # any driver error (or a bad URL) is the answer we want to print
        raise click.ClickException(f"the database cannot be used: {_first_line(exc)}") from None
    try:
        with connection as db:
            yield KeyTable(db), connection
    except KeyError_ as exc:
        raise click.ClickException(str(exc)) from None
    except PeeweeException as exc:
        raise click.ClickException(f"the database failed: {_first_line(exc)}") from None
    finally:
        connection.close()


def _one_row(table, name: str) -> dict:
    return next(row for row in table.rows() if row["name"] == name)


def _render_table(rows: list[dict]) -> str:
    """The rows as aligned text columns, a heading first."""
    cells = [list(COLUMNS.values())] + [[_cell(field, row[field]) for field in COLUMNS] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _cell(field: str, value) -> str:
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if field == "models":
        return value or "any"
    if field == "capture":
        return "yes" if value else "no"
    if field in apikeys.LIMITS:
        return str(value) if value else "-"
    return "-" if value is None else str(value)


def _plain(row: dict) -> dict:
    """A row for JSON: times in ISO 8601 (UTC), the models as a list."""
    document = {field: value.isoformat() if isinstance(value, datetime) else value for field, value in row.items()}
    document["models"] = list(filter(None, row["models"].split(",")))
    return document


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
