"""Blueprint ``dashboard`` at /analytics: the page, the JSON stats and search APIs, one call, and the CSV export.

Each view builds one dict and renders it as a template or as JSON. Bad parameters get 400 with the reason. With
ADMIN_TOKEN set, everything but the login form, the static script and /analytics/me (which takes an API key
instead: me.py) needs the token (bearer header, or the cookie the login form sets); signing in and out is
signin.py's, on this blueprint. Every response carries a Content-Security-Policy without inline script. This module
does not write rows or compute figures (queries.py, stats.py, keyusage.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import UTC, datetime

import jinja2
from flask import Blueprint, Flask, Response, current_app, g, render_template, request

from proxy_app.calls import COLUMNS, OUTCOMES
from proxy_app.dashboard import (
    charts,
    formats,
    keyusage,
    me,
    queries,
    readmodel,
    residency,
    sessions,
    signin,
    stats,
    timeline,
)
from proxy_app.dashboard.filters import FilterError, parse_filters
from proxy_app.state import state_of
from proxy_app.store import export, models

log = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__, url_prefix="/analytics", static_folder="static", static_url_path="/static")
for _name, _filter in formats.FILTERS.items():  # for every template: "num", "ms", "when"…
    bp.add_app_template_filter(_filter, _name)
bp.register_blueprint(me.bp)  # /analytics/me: nested, so this module's headers apply to it
signin.add_routes(bp)  # /analytics/login, /logout, /logout-everywhere: on this blueprint, named dashboard.login…

# Why: the proxy's own routes take at most a login form; a bigger body is refused (413) from its Content-Length
# before a byte of it is read. Relayed calls never build a Flask request, so MAX_BODY_BYTES alone limits those.
OWN_BODY_BYTES = 64 * 1024
# Reachable without the token; /analytics/me asks for an API key instead (me.py).
OPEN_ENDPOINTS = ("dashboard.login", "dashboard.static", "dashboard.me.show")


class TemplateCode(jinja2.BytecodeCache):
    """Compiled templates kept in memory for the whole process, keyed by name and source checksum (Jinja's bucket
    key): every app the process creates after the first reuses them instead of compiling them again."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        if bucket.key in self._code:
            bucket.bytecode_from_string(self._code[bucket.key])

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()


TEMPLATE_CODE = TemplateCode()
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'nonce-{nonce}'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def init_app(app: Flask) -> None:
    """Register the blueprint, create the read model's tables, plan the refresher's shutdown and limit the bodies
    that the proxy's own (Flask) routes read."""
    app.config["MAX_CONTENT_LENGTH"] = OWN_BODY_BYTES
    app.jinja_options = {**app.jinja_options, "bytecode_cache": TEMPLATE_CODE}  # before anything creates jinja_env
    db = models.database.obj or models.open_database(app.config["DATABASE"])
    refresher = readmodel.Refresher(db)
    state_of(app).dashboard = {"db": db, "refresher": refresher, "clock": time.time, "sessions_ready": False}
    state_of(app).shutdown_hooks.append(refresher.stop)
    try:
        refresher.ready = readmodel.ensure_read_model(db)
    except Exception as exc:  # a locked or unreachable database: the refresher tries again on first use
        log.warning("cannot prepare the dashboard's read model yet: %s", exc)
    try:
        if app.config["ADMIN_TOKEN"]:
            sessions.ensure_tables(db)
            state_of(app).dashboard["sessions_ready"] = True
    except Exception as exc:  # as above: the first sign-in tries again
        log.warning("cannot prepare the dashboard's sign-in tables yet: %s", exc)
    finally:
        db.close()  # never carry a connection across gunicorn's fork
    app.register_blueprint(bp)
    for name in ("base.html", "_macros.html", "dashboard.html", "me.html"):
        app.jinja_env.get_template(name)  # compiled now, so that the first page view does not wait for it


def _db():
    return state_of(current_app).dashboard["db"]


# ---- access and headers ------------------------------------------------------------------------------------------


