"""Prometheus metrics: the objects (on an injected registry), ``observe(call)``, and per-process samplers.

A ``Call`` is counted once, by the relay's end-of-call sink, so a stream is timed to its last byte. Labels are bounded
(labels.py: endpoints, and models and key names capped). Under gunicorn, multiprocess mode sums every
worker's files at scrape time. This module imports no Flask and registers no route (health.py serves ``/metrics``
through exposition.py's ``scrape``); the exporter times our own endpoints only, never the relay.
"""

from __future__ import annotations

import os
import platform
import threading
from functools import partial

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import disable_created_metrics

from proxy_app import __version__
from proxy_app.calls import Call
from proxy_app.ops.exposition import make_ticker, probe, refresh
from proxy_app.ops.labels import NO_KEY, BoundedLabels, endpoint_label
from proxy_app.state import state_of

# Why: a cold model load plus a long generation takes minutes; the issue asks for buckets up to at least 300 s.
CALL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Why: time to first token, model load, prompt eval and queue wait run from milliseconds (warm) to minutes (cold).
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TOKEN_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000)
SPEED_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 500)  # output tokens per second of decode


class Metrics:
    """Every metric of one app on one registry; ``observe`` is the relay's call sink, the rest feed gauges."""

    def __init__(self, registry: CollectorRegistry, max_models: int, has_queue: bool, has_otel: bool = False) -> None:
        self.registry = registry
        self.models = BoundedLabels(max_models)
        self.keys = BoundedLabels(max_models, missing=NO_KEY)  # as many key names as model names
        self._lock = threading.Lock()
        self._counted: dict[str, tuple[int | None, float]] = {}  # source -> (pid, value already counted)
        self._children: dict[tuple, object] = {}  # (metric, label values) -> its series
        self._add_call_metrics(registry)
        self._add_proxy_metrics(registry, has_queue)
        self._add_residency_metrics(registry)
        dropped = "ollama_proxy_otel_dropped_total", "Spans never delivered to the OTLP collector"
        self.otel_dropped = Counter(*dropped, registry=registry) if has_otel else None

    def _add_call_metrics(self, registry: CollectorRegistry) -> None:
        counter, histogram = partial(Counter, registry=registry), partial(Histogram, registry=registry)
        by_call, by_model = ("model", "endpoint"), ("model",)  # label names: the Call's own field names
        by_key = (*by_call, "key")  # the counters a key's use is read from: the key's name, never the key
        self.requests = counter("ollama_requests_total", "Finished calls", (*by_call, "status", "outcome", "key"))
        self.request_duration = histogram(
            "ollama_request_duration_seconds", "Arrival to last byte", by_call, buckets=CALL_BUCKETS
        )
        self.ttft = histogram(
            "ollama_time_to_first_token_seconds", "Arrival to first content", by_call, buckets=STEP_BUCKETS
        )
        self.tokens_generated = histogram(
            "ollama_tokens_generated", "Output tokens per call", by_model, buckets=TOKEN_BUCKETS
        )
        self.tokens_per_second = histogram("ollama_tokens_per_second", "Decode speed", by_model, buckets=SPEED_BUCKETS)
        self.prompt_tokens = counter("ollama_prompt_tokens_total", "Input tokens", by_key)
        self.completion_tokens = counter("ollama_completion_tokens_total", "Output tokens", by_key)
        self.cached_prompt_tokens = counter("ollama_cached_prompt_tokens_total", "Cached input tokens", by_key)
        self.load_duration = histogram(
            "ollama_load_duration_seconds", "Model load time, as Ollama reports it", by_model, buckets=STEP_BUCKETS
        )
        self.prompt_eval_duration = histogram(
            "ollama_prompt_eval_duration_seconds", "Prompt evaluation time, as Ollama reports it", by_model,
            buckets=STEP_BUCKETS,
        )  # fmt: skip

    def _add_proxy_metrics(self, registry: CollectorRegistry, has_queue: bool) -> None:
        counter, gauge, histogram = (partial(kind, registry=registry) for kind in (Counter, Gauge, Histogram))
        # Why live*: a dead worker's calls are no longer in flight or queued, and its memory is freed.
        live_sum = partial(gauge, multiprocess_mode="livesum")
        latest = partial(gauge, multiprocess_mode="livemostrecent")
        self.active_requests = live_sum("ollama_active_requests", "Calls in flight, queued ones included")
        self.queue_wait = self.queue_depth = None
        if has_queue:
            self.queue_wait = histogram(
                "ollama_queue_wait_seconds", "Time a call waited for a slot", buckets=STEP_BUCKETS
            )
            self.queue_depth = live_sum("ollama_queue_depth", "Calls waiting for a slot")
        self.upstream_up = latest("ollama_upstream_up", "1 if the last upstream probe succeeded, else 0")
        self.probe_duration = latest("ollama_upstream_probe_duration_seconds", "How long the last upstream probe took")
        self.analytics_depth = live_sum("ollama_analytics_queue_depth", "Calls waiting to be stored")
        self.rows_written = counter("ollama_analytics_rows_written_total", "Rows stored")
        self.rows_dropped = counter("ollama_analytics_rows_dropped_total", "Rows dropped (queue full or database down)")
        self.cpu_seconds = counter("ollama_proxy_process_cpu_seconds_total", "User and system CPU time")
        self.resident_memory = live_sum("ollama_proxy_process_resident_memory_bytes", "Resident memory")
        build = gauge("ollama_proxy_build_info", "Proxy version", ("version", "python"), multiprocess_mode="livemax")
        build.labels(__version__, platform.python_version()).set(1)

    def _add_residency_metrics(self, registry: CollectorRegistry) -> None:
        # Why livemostrecent: one process polls /api/ps and sets these (residency.py); its latest value is the
        # deployment's, and a dead poller's values go with it (the next one sets its own).
        gauge = partial(Gauge, labelnames=("model",), registry=registry, multiprocess_mode="livemostrecent")
        self.model_loaded = gauge("ollama_model_loaded", "1 while the upstream holds the model in memory, else 0")
        self.model_size = gauge("ollama_model_size_bytes", "Memory a loaded model takes, as /api/ps says")
        self.model_vram = gauge("ollama_model_vram_bytes", "The part of it in VRAM, as /api/ps says")
        self.model_context = gauge("ollama_model_context_length", "Context length the model is loaded with")
        self.model_loads = Counter("ollama_model_loads_total", "Model loads seen in /api/ps", ("model",),
                                   registry=registry)  # fmt: skip
        self.model_load_seconds = Histogram(
            "ollama_model_load_seconds", "load_duration of calls that loaded their model (cold_start)", ("model",),
            buckets=STEP_BUCKETS, registry=registry,
        )  # fmt: skip

    def set_residency(self, loaded: dict[str, dict], gone: list[str]) -> None:
        """Set the residency gauges from one /api/ps answer: ``loaded`` name -> entry, ``gone`` names now unloaded."""
        for name, entry in loaded.items():
            model = self.models.label(name, True)
            self.model_loaded.labels(model).set(1)
            for gauge, key in ((self.model_size, "size_bytes"), (self.model_vram, "vram_bytes"),
                               (self.model_context, "context_length")):  # fmt: skip
                if entry.get(key) is not None:
                    gauge.labels(model).set(entry[key])
        for name in gone:
            model = self.models.label(name, True)
            if model not in {self.models.label(other, True) for other in loaded}:  # 'other' may still hold one
                for gauge in (self.model_loaded, self.model_size, self.model_vram):
                    gauge.labels(model).set(0)

    def count_load(self, name: str) -> None:
        """Count one load of ``name`` seen in /api/ps."""
        self.model_loads.labels(self.models.label(name, True)).inc()

    def observe_load(self, name: str, seconds: float) -> None:
        """Observe the load time a call paid (its load_duration)."""
        self._series(self.model_load_seconds, self.models.label(name, True)).observe(seconds)

    def observe(self, call: Call) -> None:
        """Count one finished call: totals, durations, tokens and Ollama's own timings (unknown values are skipped)."""
        is_success = call.http_status < 400 and call.outcome != "upstream_error"
        model, endpoint = self.models.label(call.model, is_success), endpoint_label(call.endpoint)
        # A key_name is the name of a key the proxy verified, never text a client chose: any call may admit it.
        key = self.keys.label(call.key_name, True)
        series = self._series
        series(self.requests, model, endpoint, str(call.http_status), call.outcome, key).inc()
        series(self.request_duration, model, endpoint).observe(call.total_time_ms / 1000)
        self._observe_ms(self.ttft, (model, endpoint), call.ttft_ms)
        self._observe_ms(self.load_duration, (model,), call.load_duration_ms)
        self._observe_ms(self.prompt_eval_duration, (model,), call.prompt_eval_duration_ms)
        if call.input_tokens is not None:
            series(self.prompt_tokens, model, endpoint, key).inc(call.input_tokens)
        if call.cached_input_tokens is not None:  # absent unless the answer says: a series only where it does
            series(self.cached_prompt_tokens, model, endpoint, key).inc(call.cached_input_tokens)
        if call.output_tokens is not None:
            series(self.completion_tokens, model, endpoint, key).inc(call.output_tokens)
            series(self.tokens_generated, model).observe(call.output_tokens)
        if call.tokens_per_second is not None:
            series(self.tokens_per_second, model).observe(call.tokens_per_second)
        if self.queue_wait is not None:
            self.queue_wait.observe(call.queue_time_ms / 1000)

    def _observe_ms(self, histogram: Histogram, labels: tuple, milliseconds: float | None) -> None:
        """Observe a duration given in ms; an unknown one (None) creates no series."""
        if milliseconds is not None:
            self._series(histogram, *labels).observe(milliseconds / 1000)

    def _series(self, metric, *labels: str):
        """``metric.labels(*labels)``, remembered: prometheus_client validates and locks on every labels() call.
        As many are kept as the registry holds anyway (labels are bounded), and only a call creates one."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record_probe(self, is_up: bool, seconds: float) -> None:
        """Set the upstream gauges from one probe."""
        self.upstream_up.set(1 if is_up else 0)
        self.probe_duration.set(round(seconds, 6))

    def sample_process(self) -> None:
        """Set this process's memory and add its CPU time since the last sample (counters only go up, per process)."""
        process = psutil.Process()
        times = process.cpu_times()
        self._count_since("cpu", self.cpu_seconds, times.user + times.system)
        self.resident_memory.set(process.memory_info().rss)

    def copy_writer(self, writer) -> None:
        """Copy the analytics writer's ``written``/``dropped`` totals and ``depth`` into metrics (None: no writer)."""
        if writer is None:
            return
        for name, counter in (("written", self.rows_written), ("dropped", self.rows_dropped)):
            total = _read(writer, name)
            if total is not None:
                self._count_since(name, counter, total)
        depth = _read(writer, "depth")
        if depth is not None:
            self.analytics_depth.set(depth)

    def copy_otel(self, otel) -> None:
        """Copy the OpenTelemetry export's ``dropped`` total into metrics (None: OTEL is off)."""
        if otel is not None and self.otel_dropped is not None:
            self._count_since("otel_dropped", self.otel_dropped, otel.dropped)

    def _count_since(self, source: str, counter: Counter, total: float) -> None:
        """Add to ``counter`` what ``total`` grew by since last time in this process (a fresh process starts at 0)."""
        with self._lock:
            pid, counted = self._counted.get(source, (None, 0.0))
            if pid != os.getpid() or total < counted:  # forked, or the source was replaced: count from zero
                counted = 0.0
            if total > counted:
                counter.inc(total - counted)
            self._counted[source] = (os.getpid(), total)


