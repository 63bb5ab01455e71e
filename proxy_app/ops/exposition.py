"""The scrape side of the Prometheus metrics: sampling and probing on a timer, and rendering a registry.

``scrape`` answers ``/metrics`` (health.py serves the route): it makes sure this process's sampler and upstream
prober run, refreshes the process's figures, then renders. Under gunicorn, multiprocess mode renders every worker's
files instead of this process's registry. The metric objects and ``observe`` stay in metrics.py, whose ``init_app``
builds the tickers here; this module imports no Flask and reads the metrics through ``state_of(app)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, multiprocess, values
from prometheus_client.exposition import choose_encoder

from proxy_app.ops.probe import probe_upstream
from proxy_app.state import state_of
from proxy_app.ticker import Ticker

log = logging.getLogger(__name__)

FIRST_PROBE_WAIT = 2.5  # seconds the first scrape in a process waits for the first upstream probe (connect timeout 2 s)


def is_multiprocess() -> bool:
    """True when prometheus_client writes values to PROMETHEUS_MULTIPROC_DIR (decided when it was imported)."""
    # prometheus_client has no public flag for its mode: at import it sets values.ValueClass to MutexValue (one
    # process) or to a class of files (multiprocess). Both names are public; this is the one place that asks.
    return values.ValueClass is not values.MutexValue


def expose(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """Render ``registry`` in the format ``accept`` asks for; in multiprocess mode, every worker's files instead."""
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def make_ticker(name: str, task: Callable[[], None], interval: float) -> Ticker:
    """A Ticker that runs ``task`` every ``interval`` seconds, from its first use on; a failed run is logged and the
    next one comes on time (a sample must not end the thread, or every request would start a new one)."""

    def run_once() -> None:
        try:
            task()
        except Exception:
            log.exception("%s failed", name)

    return Ticker(name, run_once, interval)


def refresh(app) -> None:
    """Sample this process and copy the writer's counts now (each scrape, and every SAMPLE_INTERVAL)."""
    collected = state_of(app).metrics
    collected.sample_process()
    collected.copy_writer(state_of(app).writer)
    collected.copy_otel(state_of(app).otel)


def probe(app) -> None:
    """Probe the upstream once and record whether it answered and how long the probe took."""
    started = time.perf_counter()
    result = probe_upstream(app.config["UPSTREAM"], state_of(app).probe_session)
    state_of(app).metrics.record_probe(result["reachable"], time.perf_counter() - started)


def scrape(app, accept: str | None = None) -> tuple[bytes, str]:
    """Answer a scrape: make sure this process samples and probes, refresh it now, then render."""
    sampler, prober = state_of(app).metrics_tickers
    sampler.ensure()
    prober.ensure(wait=FIRST_PROBE_WAIT)
    refresh(app)
    return expose(state_of(app).metrics.registry, accept)
