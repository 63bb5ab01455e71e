"""The dashboard's sign-in state, kept in the analytics store so that every worker, host and restart agrees.

- The session secret: 32 random bytes in ``dashboard_session_key``, made on first use. The login cookie is an HMAC
  of the admin token under it, so the cookie never holds the token, a new token makes every older cookie worthless,
  and ``rotate`` (sign out everywhere) does the same without a new token.
- Sign-in attempts: a row per attempt in ``dashboard_login_attempts``, kept while it failed and is less than
  LOGIN_WINDOW_SECONDS old. An address with LOGIN_FAILURES of them is refused, without its token being looked at,
  until the oldest leaves the window.

No Flask here (signin.py reads the request, answers, and sets the cookie, naming the client by
``access.client_address``, the relay's rule, so that a sign-in and a relayed call name the same client).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets

from peewee import (
    AutoField,
    CharField,
    Database,
    DoubleField,
    Model,
    PostgresqlDatabase,
    SchemaManager,
    TextField,
)

# Why: a person mistypes a token a few times; a guesser gets 5 tries a minute per address, in every process at once.
LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 60
KEY_NAME = "session"  # the secret's row; a name rather than a bare single row leaves room for other keys
SESSION_MESSAGE = b"ollama-proxy dashboard session\x00"  # what the cookie signs, followed by the token
MAX_ADDRESS_CHARS = 255  # an address that is not an IP (a proxy's odd X-Forwarded-For) is still bounded
SCHEMA_LOCK = 7469002  # any fixed key: serialises creating these tables between processes on PostgreSQL


class SessionKey(Model):
    """The secret that signs login cookies (one row, ``name`` = KEY_NAME, ``value`` in hex)."""

    name = CharField(max_length=32, primary_key=True)
    value = CharField(max_length=64)

    class Meta:
        table_name = "dashboard_session_key"


class LoginAttempt(Model):
    """One sign-in attempt that failed, or is being checked, with its client address and Unix time."""

    id = AutoField()
    address = TextField()
    attempted_at = DoubleField()

    class Meta:
        table_name = "dashboard_login_attempts"
        indexes = ((("address", "attempted_at"), False), (("attempted_at",), False))


def ensure_tables(db: Database) -> None:
    """Create the two tables and the secret if missing; safe to call from every process at once."""
    with db.atomic():
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for model in (SessionKey, LoginAttempt):
            SchemaManager(model, database=db).create_all(safe=True)
        _insert_key(db)


def _insert_key(db: Database) -> None:
    SessionKey.insert(name=KEY_NAME, value=secrets.token_hex(32)).on_conflict_ignore().execute(db)


def cookie_value(db: Database, token: str) -> str:
    """Return the login cookie for ``token``: an HMAC of it under the stored secret (never the token itself)."""
    query = SessionKey.select(SessionKey.value).where(SessionKey.name == KEY_NAME)
    found = db.execute(query).fetchone()
    if found is None:  # the row was deleted by hand: a new secret, which signs out every browser
        _insert_key(db)
        found = db.execute(query).fetchone()
    return hmac.new(bytes.fromhex(found[0]), SESSION_MESSAGE + token.encode(), hashlib.sha256).hexdigest()


def rotate(db: Database) -> None:
    """Replace the secret: every login cookie issued so far is refused from now on, in every process."""
    SessionKey.update(value=secrets.token_hex(32)).where(SessionKey.name == KEY_NAME).execute(db)


def admit(db: Database, address: str, now: float) -> int:
    """Record a sign-in attempt from ``address`` and return 0, or return the seconds it must wait (nothing recorded).

    The attempt is counted before its token is checked, so that concurrent guesses cannot all slip in; ``forget``
    removes it again when the token was right.
    """
    address = address[:MAX_ADDRESS_CHARS]
    wait = _wait(db, address, now, LOGIN_FAILURES)
    if wait:
        return wait
    with db.atomic():
        LoginAttempt.delete().where(LoginAttempt.attempted_at <= now - LOGIN_WINDOW_SECONDS).execute(db)
        attempt = LoginAttempt.insert(address=address, attempted_at=now).execute(db)
    wait = _wait(db, address, now, LOGIN_FAILURES + 1)  # others may have been recorded meanwhile
    if wait:
        LoginAttempt.delete().where(LoginAttempt.id == attempt).execute(db)
    return wait


def forget(db: Database, address: str) -> None:
    """Clear an address's attempts after a successful sign-in."""
    LoginAttempt.delete().where(LoginAttempt.address == address[:MAX_ADDRESS_CHARS]).execute(db)


def _wait(db: Database, address: str, now: float, allowed: int) -> int:
    """Seconds until ``address`` has fewer than ``allowed`` attempts in the window; 0 when it has already."""
    recent = (
        LoginAttempt.select(LoginAttempt.attempted_at)
        .where(LoginAttempt.address == address, LoginAttempt.attempted_at > now - LOGIN_WINDOW_SECONDS)
        .order_by(LoginAttempt.attempted_at.desc())
        .limit(allowed)
    )
    times = [moment for (moment,) in db.execute(recent).fetchall()]
    if len(times) < allowed:
        return 0
    return max(1, math.ceil(times[-1] + LOGIN_WINDOW_SECONDS - now))
