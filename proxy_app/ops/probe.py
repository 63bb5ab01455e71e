"""The upstream probe: ``GET /api/version`` on an Ollama, for /health, /test, the upstream gauge, ``check`` and the
supervisor's readiness wait.

It never raises and never goes through an HTTP_PROXY from the environment (the relay does not either). It keeps no
state and imports nothing of ours, so the service may use it before any app exists.
"""

from __future__ import annotations

import time

import requests

PROBE_TIMEOUT = (2.0, 5.0)  # connect, read: a health check must answer quickly even when the upstream hangs


def open_session() -> requests.Session:
    """Return a requests session for probes: straight to the upstream, whatever HTTP_PROXY says."""
    session = requests.Session()
    session.trust_env = False
    return session


def probe_upstream(url: str, session: requests.Session | None = None, timeout=PROBE_TIMEOUT) -> dict:
    """Ask the upstream at ``url`` for its version: {url, reachable, latency_ms, version, error}.

    ``version`` is None unless the answer names one; ``error`` is None, "HTTP <status>" or "<exception type>: <what>".
    Without a ``session``, a new one is opened and closed.
    """
    started = time.perf_counter()
    own = session is None
    session = open_session() if own else session
    try:
        answer = session.get(url + "/api/version", timeout=timeout)
        latency = round((time.perf_counter() - started) * 1000, 3)
        document = answer.json() if answer.ok else {}
        version = document.get("version") if isinstance(document, dict) else None
        ok = answer.ok
        error = None if ok else f"HTTP {answer.status_code}"
    except (requests.RequestException, ValueError) as exc:
        latency, version, ok, error = None, None, False, f"{type(exc).__name__}: {exc}"
    finally:
        if own:
            session.close()
    version = version if isinstance(version, str) else None
    return {"url": url, "reachable": ok, "latency_ms": latency, "version": version, "error": error}
