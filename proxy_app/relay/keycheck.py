"""API keys on the relay path: whose call this is, whether it may go upstream, and what it costs the key at the end.

``identify`` reads the key a call presents and takes it off the request (a proxy key never reaches Ollama; any other
``Authorization`` passes through). ``admit`` refuses a model the key may not use or a management call (pull,
delete, ...) of a key that may not manage (403), or a call over a limit (429 with Retry-After), before anything
reaches Ollama. ``settle_key`` frees the call's stream and charges its tokens. The keys and their counters are the
store's (``state_of(app).keys``: store/keystore.py); with no key stored and ``REQUIRE_KEY`` off none of this reads a
header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy_app import apikeys
from proxy_app.apikeys import Policy
from proxy_app.ollama.intake import is_management
from proxy_app.ollama.model_list import LISTS, only_allowed
from proxy_app.settings import PREFIX
from proxy_app.state import state_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A call's key (None: anonymous) or why it is refused: status, message and Retry-After seconds."""

    policy: Policy | None = None
    status: int = 0
    message: str = ""
    retry_after: int | None = None


ANONYMOUS = Verdict()


def identify(app, environ: dict) -> Verdict:
    """Who the call is from; a presented proxy key is removed from ``environ`` so that it is not sent upstream."""
    keys, required = state_of(app).keys, app.config["REQUIRE_KEY"]
    # is_empty first, whatever REQUIRE_KEY says: its first use starts the ring's refresh, without which no key loads
    if keys is None or (keys.ring.is_empty and keys.ring.loaded and not required):
        return ANONYMOUS
    found = apikeys.presented(environ)
    if found is None:
        if required:
            return Verdict(None, 401, "this proxy needs an API key: send Authorization: Bearer <key> or X-API-Key")
        return ANONYMOUS
    secret, header = found
    del environ[header]
    if not keys.ring.loaded:  # the database has not answered since start-up: no key can be judged
        return Verdict(None, 503, f"API keys cannot be checked now ({PREFIX}DATABASE_URL does not answer)")
    policy = keys.ring.lookup(secret)
    if policy is None:
        return Verdict(None, 401, "the API key is not valid")
    reason = policy.refusal()
    return Verdict(policy, 401, reason) if reason else Verdict(policy)  # a refused key still names its calls


def admit(app, policy: Policy, path: str, model: str | None, second_model: str | None = None) -> Verdict | None:
    """None when a call of ``policy`` to ``path`` for ``model`` (and ``second_model``: intake.SECOND_MODEL_KEYS) may
    go upstream (its request and stream are then taken), else the refusal."""
    if not policy.manage and is_management(path):
        return Verdict(policy, 403, f"the API key {policy.name!r} may not manage models (pull, push, create, copy, "
                                    f"delete) or the server's sign-in; `keys update --manage` allows it")  # fmt: skip
    for name in (model, second_model):
        if not policy.allows_model(name):
            return Verdict(policy, 403, f"the API key {policy.name!r} may not use the model {name[:200]!r}")
    if not policy.is_limited:
        return None
    try:
        refusal = state_of(app).keys.limiter.admit(policy)
    except Exception:  # a limit that cannot be checked is not lifted
        log.exception("cannot check the limits of key %r", policy.name)
        message = f"the limits of this API key cannot be checked now ({PREFIX}DATABASE_URL does not answer)"
        return Verdict(policy, 503, message)
    return None if refusal is None else Verdict(policy, refusal.status, refusal.message, refusal.retry_after)


def settle_key(app, policy: Policy, tokens: int | None) -> None:
    """An admitted call ended: free its stream and charge its tokens (never raises: the call is still recorded)."""
    if not policy.is_limited:
        return
    limiter = state_of(app).keys.limiter
    try:
        limiter.leave(policy)
        limiter.charge(policy, tokens or 0)
    except Exception:
        log.exception("cannot count the end of a call of key %r", policy.name)


def filters_models(policy: Policy | None, method: str, path: str) -> bool:
    """True when the answer is a model list that must show only the key's models."""
    return policy is not None and bool(policy.models) and method == "GET" and path in LISTS


def allowed_list(policy: Policy, path: str, body: bytes) -> bytes | None:
    """The model list answer with only the key's models; None when it cannot be read."""
    return only_allowed(path, body, policy.allows_model)
