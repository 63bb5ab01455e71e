"""One background thread per process that runs a task again and again: the metrics samplers, the upstream prober,
the load sampler, the dashboard's read model and the analytics writer each own a ``Ticker``.

A thread does not survive fork(), and a lock a parent thread held at that moment would never be released in the
child. So each process starts its own thread on first use (``ensure``): a gunicorn worker gets a fresh thread and
fresh locks, and never waits on what the parent's thread held. A thread whose task raised ends, and the next
``ensure`` starts another. This module knows nothing of what the tasks do.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

_TICKERS: weakref.WeakSet = weakref.WeakSet()  # every Ticker in this process, for the at-fork hook
_fork_hook: list = []  # non-empty once the hook is installed (once per interpreter)


class Ticker:
    """Runs ``task`` in one daemon thread per process: ``first_delay`` seconds after ``ensure()`` starts it, then
    again after the seconds the task returns (None: ``interval``). An ``interval`` of 0 turns it off."""

    def __init__(
        self,
        name: str,
        task: Callable[[], float | None],
        interval: float,
        *,
        first_delay: float = 0.0,
        on_start: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        after_fork: Callable[[], None] | None = None,
    ) -> None:
        self.name, self.task, self.interval, self.first_delay = name, task, interval, first_delay
        self.on_start = on_start  # runs in the caller of ensure(), before each new thread starts
        self.on_exit = on_exit  # runs in the thread as it ends (its database connection, say)
        self.after_fork = after_fork  # runs in a new child process, after the ticker has forgotten its parent
        self.restarts = 0  # threads started in place of one that died (not counting forks)
        self.pid: int | None = None  # the process that started ``thread``
        self.thread: threading.Thread | None = None
        self.running = False  # this process's thread has started and has not ended
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._first_run = threading.Event()
        _watch_forks(self)

    def ensure(self, wait: float = 0.0) -> None:
        """Start this process's thread unless it runs (first use, after a fork, after a crash); then wait up to
        ``wait`` seconds for its first run. Cheap enough for every call."""
        if not self.interval:
            return
        # No pid comparison and no Thread.is_alive() (a lock taken and given back) here: ``running`` is set just
        # before this process's thread starts and cleared as it ends, and the at-fork hook clears it in a child,
        # which runs where Python's own hook runs; _start checks the pid and the thread once more.
        if not self.running:
            self._start()
        if wait:
            self._first_run.wait(wait)

    def stop(self, timeout: float = 0.0) -> None:
        """End the thread after its current run; with ``timeout``, wait that long for it (never from the thread)."""
        self._stop.set()
        thread = self.thread
        if timeout and thread is not None and self.pid == os.getpid() and thread is not threading.current_thread():
            thread.join(timeout)

    def _start(self) -> None:
        if self.pid is not None and self.pid != os.getpid():
            self._forget_parent()  # forked without the at-fork hook (it runs for os.fork(), not for every fork())
        with self._lock:
            if self._stop.is_set() or (self.thread is not None and self.thread.is_alive()):
                return  # stopped, or the thread is ending: ``running`` is clear, and the next call starts another
            if self.thread is not None:
                self.restarts += 1
                log.error("the %s thread had died; starting a new one", self.name)
            if self.on_start is not None:
                self.on_start()
            self.pid, self._first_run = os.getpid(), threading.Event()
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.running = True
            self.thread.start()

    def _run(self) -> None:
        delay = self.first_delay
        try:
            while not self._stop.wait(delay):
                delay = self.task()
                delay = self.interval if delay is None else delay
                self._first_run.set()
        except Exception:
            log.exception("the %s thread crashed; its next use starts a new one", self.name)
        finally:
            self.running = False  # _start waits for this thread's end before it starts another
            self._first_run.set()  # nobody waits for a first run that will not come
            if self.on_exit is not None:
                self.on_exit()

    def _forget_parent(self) -> None:
        """In a new child process: no thread, fresh lock and events; a stopped ticker stays stopped."""
        stopped = self._stop.is_set()
        self._lock, self._stop, self._first_run = threading.Lock(), threading.Event(), threading.Event()
        if stopped:
            self._stop.set()
        self.pid, self.thread, self.running = os.getpid(), None, False
        if self.after_fork is not None:
            self.after_fork()


def _watch_forks(ticker: Ticker) -> None:
    """Make a forked child (a gunicorn worker) reset each ticker before any of its threads can touch one."""
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook.append(_after_fork_in_child)
    _TICKERS.add(ticker)


def _after_fork_in_child() -> None:
    for ticker in list(_TICKERS):
        ticker._forget_parent()
