"""The front's task dispatcher: the thread that went idle last takes the next request, and no task is lost."""

from __future__ import annotations

import threading

import pytest
from waitress.task import ThreadedTaskDispatcher

from proxy_app.service.dispatch import LastIdleFirstDispatcher


class Task:
    """What waitress hands a dispatcher: ``service()`` runs it, ``cancel()`` drops it at shutdown."""

    def __init__(self, served: list, done: threading.Event | None = None) -> None:
        self.served, self.done, self.cancelled = served, done, False

    def service(self) -> None:
        self.served.append(threading.get_ident())
        if self.done is not None:
            self.done.set()

    def cancel(self) -> None:
        self.cancelled = True


def blocking(release: threading.Event) -> type[Task]:
    """A task class whose ``service`` holds its thread until ``release`` is set (5 s at most)."""

    class Blocking(Task):
        def service(self) -> None:
            release.wait(5)

    return Blocking


@pytest.fixture
def dispatcher():
    made = LastIdleFirstDispatcher()
    made.set_thread_count(16)
    yield made
    assert made.shutdown(timeout=5)


def one_at_a_time(dispatcher, count: int, threads: int = 16) -> list[int]:
    """Run ``count`` tasks one after another, each once the one before it ended and its thread waits again; the
    threads that served them."""
    served: list[int] = []
    for _ in range(count):
        done = threading.Event()
        dispatcher.add_task(Task(served, done))
        assert done.wait(5)
        wait_idle(dispatcher, threads)
    return served


def wait_idle(dispatcher, threads: int) -> None:
    """Until every thread waits again (the one that served a task goes idle just after it) with nothing queued: a
    woken thread counts as active only once it runs, so an empty queue is what says every task was taken."""
    for _ in range(500):
        with dispatcher.lock:
            if dispatcher.active_count == 0 and not dispatcher.queue and len(dispatcher.threads) == threads:
                return
        threading.Event().wait(0.01)
    raise AssertionError("the dispatcher's threads did not go idle")


def test_dispatch_one_call_at_a_time_stays_on_one_thread(dispatcher):
    wait_idle(dispatcher, 16)
    assert len(set(one_at_a_time(dispatcher, 40))) == 1  # the last thread to go idle takes the next call


def test_dispatch_waitress_own_dispatcher_goes_through_every_thread():
    """What the dispatcher above exists for: waitress's wakes the longest idle thread, so a steady load of one call
    at a time goes through all of them (and each keeps the memory it touched)."""
    stock = ThreadedTaskDispatcher()
    stock.set_thread_count(16)
    try:
        wait_idle(stock, 16)
        assert len(set(one_at_a_time(stock, 40))) == 16
    finally:
        stock.shutdown(timeout=5)


def test_dispatch_every_task_is_served_once_under_concurrent_submitters(dispatcher):
    served: list[int] = []
    tasks = [Task(served) for _ in range(8000)]

    def submit(part: list[Task]) -> None:
        for task in part:
            dispatcher.add_task(task)

    submitters = [threading.Thread(target=submit, args=(tasks[n::4],)) for n in range(4)]
    for submitter in submitters:
        submitter.start()
    for submitter in submitters:
        submitter.join(10)
    wait_idle(dispatcher, 16)
    assert len(served) == 8000 and not dispatcher.queue


def test_dispatch_fewer_threads_and_shutdown_stop_idle_threads(dispatcher):
    wait_idle(dispatcher, 16)
    dispatcher.set_thread_count(4)
    wait_idle(dispatcher, 4)
    assert len(set(one_at_a_time(dispatcher, 10, threads=4))) == 1
    assert dispatcher.shutdown(timeout=5) and not dispatcher.threads
    dispatcher.set_thread_count(16)  # for the fixture's own shutdown


def test_dispatch_shutdown_cancels_what_no_thread_took():
    """A thread told to stop stops after its task, leaving the queue to shutdown, which cancels it."""
    made = LastIdleFirstDispatcher()
    made.set_thread_count(1)
    release, served = threading.Event(), []
    Blocking = blocking(release)
    made.add_task(Blocking(served))
    left = Task(served)
    made.add_task(left)
    stopper = threading.Thread(target=made.shutdown, kwargs={"timeout": 5})
    stopper.start()
    for _ in range(500):  # until shutdown has told the busy thread to stop
        if made.stop_count:
            break
        threading.Event().wait(0.01)
    release.set()
    stopper.join(10)
    assert not made.threads and left.cancelled and served == []  # the thread stopped instead of taking it


def test_dispatch_warns_of_a_queue_once_not_for_every_request(caplog):
    """Requests waiting for a thread are logged at most once every QUEUE_WARNING_SECONDS, not once each: a flood of
    lines from the loop's thread would slow every connection, and stop them all on a stderr nobody reads."""
    made = LastIdleFirstDispatcher()
    made.set_thread_count(1)
    release, served = threading.Event(), []
    Blocking = blocking(release)
    try:
        with caplog.at_level("WARNING", logger="waitress.queue"):
            made.add_task(Blocking(served))
            for _ in range(200):
                made.add_task(Task(served))
        release.set()
        warnings = [record.getMessage() for record in caplog.records if record.name == "waitress.queue"]
        assert len(warnings) == 1 and warnings[0].startswith("Task queue depth is "), warnings
    finally:
        release.set()
        assert made.shutdown(timeout=5)
