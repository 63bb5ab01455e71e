"""Model residency: which models the upstream holds in memory, read from its ``/api/ps`` by a background poller.

Each process runs a ``Ticker`` (started by its first call or scrape) that wakes every TICK_SECONDS and polls when
PS_INTERVAL has passed since the last poll (or the start), or at once after a call of this process reported a load
(``cold_start``). Only one process of a deployment polls and records: the one
holding an exclusive lock on ``DATA_DIR/residency.lock`` (each gunicorn worker tries at each tick; when the holder
dies the lock frees and another worker takes over). That process sets the residency gauges and stores load and
unload events through ``store`` (found by diffing successive answers against the models the stored events say are
loaded, so a restart or a new recording process adds no duplicates). A failing or incomplete ``/api/ps`` backs the
poller off and shows in ``/health``; nothing else depends on it. This module stores nothing itself.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from proxy_app import __version__
from proxy_app.calls import Call
from proxy_app.ops.probe import open_session
from proxy_app.state import state_of
from proxy_app.ticker import Ticker

try:
    import fcntl
except ImportError:  # Windows: waitress runs one process, which is always the one that records
    fcntl = None

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # how soon a poll follows a call that paid a load
PS_TIMEOUT = 5.0  # seconds an /api/ps answer may take
MAX_BACKOFF_SECONDS = 300.0  # a failing /api/ps is retried after interval * 2**failures, at most this
MAX_PENDING = 100  # loads reported by calls and not yet seen in /api/ps; an upstream that never shows them is bounded
LOCK_FILE = "residency.lock"
USER_AGENT = f"ollama-proxy-residency/{__version__}"  # names the poller's requests in the upstream's logs


class Residency:
    """The upstream's loaded models (``loaded``: name -> size_bytes, vram_bytes, context_length, expires_at) and the
    poller that keeps them, its gauges and the stored events current."""

    def __init__(self, upstream: str, interval: float, metrics, store, lock_path: Path | None) -> None:
        self.upstream, self.interval, self.metrics, self.store = upstream, interval, metrics, store
        self.lock_path = lock_path
        self.loaded: dict[str, dict] = {}
        self.error: str | None = None  # why the last poll failed; None after a good one
        self.failures = 0
        self.polled_at: datetime | None = None
        self._recorded: dict[str, dict] | None = None  # the loaded set the stored events show; None: not read yet
        self._pending: dict[str, str] = {}  # model -> request_id of the call of this process that loaded it
        self._due = 0.0
        self._lock_file = None
        self._session: requests.Session | None = None
        self._mutex = threading.Lock()
        self._ticker = Ticker("residency-poller", self._tick, TICK_SECONDS if interval else 0,
                              on_start=self._begin, after_fork=self._forget_parent)  # fmt: skip

    def start(self) -> None:
        """Start this process's poller unless it runs; cheap enough for every call."""
        self._ticker.ensure()

    def stop(self) -> None:
        """Stop the poller and close its session (shutdown, tests)."""
        self._ticker.stop(timeout=PS_TIMEOUT + 1)
        if self._session is not None:
            self._session.close()
        if self._lock_file is not None:
            self._lock_file.close()  # another process may record from now on
            self._lock_file = None

    def observe(self, call: Call) -> None:
        """Call sink: a call that paid a load is timed in metrics, remembered for its event, and polls soon."""
        if not call.cold_start or not call.model:
            return
        self.metrics.observe_load(call.model, call.load_duration_ms / 1000)
        with self._mutex:
            if len(self._pending) >= MAX_PENDING:
                self._pending.clear()
            self._pending[_canonical(call.model)] = call.request_id
        self._due = 0.0

    def health(self) -> dict:
        """The poller's state for /health: ok whatever /api/ps does (residency is optional), with its error."""
        return {"ok": True, "interval_seconds": self.interval, "recording": self._lock_file is not None,
                "polled_at": self.polled_at.isoformat() if self.polled_at else None, "error": self.error,
                "failures": self.failures, "loaded": sorted(self.loaded)}  # fmt: skip

    def _begin(self) -> None:
        """Before each new thread: the first poll comes an interval later, or as soon as a call reports a load (so
        a process's first calls never share the upstream with a poll)."""
        self._due = max(self._due, time.monotonic() + self.interval)

    def _tick(self) -> None:
        if time.monotonic() < self._due:
            return
        if not self._is_recorder():
            self._due = time.monotonic() + self.interval
            return
        self.poll()

    def poll(self) -> None:
        """Read /api/ps once, set the gauges and record what changed; on failure back off and keep the error."""
        try:
            current = self._read_ps()
            if self._recorded is None:
                self._recorded = {name: _from_event(row) for name, row in self.store.loaded().items()}
            events = self._diff(self._recorded, current)
            if events:
                self.store.record(events)
        except Exception as exc:
            self.failures += 1
            self.error = f"{type(exc).__name__}: {exc}"
            backoff = min(self.interval * 2**self.failures, MAX_BACKOFF_SECONDS)
            log.warning("the residency poll failed (%s); next try in %.0f s", self.error, backoff)
            self._due = time.monotonic() + backoff
            return
        for event in events:
            if event["event"] == "load":
                self.metrics.count_load(event["model"])
        self.metrics.set_residency(current, [name for name in self._recorded if name not in current])
        self._recorded, self.loaded, self.error, self.failures = current, current, None, 0
        self.polled_at = datetime.now(UTC)
        self._due = time.monotonic() + self.interval

    def _read_ps(self) -> dict[str, dict]:
        """Return name -> entry from /api/ps; raise ValueError when the answer lacks the fields residency needs."""
        if self._session is None:
            self._session = open_session()
            self._session.headers["User-Agent"] = USER_AGENT
        answer = self._session.get(self.upstream + "/api/ps", timeout=PS_TIMEOUT)
        answer.raise_for_status()
        document = answer.json()
        listed = document.get("models") if isinstance(document, dict) else None
        if not isinstance(listed, list):
            raise ValueError("the /api/ps answer has no models list")
        return dict(_entry(item) for item in listed)

    def _diff(self, before: dict[str, dict], now: dict[str, dict]) -> list[dict]:
        """Events from one answer to the next: appeared = load (with the request_id of the call of this process
        that paid it, if any), gone = unload. A poll during a load already shows the model, so a call that reports
        its load later names no event."""
        moment = datetime.now(UTC)
        with self._mutex:
            pending = {name: self._pending.pop(name) for name in list(self._pending) if name in now}
        events = [_event(moment, "unload", name, before[name]) for name in sorted(before) if name not in now]
        events += [_event(moment, "load", name, now[name], pending.get(name)) for name in sorted(now)
                   if name not in before]  # fmt: skip
        return events

    def _is_recorder(self) -> bool:
        """True when this process holds the deployment's residency lock (taking it when free)."""
        if self._lock_file is not None or self.lock_path is None or fcntl is None:
            return True
        handle = open(self.lock_path, "a+b")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _forget_parent(self) -> None:
        """In a new child process: the parent's lock and session are not this process's."""
        # Dropping the child's copy of the lock file never unlocks it: the lock stays the parent's while it lives.
        self._lock_file, self._session, self._recorded, self._mutex = None, None, None, threading.Lock()


