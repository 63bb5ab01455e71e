"""Whole-machine CPU and memory load, sampled by one background thread per process, never on the request path.

It only reads psutil; it does not publish metrics or store anything.
"""

from __future__ import annotations

import os
import threading

import psutil


class LoadSampler:
    """Keeps the latest (cpu_percent, memory_percent); the thread starts on first use in each process (fork-safe)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._latest: tuple[float | None, float | None] = (None, None)
        self._pid = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def latest(self) -> tuple[float | None, float | None]:
        """Return the last sample; (None, None) until the first one is taken."""
        if self._pid != os.getpid():
            self._start()
        return self._latest

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            psutil.cpu_percent(interval=None)  # the first reading is meaningless; it sets the baseline
            self._latest = (None, psutil.virtual_memory().percent)
            threading.Thread(target=self._run, name="load-sampler", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._latest = (psutil.cpu_percent(interval=None), psutil.virtual_memory().percent)

    def stop(self) -> None:
        """Stop the sampling thread (tests, shutdown)."""
        self._stop.set()
