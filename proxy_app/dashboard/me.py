"""Blueprint ``me`` at /analytics/me, nested in the dashboard's: a key holder's own usage and nothing else.

The only credential is a proxy key, never the admin token: ``Authorization: Bearer opk_…`` or ``X-API-Key: opk_…``
on a GET (JSON by default), or, from a browser, which cannot set those headers, the key pasted into the page's form
and POSTed in its body (never in the URL). A missing, unknown, revoked or expired key gets 401. The answer counts
only the rows whose ``key_name`` is the key's name (keyusage.py). The dashboard's guard lets this endpoint through
and its headers (CSP without inline script, no-store) apply here too.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, render_template, request

from proxy_app import apikeys
from proxy_app.calls import format_timestamp
from proxy_app.dashboard import keyusage
from proxy_app.state import state_of

bp = Blueprint("me", __name__, url_prefix="/me")
KEY_FIELD = "key"  # the form field a browser sends the key in
MAX_KEY_CHARS = 256  # a longer value is no key of ours; it is refused before it is hashed


class Unauthorized(Exception):
    """The request carries no usable key; the message says why, the status is 401 or 503."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@bp.route("", methods=["GET", "POST"], strict_slashes=False)
def show():
    """The key's own usage: JSON, or for a browser the page (a form to paste the key into until it has one)."""
    html = _wants_html()
    try:
        policy = _authenticate(current_app, request.method == "POST")
    except Unauthorized as refusal:
        asked = request.method == "POST" or apikeys.presented(request.environ) is not None
        if html:
            message = str(refusal) if asked else ""
            status = refusal.status if asked else 200  # the empty form reveals nothing
            return render_template("me.html", usage=None, message=message), status
        response = _json({"error": str(refusal)}, refusal.status)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    usage = usage_document(policy)
    return render_template("me.html", usage=usage, message="") if html else _json(usage)


def usage_document(policy) -> dict:
    """The key's name, its calls and tokens today and this month, each limit's spend, its models and expiry."""
    db = state_of(current_app).dashboard["db"]
    with db.connection_context():
        counted = keyusage.own_usage(db, policy.name, datetime.now(UTC))
    keys = state_of(current_app).keys
    return {
        "name": policy.name,
        **counted,
        "limits": keyusage.spend(keys, policy) if policy.is_limited else {},  # None: cannot be read now
        "models": sorted(policy.models),  # empty: every model
        "expires": format_timestamp(policy.expires) if policy.expires else None,
    }


def _authenticate(app, from_form: bool):
    """The policy of the key this request presents (header, else the POSTed form); raise Unauthorized otherwise."""
    found = apikeys.presented(request.environ)
    secret = found[0] if found else (request.form.get(KEY_FIELD, "").strip() if from_form else "")
    if not secret:
        raise Unauthorized("send your API key: Authorization: Bearer <key> or X-API-Key: <key>")
    keys = state_of(app).keys
    if keys is None or (keys.ring.is_empty and not keys.ring.loaded):  # is_empty starts the ring's refresh
        raise Unauthorized("API keys cannot be checked now", 503)
    policy = None
    if secret.startswith(apikeys.SECRET_PREFIX) and len(secret) <= MAX_KEY_CHARS:
        policy = keys.ring.lookup(secret)
    if policy is None:
        raise Unauthorized("the API key is not valid")
    reason = policy.refusal()
    if reason:
        raise Unauthorized(reason)
    return policy


def _wants_html() -> bool:
    """A browser (Accept names text/html before JSON); anything else, curl's */* included, gets JSON."""
    if request.args.get("format") in ("json", "html"):
        return request.args["format"] == "html"
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def _json(document: dict, status: int = 200) -> Response:
    body = current_app.json.dumps(document, sort_keys=False)
    return Response(body + "\n", status=status, mimetype="application/json")
