"""The Ticker: one thread per process for a repeated task, started on first use, replaced after a crash or a fork."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from proxy_app.ticker import Ticker


def test_ticker_runs_again_after_the_delay_the_task_returns():
    runs, third = [], threading.Event()

    def task() -> float:
        runs.append(threading.current_thread().name)
        if len(runs) == 3:
            third.set()
            return 3600.0  # then nothing more until stop() wakes the thread
        return 0.0

    ticker = Ticker("ticker-test", task, interval=3600.0)
    ticker.ensure()
    assert third.wait(5)
    ticker.stop(5)
    assert runs == ["ticker-test"] * 3 and not ticker.thread.is_alive()


def test_ticker_none_means_the_interval_and_ensure_waits_for_the_first_run():
    runs = []
    ticker = Ticker("ticker-test", lambda: runs.append(1), interval=3600.0)
    ticker.ensure(wait=5)
    assert runs == [1]  # the first run came at once; the next one is an hour away
    ticker.ensure()  # running: nothing new starts
    ticker.stop(5)
    assert runs == [1] and ticker.restarts == 0


def test_ticker_interval_zero_is_off():
    started = []
    ticker = Ticker("ticker-test", lambda: None, interval=0, on_start=lambda: started.append(1))
    ticker.ensure(wait=5)
    assert ticker.thread is None and started == []


def test_ticker_stopped_stays_stopped():
    ticker = Ticker("ticker-test", lambda: None, interval=3600.0)
    ticker.stop()
    ticker.ensure()
    assert ticker.thread is None


def test_ticker_crashed_task_is_replaced_on_next_use(caplog):
    failures, exits = iter([RuntimeError("a bug"), None]), []

    def task() -> None:
        failure = next(failures)
        if failure:
            raise failure

    ticker = Ticker("ticker-test", task, interval=3600.0, on_exit=lambda: exits.append(threading.current_thread()))
    ticker.ensure()
    crashed = ticker.thread
    crashed.join(5)
    assert not crashed.is_alive() and exits == [crashed]  # on_exit ran in the thread as it ended
    assert "the ticker-test thread crashed" in caplog.text
    ticker.ensure(wait=5)
    assert ticker.thread is not crashed and ticker.thread.is_alive() and ticker.restarts == 1
    assert "the ticker-test thread had died; starting a new one" in caplog.text
    ticker.stop(5)
    assert exits == [crashed, ticker.thread]


def run_forked(target, *args) -> int:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(10)
    if child.exitcode is None:
        child.kill()  # stuck: a lock from the parent
        child.join()
    return child.exitcode


def _use_in_child(ticker: Ticker, parent_thread: threading.Thread, runs: list, forgotten: list) -> None:
    forgotten_at_fork = ticker.thread is None and ticker.pid == os.getpid() and forgotten == [os.getpid()]
    ticker.ensure(wait=5)
    ran_here = runs[-1] == os.getpid() and ticker.thread is not parent_thread and ticker.thread.is_alive()
    os._exit(0 if forgotten_at_fork and ran_here else 1)


@pytest.mark.skipif(os.name == "nt", reason="fork")
def test_ticker_forked_child_starts_its_own_thread_though_a_parent_thread_held_the_lock():
    # The gunicorn case: the app (and its tickers) is built in the arbiter, then workers fork. A thread of the parent
    # may hold the ticker's lock at that moment; the child must neither inherit the thread nor wait on that lock.
    runs, forgotten = [], []
    ticker = Ticker("ticker-test", lambda: runs.append(os.getpid()), interval=3600.0,
                    after_fork=lambda: forgotten.append(os.getpid()))  # fmt: skip
    ticker.ensure(wait=5)
    with ticker._lock:
        code = run_forked(_use_in_child, ticker, ticker.thread, runs, forgotten)
    assert code == 0
    assert runs == [os.getpid()] and forgotten == []  # the parent's ticker is untouched
    ticker.stop(5)
