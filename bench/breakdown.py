"""Where a non-streaming call's CPU goes: the proxy app called in-process (no server), part by part.

Calls the WSGI app directly, one call at a time, against the fast fake upstream, and reads CPU time: the calling
thread's for the relay, the whole process's (writer thread included, after ``flush``) for full analytics. Each
configuration removes one part, so the differences are the parts' costs. Server costs (gunicorn, waitress) are not
here; the main run measures them. Run alone: ``python -m bench.breakdown``.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time

from bench import client, targets
from proxy_app.state import state_of

CALLS = 2000


def _environ(body: bytes, tokens: int) -> dict:
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": client.GENERATE, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json", "HTTP_HOST": "127.0.0.1",
        "HTTP_USER_AGENT": "bench", "HTTP_X_FAKE_TOKENS": str(tokens), "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "wsgi.version": (1, 0),
    }  # fmt: skip


def call_app(app, body: bytes, tokens: int = 5, headers: dict | None = None) -> None:
    """One /api/generate call through the WSGI app, its answer read to the end (``tokens``: the fake's knob;
    ``headers``: more environ entries, e.g. ``HTTP_AUTHORIZATION``)."""
    body_iter = app({**_environ(body, tokens), **(headers or {})}, lambda status, headers, exc_info=None: None)
    for _ in body_iter:
        pass
    if hasattr(body_iter, "close"):
        body_iter.close()


def _cpu_per_call(app, body: bytes, calls: int) -> tuple[float, float]:
    """(calling thread µs, whole process µs incl. the writer's flush) per call."""
    for _ in range(50):
        call_app(app, body)
    writer = state_of(app).writer
    if writer is not None:
        writer.flush(30)
    thread, process = time.thread_time(), time.process_time()
    for _ in range(calls):
        call_app(app, body)
    thread = time.thread_time() - thread
    if writer is not None:
        writer.flush(60)
    return thread / calls * 1e6, (time.process_time() - process) / calls * 1e6


def run(calls: int = CALLS, rounds: int = 3) -> dict:
    """Measure each configuration on one app (sinks swapped in place), interleaved ``rounds`` times; medians, µs."""
    from werkzeug.wrappers import Response

    from proxy_app import create_app, shutdown
    from proxy_app.relay.forward import forward

    upstream = targets.start_upstream()
    body = client.generate_body(stream=False)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING"}, environ={})
            sinks, relay = list(state_of(app).call_sinks), state_of(app).relay
            no_writer = [sink for sink in sinks if getattr(sink, "__self__", None) is not state_of(app).writer]
            for _ in range(rounds):
                for name, chosen in (("full_analytics", sinks), ("no_writer", no_writer), ("relay_only", [])):
                    state_of(app).call_sinks[:] = chosen
                    samples.setdefault(name, []).append(_cpu_per_call(app, body, calls))
                relay.forward = lambda app, req: Response(b"x" * 500, content_type="application/json")
                samples.setdefault("dispatch_only", []).append(_cpu_per_call(app, body, calls))
                relay.forward = forward
                samples.setdefault("upstream_round_trip_only", []).append(_round_trip_only(app, body, calls))
            state_of(app).call_sinks[:] = sinks
            shutdown(app)
    finally:
        upstream.stop()
    return {name: {"thread_us": round(statistics.median(s[0] for s in values)),
                   "process_us": round(statistics.median(s[1] for s in values))}
            for name, values in samples.items()}  # fmt: skip


def _round_trip_only(app, body: bytes, calls: int) -> tuple[float, float]:
    pool, headers = state_of(app).upstream_pool, {**client.knobs(5), "Content-Length": str(len(body))}
    thread, process = time.thread_time(), time.process_time()
    for _ in range(calls):
        answer = pool.request("POST", client.GENERATE, body, headers)
        answer.read()
        pool.release(answer)
    return (time.thread_time() - thread) / calls * 1e6, (time.process_time() - process) / calls * 1e6


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
