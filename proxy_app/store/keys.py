"""API keys in the analytics database: the ``api_keys`` table (a hash of each secret, never the secret), the
commands the CLI runs on it (``KeyTable``), and ``KeyRing``, each process's copy of the keys that the relay looks a
presented secret up in without a database round trip.

The shared usage counters that enforce the limits are limits.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from peewee import (
    SQL,
    BigIntegerField,
    BooleanField,
    CharField,
    Database,
    DatabaseError,
    Model,
    SchemaManager,
    TextField,
)
from playhouse.migrate import SchemaMigrator, migrate

from proxy_app import apikeys
from proxy_app.apikeys import Policy
from proxy_app.store.models import UTCDateTimeField
from proxy_app.ticker import Ticker

log = logging.getLogger(__name__)

KEYS_TABLE = "api_keys"
NAME_CHARS = 64
RESERVED_NAMES = ("none", "other")  # the metrics' key label values for anonymous calls and for keys past the cap
# Why: another process (the `keys` command, another worker or instance) changes keys; each process re-reads the
# small table this often, so a revocation or a new limit holds everywhere within these seconds.
REFRESH_SECONDS = 2.0
# Why: an unknown secret makes the ring re-read at once (a key created a moment ago), but not more often than this,
# so a client spraying made-up keys costs one small query a second, not one per call.
MISS_REFRESH_SECONDS = 1.0


class ApiKey(Model):
    """One key: its name, the SHA-256 of its secret, the first characters to recognise it by, and its limits."""

    name = CharField(max_length=NAME_CHARS, unique=True)
    secret_hash = CharField(max_length=64, unique=True)
    hint = CharField(max_length=16)  # the prefix and the first 4 characters of the secret
    created = UTCDateTimeField()
    expires = UTCDateTimeField(null=True)
    revoked = UTCDateTimeField(null=True)
    models = TextField(default="")  # comma-separated model names (apikeys.model_name); empty: every model
    rpm = BigIntegerField(default=0)
    tpm = BigIntegerField(default=0)
    tokens_per_day = BigIntegerField(default=0)
    tokens_per_month = BigIntegerField(default=0)
    max_streams = BigIntegerField(default=0)
    capture = BooleanField(default=True)
    manage = BooleanField(default=False)  # may pull, push, create, copy and delete its models

    class Meta:
        table_name = KEYS_TABLE

    def policy(self) -> Policy:
        return Policy(
            name=self.name,
            models=frozenset(filter(None, self.models.split(","))),
            rpm=self.rpm,
            tpm=self.tpm,
            tokens_per_day=self.tokens_per_day,
            tokens_per_month=self.tokens_per_month,
            max_streams=self.max_streams,
            capture=self.capture,
            manage=self.manage,
            expires=self.expires,
            revoked=self.revoked is not None,
        )


def add_missing_columns(db: Database) -> None:
    """Add to an ``api_keys`` table the columns it lacks (``manage``: False for every key it holds). Safe to run from
    several processes at once: a column another one added first is left as it is."""
    if "manage" in _columns(db):
        return
    column = BooleanField(constraints=[SQL("DEFAULT FALSE")])  # one ADD COLUMN, no table rewrite
    try:
        with db.atomic():
            migrate(SchemaMigrator.from_database(db).add_column(KEYS_TABLE, "manage", column, allow_not_null=True))
    except DatabaseError:
        if "manage" not in _columns(db):
            raise


def _columns(db: Database) -> set[str]:
    return {column.name for column in db.get_columns(KEYS_TABLE)}


class KeyError_(ValueError):
    """A key command that cannot be done (a name taken, a key that does not exist); the message says why."""


@dataclass
class KeyChange:
    """What ``keys create`` and ``keys update`` set; None leaves a field as it is (update) or at its default."""

    models: str | None = None  # comma-separated
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    max_streams: int | None = None
    capture: bool | None = None
    manage: bool | None = None
    expires: datetime | str | None = None  # or apikeys.NEVER: no expiry

    def values(self) -> dict:
        changed = {name: value for name, value in vars(self).items() if value is not None}
        if changed.get("expires") == apikeys.NEVER:
            changed["expires"] = None
        if "models" in changed:
            names = (apikeys.model_name(model) for model in changed["models"].split(",") if model.strip())
            changed["models"] = ",".join(sorted(set(names)))
        return changed


class KeyTable:
    """The ``keys`` commands on one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_table(self) -> None:
        SchemaManager(ApiKey, database=self.db).create_all(safe=True)

    def create(self, name: str, change: KeyChange) -> str:
        """Store a new key and return its secret (the only time it exists outside the client)."""
        name = _checked_name(name)
        secret = apikeys.new_secret()
        with self.db.atomic():
            if ApiKey.select().where(ApiKey.name == name).exists(self.db):
                raise KeyError_(f"a key named {name!r} exists already")
            ApiKey.insert(
                name=name,
                secret_hash=apikeys.secret_hash(secret),
                hint=secret[: len(apikeys.SECRET_PREFIX) + 4],
                created=datetime.now(UTC),
                **change.values(),
            ).execute(self.db)
        return secret

    def update(self, name: str, change: KeyChange) -> None:
        values = change.values()
        if values and not ApiKey.update(**values).where(ApiKey.name == name).execute(self.db):
            raise KeyError_(f"no key named {name!r}")
        if not values and not ApiKey.select().where(ApiKey.name == name).exists(self.db):
            raise KeyError_(f"no key named {name!r}")

    def revoke(self, name: str) -> None:
        if not ApiKey.update(revoked=datetime.now(UTC)).where(ApiKey.name == name).execute(self.db):
            raise KeyError_(f"no key named {name!r}")

    def policy(self, name: str) -> Policy:
        """The policy of the key named ``name`` (revoked or expired included)."""
        rows = list(ApiKey.select().where(ApiKey.name == name).execute(self.db))
        if not rows:
            raise KeyError_(f"no key named {name!r}")
        return rows[0].policy()

    def rows(self) -> list[dict]:
        """Every key as a dict (never the secret or its hash), by name."""
        shown = ("name", "hint", "created", "expires", "revoked", "models", *apikeys.LIMITS, "capture", "manage")
        rows = ApiKey.select().order_by(ApiKey.name).execute(self.db)
        return [{field: getattr(row, field) for field in shown} for row in rows]


