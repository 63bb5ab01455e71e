"""The proxy's parts in one Flask app: one ``ProxyState`` in ``app.extensions``, where ``create_app`` wires each part
and every other part finds it again (``state_of(app).writer``).

It holds references only: each part builds its own object in its ``init_app`` and sets its field. The fields are
typed loosely because the core imports no other layer; each field's comment names what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KEY = "ollama_proxy"  # the app.extensions key


@dataclass(slots=True)
class ProxyState:
    """Every part of one app; a part's field is None until its init_app has run (create_app's order)."""

    shutdown_hooks: list = field(default_factory=list)  # callables run last to first by proxy_app.shutdown
    call_sinks: list = field(default_factory=list)  # callables each finished Call goes to, in order
    before_relay: list = field(default_factory=list)  # callables run before each relayed call
    health_checks: dict = field(default_factory=dict)  # name -> callable returning a dict with an "ok" key
    load_sampler: Any = None  # ops.sampler.LoadSampler
    probe_session: Any = None  # the requests session of the upstream probe (ops)
    writer: Any = None  # store.writer.Writer
    dashboard: Any = None  # the dashboard's database handle and read model (dashboard.views)
    upstream_pool: Any = None  # relay.upstream.Pool
    gate: Any = None  # relay.gate.Gate
    in_flight: Any = None  # relay.gate.InFlight
    body_budget: Any = None  # relay.gate.ByteBudget: request-body bytes in memory
    relay: Any = None  # relay.middleware.Relay, in front of Flask
    metrics: Any = None  # ops.metrics.Metrics
    metrics_tickers: Any = None  # the metrics' background samplers
    http_metrics: Any = None  # prometheus-flask-exporter's metrics of the proxy's own routes
    drain: Any = None  # relay.drain.Drain
    residency: Any = None  # ops.residency's poller
    otel: Any = None  # ops.otel's sink, with OTEL on
    keys: Any = None  # store.keystore.Keys: the API key ring and the limiter

    def run_before_relay(self) -> None:
        """Run the before_relay hooks: each makes sure one of this process's background threads runs."""
        for hook in self.before_relay:
            hook()


def state_of(app) -> ProxyState:
    """The ProxyState of ``app`` (create_app puts it in ``app.extensions``)."""
    return app.extensions[KEY]
