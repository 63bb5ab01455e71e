"""Whole-machine CPU and memory load, sampled by one background thread per process, never on the request path.

It only reads psutil; it does not publish metrics or store anything.
"""

from __future__ import annotations

import psutil

from proxy_app.ticker import Ticker


class LoadSampler:
    """Keeps the latest (cpu_percent, memory_percent); the thread starts on first use in each process (fork-safe)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._latest: tuple[float | None, float | None] = (None, None)
        self._ticker = Ticker("load-sampler", self._sample, interval, first_delay=interval, on_start=self._baseline)

    def latest(self) -> tuple[float | None, float | None]:
        """Return the last sample; (None, None) until the first one is taken (always, with an interval of 0)."""
        self._ticker.ensure()
        return self._latest

    def _baseline(self) -> None:
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; it sets the baseline
        self._latest = (None, psutil.virtual_memory().percent)

    def _sample(self) -> None:
        self._latest = (psutil.cpu_percent(interval=None), psutil.virtual_memory().percent)

    def stop(self) -> None:
        """Stop the sampling thread (tests, shutdown)."""
        self._ticker.stop()