def _read(source, name: str) -> float | None:
    """Return a numeric attribute (or the result of a method) of ``source``; None if it has none."""
    value = getattr(source, name, None)
    value = value() if callable(value) else value
    return value if isinstance(value, int | float) else None


def make_metrics(
    registry: CollectorRegistry = REGISTRY, max_models: int = 100, has_queue: bool = False, has_otel: bool = False
) -> Metrics:
    """Build every metric on ``registry`` (tests pass a fresh ``CollectorRegistry()``)."""
    disable_created_metrics()  # why: multiprocess mode cannot export *_created, so neither mode does
    return Metrics(registry, max_models, has_queue, has_otel)


def init_app(app) -> None:
    """Build this app's metrics, hook them to the relay's counts and sinks, and time our own endpoints."""
    config, gate = app.config, state_of(app).gate
    # Why a registry per app: tests build many apps in one process; in multiprocess mode the files count instead.
    registry = CollectorRegistry(auto_describe=True)
    collected = make_metrics(registry, config["MAX_MODELS"], has_queue=bool(gate.limit), has_otel=config["OTEL"])
    state_of(app).metrics = collected
    state_of(app).call_sinks.insert(0, collected.observe)
    state_of(app).in_flight.watcher = collected.active_requests.inc
    if collected.queue_depth is not None:
        gate.depth_watcher = collected.queue_depth.inc
    sampler = make_ticker("metrics-sampler", lambda: refresh(app), config["SAMPLE_INTERVAL"])
    prober = make_ticker("upstream-prober", lambda: probe(app), config["PROBE_INTERVAL"])
    state_of(app).metrics_tickers = (sampler, prober)
    state_of(app).shutdown_hooks.extend([sampler.stop, prober.stop])
    app.before_request(sampler.ensure)  # our own routes; returns None, so the request goes on
    state_of(app).before_relay.append(sampler.ensure)  # relayed calls, which Flask does not see
    _time_own_endpoints(app, registry)


def _time_own_endpoints(app, registry: CollectorRegistry) -> None:
    """prometheus-flask-exporter's per-endpoint HTTP metrics for our routes (relayed calls never reach Flask)."""
    from prometheus_flask_exporter import PrometheusMetrics

    state_of(app).http_metrics = PrometheusMetrics(
        app, path=None, registry=registry, group_by="endpoint", defaults_prefix="ollama_proxy"
    )
