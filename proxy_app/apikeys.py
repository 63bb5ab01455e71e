"""API keys as values: a new secret, its hash, which header presented it, and a key's ``Policy`` (what it may do).

A proxy key is a random token with a recognisable prefix, so it can be told apart from any other ``Authorization``
(an Ollama cloud key passes through untouched). Only its SHA-256 is stored: the secret is 256 random bits, so a slow
password hash would add cost on every call and no safety.

It reads no request and no database: callers pass the WSGI environ or the stored values (store/keys.py keeps them,
relay/keycheck.py applies them).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

SECRET_PREFIX = "opk_"
# The headers a key may come in: what the openai and ollama clients send, and what the anthropic client sends.
AUTHORIZATION, X_API_KEY = "HTTP_AUTHORIZATION", "HTTP_X_API_KEY"
NEVER = "never"  # what `keys update --expires` takes to make a key stop expiring
LIMITS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_streams")  # 0 or None: no such limit


def new_secret() -> str:
    """A new key: the prefix and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """The stored form of a secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def presented(environ: dict) -> tuple[str, str] | None:
    """The proxy key a request carries and the environ name of its header, or None when it carries none of ours.

    ``Authorization: Bearer opk_…`` or ``X-API-Key: opk_…``; any other value of either header is not ours.
    """
    header = environ.get(AUTHORIZATION)
    if header:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token.startswith(SECRET_PREFIX):
            return token, AUTHORIZATION
    token = environ.get(X_API_KEY, "").strip()
    if token.startswith(SECRET_PREFIX):
        return token, X_API_KEY
    return None


def model_name(model: str) -> str:
    """A model name as Ollama resolves it: lower case, with ``:latest`` when no tag is given."""
    model = model.strip().lower()
    last = model.rsplit("/", 1)[-1]
    return model if ":" in last else model + ":latest"


@dataclass(frozen=True, slots=True)
class Policy:
    """One key's name and what it may do. A limit of 0 means none; ``models`` empty means every model."""

    name: str
    models: frozenset[str] = frozenset()  # model_name() of each allowed model
    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens (input + output) per minute
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    max_streams: int = 0  # calls in flight at once
    capture: bool = True  # False: its prompts and previews are never stored
    manage: bool = False  # True: may manage its models and the sign-in (intake.is_management: pull, delete, ...)
    expires: datetime | None = None  # UTC
    revoked: bool = False

    # Worked out once from the limits above (a key is read on every call of it).
    token_limits: tuple[tuple[str, int], ...] = field(init=False)  # (period, limit) of each token limit
    counts_tokens: bool = field(init=False)  # any token limit
    is_limited: bool = field(init=False)  # any limit but the model list: its calls need the shared counters

    def __post_init__(self) -> None:
        periods = (("minute", self.tpm), ("day", self.tokens_per_day), ("month", self.tokens_per_month))
        token_limits = tuple((period, limit) for period, limit in periods if limit)
        object.__setattr__(self, "token_limits", token_limits)  # frozen: set once here
        object.__setattr__(self, "counts_tokens", bool(token_limits))
        object.__setattr__(self, "is_limited", bool(self.rpm or self.max_streams or token_limits))

    def allows_model(self, model: str | None) -> bool:
        """True when the key may use ``model`` (any model when the key names none, and calls that name no model)."""
        return not self.models or not model or model_name(model) in self.models

    def refusal(self) -> str | None:
        """Why this key cannot be used at all now (revoked, expired), or None."""
        if self.revoked:
            return f"the API key {self.name!r} was revoked"
        if self.expires is not None and datetime.now(UTC) >= self.expires:
            return f"the API key {self.name!r} expired at {self.expires:%Y-%m-%d %H:%M} UTC"
        return None
