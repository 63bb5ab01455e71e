"""The Ollama analytics proxy: ``create_app`` wires every part; nothing starts at import."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from proxy_app import config as config_module
from proxy_app import state as state_module
from proxy_app.access import is_loopback

# Our own routes. Everything else (/, /api/*, /v1/*, any future path) belongs to Ollama and is relayed.
RESERVED_PATHS = ("/health", "/test", "/metrics", "/analytics")

__version__ = "0.1.0"


def create_app(overrides: dict | None = None, environ: dict | None = None) -> Flask:
    """Build the app: settings from defaults, then .env and env (or ``environ``), then ``overrides``."""
    settings = config_module.merge(overrides, environ)
    app = Flask(__name__, template_folder=str(templates_folder()), static_folder=None)
    app.config.update(settings)
    app.extensions[state_module.KEY] = state_module.ProxyState()  # each part's init_app below sets its field
    logging.basicConfig(level=settings["LOG_LEVEL"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_if_exposed(settings)

    from proxy_app.ops import health, otel, sampler
    from proxy_app.relay import forward

    sampler.init_app(app)  # the CPU and memory load each row carries, sampled from a process's first call on
    health.init_app(app)
    otel.init_app(app)  # with OTEL: a call sink sending GenAI spans and metrics; shut down after the writer's flush
    from proxy_app.store import startup

    startup.init_app(app)  # the analytics store: a call sink, a shutdown hook and the `writer` health check
    from proxy_app.store import keystore

    keystore.init_app(app)  # API keys and their shared counters, in the same database; the relay checks them
    from proxy_app.dashboard import views

    views.init_app(app)  # /analytics: page, JSON APIs, CSV export; after the writer, whose database it reads
    forward.init_app(app)  # in front of Flask: every path but RESERVED_PATHS goes to the upstream
    from proxy_app.ops import metrics

    metrics.init_app(app)  # after the relay, whose in-flight count and queue it watches; it adds no route
    from proxy_app.ops import residency
    from proxy_app.store import models

    residency.init_app(app, models.ModelEventStore())  # /api/ps poller: gauges, and load/unload events stored
    from proxy_app.relay import drain
    from proxy_app.service import supervisor

    supervisor.init_app(app)  # with WITH_OLLAMA, the supervised Ollama's state shows in /health
    drain.init_app(app)  # after the relay: at shutdown it waits on the in-flight count, then cuts streams
    return app


def templates_folder() -> Path:
    """The page templates: inside the package when installed from a wheel, else the checkout's ``templates/``."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def warn_if_exposed(settings) -> str | None:
    """Log and return a warning when HOST is not loopback and no ADMIN_TOKEN is set; None when there is none."""
    host = str(settings.get("HOST", "")).strip("[]")
    if is_loopback(host) or settings.get("ADMIN_TOKEN"):
        return None
    message = (
        f"SECURITY: listening on {host or 'every address'}, not loopback, and OLLAMA_PROXY_ADMIN_TOKEN is not set: "
        "anyone who can reach this port can read every stored prompt and answer under /analytics. Set "
        "OLLAMA_PROXY_ADMIN_TOKEN (and OLLAMA_PROXY_METRICS_TOKEN), or listen on 127.0.0.1."
    )
    logging.getLogger(__name__).warning("%s", message)
    return message


def start_background(app: Flask) -> None:
    """Start this process's background threads (the samplers, the residency poller) as it begins to serve, so that
    its first call finds their first figures; each also starts on first use, and again after a fork."""
    state = app.extensions.get(state_module.KEY)
    if state is not None:
        state.run_before_relay()


def shutdown(app: Flask) -> None:
    """Run every part's shutdown hook (flush the writer, stop background threads); safe to call twice."""
    state = app.extensions.get(state_module.KEY)
    for hook in reversed(state.shutdown_hooks if state is not None else []):
        hook()
