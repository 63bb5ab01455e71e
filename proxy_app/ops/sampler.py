"""Whole-machine CPU and memory load, sampled by one background thread per process, never on the request path.

It only reads psutil; it does not publish metrics or store anything.
"""

from __future__ import annotations

import psutil

from proxy_app.state import state_of
from proxy_app.ticker import Ticker

# Why: a CPU percentage needs two readings of the CPU times. A process's first figure comes from two readings this far
# apart, taken in the sampling thread (psutil keeps each thread's last reading), so a row never waits a whole interval.
FIRST_CPU_SECONDS = 0.1
# Why: the first call of a process may end before that first figure exists (the server starts the sampler as it
# begins to serve: proxy_app.start_background); it waits this long at most for it.
FIRST_SAMPLE_WAIT = 1.0


class LoadSampler:
    """Keeps the latest (cpu_percent, memory_percent); the thread starts on first use in each process (fork-safe)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._latest: tuple[float | None, float | None] = (None, None)
        self._is_first = True  # the next run is the first of its thread, which has no earlier CPU reading
        self._ticker = Ticker("load-sampler", self._sample, interval, on_start=self._begin)

    def start(self) -> None:
        """Start this process's sampling thread unless it runs; cheap enough for every call, as the call arrives."""
        self._ticker.ensure()

    def latest(self) -> tuple[float | None, float | None]:
        """Return the last sample, waiting (at most FIRST_SAMPLE_WAIT) for this process's first; (None, None) with an
        interval of 0."""
        self._ticker.ensure(wait=0.0 if self.has_sample else FIRST_SAMPLE_WAIT)
        return self._latest

    @property
    def has_sample(self) -> bool:
        """True once this process has a CPU figure (asking starts nothing)."""
        return self._latest[0] is not None

    def _begin(self) -> None:
        """Before each new thread: its first run measures afresh; memory needs one reading, so it is there at once."""
        self._is_first = True
        self._latest = (self._latest[0], psutil.virtual_memory().percent)

    def _sample(self) -> None:
        is_first, self._is_first = self._is_first, False
        cpu = psutil.cpu_percent(interval=FIRST_CPU_SECONDS if is_first else None)
        self._latest = (cpu, psutil.virtual_memory().percent)

    def stop(self) -> None:
        """Stop the sampling thread (tests, shutdown)."""
        self._ticker.stop()


def init_app(app) -> None:
    """Give the app its load sampler, started as each relayed call arrives and stopped at shutdown."""
    sampler = LoadSampler(app.config["SAMPLE_INTERVAL"])
    state_of(app).load_sampler = sampler
    state_of(app).shutdown_hooks.append(sampler.stop)
    state_of(app).before_relay.append(sampler.start)