def _checked_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_CHARS or not name.isprintable() or "," in name:
        raise KeyError_(f"a key name is 1 to {NAME_CHARS} printable characters without a comma")
    if name.lower() in RESERVED_NAMES:
        raise KeyError_(f"{name!r} is reserved: the metrics use it for calls without a key or beyond the label cap")
    return name


class KeyRing:
    """This process's copy of every key, by secret hash: ``lookup`` is a hash and a dict read.

    A Ticker re-reads the table every REFRESH_SECONDS; an unknown secret re-reads it at once, at most every
    MISS_REFRESH_SECONDS. While the database cannot be read the last copy stays in use.
    """

    def __init__(self, connection) -> None:
        self.connection = connection  # counters.OneConnection, shared with the limiter
        self._by_hash: dict[str, Policy] = {}
        self._by_name: dict[str, Policy] = {}
        self._read_at = 0.0
        self.loaded = False  # the table was read at least once: until then no key can be judged
        self._miss_lock = threading.Lock()
        self.ticker = Ticker("api-keys", self._refresh_task, REFRESH_SECONDS)

    @property
    def is_empty(self) -> bool:
        """True when no key exists: the proxy then reads no key header at all."""
        self.ticker.ensure(wait=0.0 if self.loaded else 5.0)  # the first read, before the first call is judged
        return not self._by_hash

    def lookup(self, secret: str) -> Policy | None:
        """The policy of ``secret``, or None when no key has it."""
        digest = apikeys.secret_hash(secret)
        policy = self._by_hash.get(digest)
        if policy is None and time.monotonic() - self._read_at >= MISS_REFRESH_SECONDS:
            with self._miss_lock:
                if time.monotonic() - self._read_at >= MISS_REFRESH_SECONDS:
                    self.refresh()
            policy = self._by_hash.get(digest)
        return policy

    def by_name(self, name: str) -> Policy | None:
        return self._by_name.get(name)

    def refresh(self) -> None:
        """Read every key; on failure keep the last copy (logged)."""
        self._read_at = time.monotonic()
        try:
            with self.connection as db:
                rows = list(ApiKey.select().execute(db))
        except Exception:
            log.warning("cannot read the API keys; the last copy stays in use", exc_info=True)
            return
        self._by_hash = {row.secret_hash: row.policy() for row in rows}
        self._by_name = {policy.name: policy for policy in self._by_hash.values()}
        self.loaded = True

    def _refresh_task(self) -> None:
        self.refresh()
