"""Noticing a client that has left while its thread waits for the upstream, at every point of a call.

Ollama writes nothing until the model is loaded and the prompt evaluated (minutes on a cold start, or a whole
``stream:false`` generation), and it can fall silent mid-stream too (building a tool call, a long thought); a thread
blocked reading the upstream cannot see its client go, and the server only notices at its next write. So the
upstream connections (upstream.py) wait for the first byte in short polls, and the relay waits for each later piece
the same way (``stream_wait``, when nothing is buffered), asking between polls whether the client is still there; a
departed client raises ``ClientLeft`` and the relay closes the connection, which makes Ollama stop.
This module does not relay, record or time anything.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from urllib3.util.wait import wait_for_read

# Why: how late a departure may be noticed, against one cheap poll() per interval while an upstream is silent.
POLL_SECONDS = 0.1
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)  # no MSG_DONTWAIT on Windows: waitress never blocks

_waiting = threading.local()  # .is_gone: the check for the client whose call this thread is waiting on


class ClientLeft(Exception):
    """The client closed its connection while the relay waited for the upstream."""


def current_gone_check() -> Callable[[], bool] | None:
    """The departure check of the call this thread is waiting on (see ``watching``), or None."""
    return getattr(_waiting, "is_gone", None)


def wait_first_byte(sock, timeout: float | None, is_gone: Callable[[], bool]) -> None:
    """Return once ``sock`` is readable; raise ClientLeft when the client goes, TimeoutError after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not wait_for_read(sock, POLL_SECONDS):
        if is_gone():
            raise ClientLeft
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("read timed out")


def stream_wait(sock, timeout: float | None, is_gone: Callable[[], bool]) -> Callable[[], None]:
    """Return ``wait()``, to call before reading ``sock`` when nothing is buffered: it returns once ``sock`` is
    readable and raises as ``wait_first_byte`` does. The client is also asked at most every POLL_SECONDS while
    pieces keep coming, since a server may notice a departure only a write or two later."""
    next_check = time.monotonic() + POLL_SECONDS
    pending = getattr(sock, "pending", None)  # a TLS socket: decrypted bytes that poll() cannot see

    def wait() -> None:
        nonlocal next_check
        now = time.monotonic()
        if now >= next_check:
            next_check = now + POLL_SECONDS
            if is_gone():
                raise ClientLeft
        if pending is None or not pending():
            wait_first_byte(sock, timeout, is_gone)

    return wait


@contextmanager
def watching(environ: dict) -> Iterator[None]:
    """While in this block, this thread's watched upstream connections give up when the request's client leaves."""
    _waiting.is_gone = client_gone_check(environ)
    try:
        yield
    finally:
        _waiting.is_gone = None


def client_gone_check(environ: dict) -> Callable[[], bool] | None:
    """Return a callable telling whether the client has left, or None when the server offers no way to tell."""
    check = environ.get("waitress.client_disconnected")
    if check is not None:
        # waitress itself sees the EOF only with channel_request_lookahead >= 1, so also peek at its socket
        sock = getattr(getattr(check, "__self__", None), "socket", None)
        return check if sock is None else lambda: check() or is_closed(sock)
    sock = environ.get("gunicorn.socket")
    return None if sock is None else lambda: is_closed(sock)


def is_closed(sock) -> bool:
    """True once the peer has closed ``sock`` (EOF or reset); pipelined bytes or silence mean it is still there."""
    try:
        return sock.recv(1, _PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError):  # ValueError: a TLS socket, which cannot peek
        return False
    except OSError:
        return True
