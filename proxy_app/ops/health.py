"""Operational endpoints: ``/health`` (is the upstream reachable, are our parts alive), ``/test`` (connectivity)
and ``/metrics`` (Prometheus).

Other modules add their own checks to ``state_of(app).health_checks`` (name -> callable returning a dict with
an ``ok`` key). With ADMIN_TOKEN or METRICS_TOKEN set, ``/health`` and ``/test`` answer anyone with a bare status
and keep the details (the upstream's address and version, the parts' errors) for a caller with either token. This
module does not relay anything.
"""

from __future__ import annotations

import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from proxy_app.access import is_authorized
from proxy_app.ops.exposition import scrape
from proxy_app.ops.probe import PROBE_TIMEOUT, open_session, probe_upstream
from proxy_app.state import state_of

bp = Blueprint("ops", __name__)


def init_app(app: Flask) -> None:
    """Register the blueprint and the requests session used for probes."""
    session = open_session()
    state_of(app).probe_session = session
    state_of(app).shutdown_hooks.append(session.close)
    app.register_blueprint(bp)


@bp.route("/health", methods=["GET"])
def health():
    """200 when the upstream answers and every registered part is alive, else 503; HEAD works too."""
    upstream = probe_upstream(current_app.config["UPSTREAM"], state_of(current_app).probe_session)
    checks = {name: check() for name, check in state_of(current_app).health_checks.items()}
    healthy = upstream["reachable"] and all(check.get("ok", True) for check in checks.values())
    document = {"status": "ok" if healthy else "degraded", "proxy": "up", "upstream": upstream, **checks}
    return jsonify(document if _may_see_details() else {"status": document["status"]}), 200 if healthy else 503


@bp.route("/test", methods=["GET"])
def connectivity_test():
    """Call the upstream and list its models: a one-click check that the proxy can talk to Ollama."""
    session = state_of(current_app).probe_session
    upstream = probe_upstream(current_app.config["UPSTREAM"], session)
    document = {"upstream": upstream, "models": []}
    if upstream["reachable"]:
        try:
            answer = session.get(current_app.config["UPSTREAM"] + "/api/tags", timeout=PROBE_TIMEOUT)
            document["models"] = [model.get("name") for model in answer.json().get("models") or []]
        except (requests.RequestException, ValueError, AttributeError) as exc:
            document["error"] = f"listing models failed: {exc}"
    document["ok"] = upstream["reachable"] and "error" not in document
    return jsonify(document if _may_see_details() else {"ok": document["ok"]}), 200 if document["ok"] else 502


def _may_see_details() -> bool:
    """True when no token is set, or the caller sent the admin or the metrics token as a bearer token."""
    config, header = current_app.config, request.headers.get("Authorization")
    tokens = [token for token in (config["ADMIN_TOKEN"], config["METRICS_TOKEN"]) if token]
    return not tokens or any(is_authorized(header, token) for token in tokens)


@bp.route("/metrics", methods=["GET"])
def metrics():
    """Prometheus exposition (every worker's sum under gunicorn); needs the bearer token when METRICS_TOKEN is set."""
    if not is_authorized(request.headers.get("Authorization"), current_app.config["METRICS_TOKEN"]):
        return Response("unauthorized\n", status=401, mimetype="text/plain", headers={"WWW-Authenticate": "Bearer"})
    body, content_type = scrape(current_app, request.headers.get("Accept"))
    return Response(body, content_type=content_type)