def _canonical(model: str) -> str:
    """The name /api/ps lists a model under: with its tag (``:latest`` when none is given)."""
    return model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"


def _entry(item) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise ValueError("an /api/ps entry is not an object")
    name, size = item.get("name") or item.get("model"), item.get("size")
    if not isinstance(name, str) or not isinstance(size, int):
        raise ValueError("an /api/ps entry lacks its name or size")
    context = item.get("context_length")  # newer Ollama only
    vram = item.get("size_vram")
    return name, {"size_bytes": size, "vram_bytes": vram if isinstance(vram, int) else None,
                  "context_length": context if isinstance(context, int) else None,
                  "expires_at": item.get("expires_at")}  # fmt: skip


def _from_event(row: dict) -> dict:
    return {key: row.get(key) for key in ("size_bytes", "vram_bytes", "context_length")} | {"expires_at": None}


def _event(moment: datetime, kind: str, name: str, entry: dict, request_id: str | None = None) -> dict:
    return {"timestamp": moment, "event": kind, "model": name, "size_bytes": entry.get("size_bytes"),
            "vram_bytes": entry.get("vram_bytes"), "context_length": entry.get("context_length"),
            "request_id": request_id}  # fmt: skip


def init_app(app, store) -> None:
    """Give the app its residency poller (started as calls and scrapes arrive), its call sink and health check;
    ``store`` keeps the events (``loaded()``, ``record(events)``)."""
    config = app.config
    lock_path = Path(config["DATA_DIR"]) / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    residency = Residency(config["UPSTREAM"], config["PS_INTERVAL"], state_of(app).metrics, store, lock_path)
    state_of(app).residency = residency
    state_of(app).call_sinks.append(residency.observe)
    state_of(app).shutdown_hooks.append(residency.stop)
    state_of(app).health_checks["residency"] = residency.health
    state_of(app).before_relay.append(residency.start)
    app.before_request(residency.start)
