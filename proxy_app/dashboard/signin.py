"""Signing in to the dashboard: the login form (``/analytics/login``), signing out of this browser (``/logout``) and
out of every browser (``/logout-everywhere``), and ``is_authorized``, which the dashboard's guard (views.py) asks of
every other request.

The routes sit on the dashboard's own blueprint (views.py calls ``add_routes``), so their endpoints stay
``dashboard.login``, ``dashboard.logout`` and ``dashboard.logout_everywhere`` and the blueprint's guard and headers
apply to them. The cookie is an HMAC of the admin token under the store's session secret, and failed sign-ins are
throttled per client address; both live in the store (sessions.py), so every worker and host agrees.
"""

from __future__ import annotations

import contextlib
import hmac

from flask import Blueprint, current_app, redirect, render_template, request, url_for

from proxy_app import access
from proxy_app.dashboard import sessions
from proxy_app.state import state_of

COOKIE = "ollama_proxy_admin"


def add_routes(bp: Blueprint) -> None:
    """Register the sign-in routes on the dashboard's blueprint, named after their functions."""
    bp.add_url_rule("/login", view_func=login, methods=["GET", "POST"])
    bp.add_url_rule("/logout", view_func=logout, methods=["POST"])
    bp.add_url_rule("/logout-everywhere", view_func=logout_everywhere, methods=["POST"])


def _cookie_value(token: str) -> str:
    """The login cookie: an HMAC of the token under the store's session secret, never the token itself."""
    with _signin_store() as db:
        return sessions.cookie_value(db, token)


@contextlib.contextmanager
def _signin_store():
    """The store, connected, with the sign-in tables made (once per process)."""
    state = state_of(current_app).dashboard
    with state["db"].connection_context():
        if not state["sessions_ready"]:
            sessions.ensure_tables(state["db"])
            state["sessions_ready"] = True
        yield state["db"]


def is_authorized(token: str) -> bool:
    """True when no token is set, or the request has it as a bearer token or carries the login cookie."""
    if access.is_authorized(request.headers.get("Authorization"), token):
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), _cookie_value(token).encode())


def login():
    """The login form; a right token sets the cookie and goes back to the page asked for. An address with too many
    recent failures gets 429 and Retry-After, whatever token it sends."""
    token = current_app.config["ADMIN_TOKEN"]
    target = request.values.get("next", "")
    target = target if target.startswith("/analytics") and "//" not in target and "\\" not in target else ""
    if request.method != "POST" or not token:
        return _login_page(target, "", 401 if request.method == "POST" else 200)
    forwarded, trusted = request.headers.get("X-Forwarded-For"), current_app.config["TRUSTED_PROXIES"]
    address = access.client_address(request.remote_addr or "", forwarded, trusted)
    with _signin_store() as db:
        wait = sessions.admit(db, address, state_of(current_app).dashboard["clock"]())
        if wait:
            message = f"Too many failed sign-ins from your address; try again in {wait} s."
            return _login_page(target, message, 429, {"Retry-After": str(wait)})
        if not hmac.compare_digest(request.form.get("token", "").encode(), token.encode()):
            return _login_page(target, "Wrong token.", 401)
        sessions.forget(db, address)
        value = sessions.cookie_value(db, token)
    response = redirect(target or url_for("dashboard.index"))
    response.set_cookie(COOKIE, value, httponly=True, samesite="Strict", path="/analytics", secure=request.is_secure)
    return response


def _login_page(target: str, message: str, status: int, headers: dict | None = None):
    return render_template("dashboard.html", page="login", next=target, message=message), status, headers or {}


def logout():
    """Forget the login cookie in this browser."""
    response = redirect(url_for("dashboard.login"))
    response.delete_cookie(COOKIE, path="/analytics")
    return response


def logout_everywhere():
    """Rotate the session secret: every login cookie, in every browser, is refused from now on."""
    with _signin_store() as db:
        sessions.rotate(db)
    return logout()
