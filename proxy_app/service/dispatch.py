"""Which of the front's idle threads takes the next request: the one that went idle last.

waitress's ThreadedTaskDispatcher wakes its idle threads through one condition variable, which wakes the longest
waiting thread first. With THREADS in the thousands (each call in progress, a stream included, holds one), a steady
load then passes through every thread in turn, and each one it reaches keeps the stack pages and the Python frame
stack it used: the process grows with THREADS, not with the load, and every call runs on a thread whose memory is
cold (docs/benchmarks.md measures both). Here each idle thread waits on a lock of its own, kept on a stack, and a
new task wakes the top one; the threads a load needs stay warm and the others stay untouched.

Everything else is waitress's dispatcher: its queue, its counts and its shutdown, and its warning when requests wait
for a thread, which here comes at most once every QUEUE_WARNING_SECONDS: waitress logs it for every request queued,
and a flood of log lines from the loop's thread would slow every connection (or stop them all, on a stderr that is
not read).
"""

from __future__ import annotations

import threading
import time

from waitress.task import ThreadedTaskDispatcher

QUEUE_WARNING_SECONDS = 10.0


class LastIdleFirstDispatcher(ThreadedTaskDispatcher):
    """waitress's dispatcher, waking the thread that went idle last."""

    def __init__(self) -> None:
        super().__init__()
        self.idle: list[threading.Lock] = []  # one held lock per waiting thread; the last to wait on top
        self._next_warning = 0.0

    def handler_thread(self, thread_no: int) -> None:
        """Take tasks from the queue until told to stop (waitress's loop, waiting on this thread's own lock)."""
        wake = threading.Lock()
        wake.acquire()
        while True:
            with self.lock:
                while not self.queue and self.stop_count == 0:
                    self.active_count -= 1
                    self.idle.append(wake)
                    self.lock.release()
                    try:
                        wake.acquire()  # released once by whoever takes it off the stack
                    finally:
                        self.lock.acquire()
                    self.active_count += 1
                if self.stop_count > 0:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    break
                task = self.queue.popleft()
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)

    def add_task(self, task) -> None:
        """Queue ``task`` and wake the thread that went idle last (waitress's add_task, which notifies the
        condition no thread of this class waits on)."""
        with self.lock:
            self.queue.append(task)
            self._wake(1)
            waiting = len(self.queue) - (len(self.threads) - self.stop_count - self.active_count)
            if waiting > 0 and (now := time.monotonic()) >= self._next_warning:
                self._next_warning = now + QUEUE_WARNING_SECONDS
                self.queue_logger.warning("Task queue depth is %d (requests waiting for one of the threads)", waiting)

    def set_thread_count(self, count: int) -> None:
        """Start or stop threads as waitress does; threads told to stop are woken here."""
        super().set_thread_count(count)
        with self.lock:
            if self.stop_count:
                self._wake(len(self.idle))

    def _wake(self, count: int) -> None:
        """Wake up to ``count`` idle threads, the last to go idle first (the lock is held)."""
        for _ in range(min(count, len(self.idle))):
            self.idle.pop().release()