@bp.before_request
def _guard():
    g.csp_nonce = secrets.token_urlsafe(16)
    if request.endpoint in OPEN_ENDPOINTS or signin.is_authorized(current_app.config["ADMIN_TOKEN"]):
        state_of(current_app).dashboard["refresher"].ensure_running()
        return None
    if _wants_json(default=request.endpoint != "dashboard.index"):
        response = _json({"error": "unauthorized"}, 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return render_template("dashboard.html", page="login", next=request.full_path), 401


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP.format(nonce=g.get("csp_nonce", "none"))
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.errorhandler(FilterError)
def _bad_filter(error: FilterError):
    return _render({"error": str(error)}, "error", default_json=request.endpoint != "dashboard.index", status=400)


def _wants_json(default: bool) -> bool:
    """Choose the rendering: ?format=json|html wins, then an Accept header naming one of them, then ``default``."""
    chosen = request.args.get("format", "")
    if chosen in ("json", "html"):
        return chosen == "json"
    accept = request.accept_mimetypes
    named = {value for value, _ in accept} & {"application/json", "text/html"}
    if not named:
        return default  # curl and most clients send */*
    return accept.best_match(sorted(named)) == "application/json"


def _json(document: dict, status: int = 200) -> Response:
    """JSON with keys in the order built (rows keep the COLUMNS order; Flask's jsonify would sort them)."""
    body = current_app.json.dumps(document, sort_keys=False)
    return Response(body + "\n", status=status, mimetype="application/json")


def _render(document: dict, page: str, default_json: bool = False, status: int = 200):
    """Render one view's dict as JSON or through dashboard.html."""
    if _wants_json(default_json):
        return _json(document, status)
    return render_template("dashboard.html", page=page, **document), status


# ---- views -------------------------------------------------------------------------------------------------------


@bp.route("", strict_slashes=False)
def index():
    """The page: cards, charts, per-model table and one page of calls, for the filters in the URL."""
    filters = parse_filters(request.args)
    db = _db()
    with db.connection_context():
        figures = _with_keys(db, filters, stats.stats(db, filters))
        found = queries.search(db, filters)
        suggestions = stats.choices(db, filters)
        panel = residency.loaded_and_events(db, filters) if not _wants_json(False) else None  # the page's panel only
    document = {
        "stats": figures,
        "search": found,
        "choices": suggestions,
        "outcomes": OUTCOMES,
        "filters": filters.describe(),
        "admin": bool(current_app.config["ADMIN_TOKEN"]),
    }
    if _wants_json(False):
        return _json(document)
    return render_template(
        "dashboard.html",
        page="index",
        charts=charts.make_charts(figures),
        query=filters,
        residency=panel,
        timeline=_timeline(panel, figures),
        **document,
    )


@bp.route("/stats")
def stats_view():
    """JSON: the numbers behind the cards, the per-model and per-key tables and the time series."""
    filters = parse_filters(request.args)
    with _db().connection_context():
        return _json(_with_keys(_db(), filters, stats.stats(_db(), filters)))


def _with_keys(db, filters, figures: dict) -> dict:
    """The stats document with the by-key table (``by_key``): calls, errors and tokens per key, and limits' spend."""
    return {**figures, "by_key": keyusage.by_key(db, filters, state_of(current_app).keys)}


@bp.route("/search")
def search():
    """JSON: {"results": [rows], "count": N, "next": cursor}; ``q`` searches prompt and response preview."""
    filters = parse_filters(request.args)
    with _db().connection_context():
        found = queries.search(_db(), filters)
    return _json({**found, "filters": filters.describe()})


@bp.route("/models")
def models_view():
    """JSON: {"loaded": the models loaded now by the stored events, "events": load/unload events in the range}."""
    filters = parse_filters(request.args)
    with _db().connection_context():
        cold_starts = models.cold_starts(_db(), filters.since, filters.until)
        return _json(
            {**residency.loaded_and_events(_db(), filters), "cold_starts": cold_starts, "filters": filters.describe()}
        )


def _timeline(panel: dict, figures: dict) -> dict:
    """The page's chart of load/unload events over the range the stats cover."""
    span, events, loaded = figures["range"], panel["events"], panel["loaded"]
    return timeline.model_timeline(
        "Model loads and unloads", events, loaded, span["since"], span["until"] or span["now"]
    )


@bp.route("/calls/<path:request_id>")
def call(request_id: str):
    """One stored call, every field: HTML for a browser, JSON otherwise; 404 when unknown."""
    with _db().connection_context():
        row = queries.get_call(_db(), request_id)
    if row is None:
        return _render({"error": f"no stored call has request_id {request_id[:80]!r}"}, "error", True, 404)
    return _render({"call": row, "columns": COLUMNS}, "call", default_json=True)


@bp.route("/export.csv")
def export_csv():
    """Stream every row matching the filters as CSV (the mirror's columns, formula cells neutralised)."""
    filters = parse_filters(request.args)
    db = _db()

    def generate():
        with db.connection_context():  # opened in the thread that streams; closed when the download ends
            yield from export.iter_csv(queries.iter_chunks(db, filters))

    name = f"ollama-proxy-calls-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(generate(), mimetype="text/csv", headers=headers)


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def not_found(rest: str):
    """Any other path under /analytics: 404 from us, never relayed to Ollama."""
    return _render({"error": "there is no such page under /analytics"}, "error", default_json=True, status=404)
