"""The relay's WSGI face: which paths are relayed (``is_reserved``), the middleware in front of Flask (``Relay``),
which sees every request first and refuses a Host that is not allowed (``make_host_rule``, ollama/hosts.py), and the
two kinds of answer it gives the server: one the proxy makes itself (``answer_ourselves``), in the error shape of the
API asked, and a relayed one whose body goes out as it arrives (``RelayedAnswer``).

It does not talk to the upstream or record calls: the ``forward`` and ``refuse`` functions it is given do
(forward.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator

import psutil
from flask import Flask
from werkzeug.wrappers import Request, Response

from proxy_app import RESERVED_PATHS
from proxy_app.ollama.errors import error_body
from proxy_app.ollama.hosts import HostRule, host_of, is_loopback_bind, normalised_entry
from proxy_app.settings import PREFIX
from proxy_app.state import state_of

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


_RESERVED_BELOW = tuple(ours + "/" for ours in RESERVED_PATHS)


def is_reserved(path: str) -> bool:
    """True for the proxy's own paths (RESERVED_PATHS and below them), which Flask serves; the rest is Ollama's."""
    return path in RESERVED_PATHS or path.startswith(_RESERVED_BELOW)


def make_host_rule(config) -> HostRule:
    """The Host rule of this listener: Ollama's on a loopback HOST, plus the ALLOWED_HOSTS entries."""
    return HostRule(
        checks_local=is_loopback_bind(config["HOST"]),
        allowed=tuple(normalised_entry(entry) for entry in config["ALLOWED_HOSTS"]),
        hostname=socket.gethostname().lower(),
        local_addresses=_interface_addresses,
    )


def _interface_addresses() -> list[str]:
    """This machine's own addresses, read when asked, as Ollama does (they change with the network)."""
    families = (socket.AF_INET, socket.AF_INET6)
    return [
        entry.address for entries in psutil.net_if_addrs().values() for entry in entries if entry.family in families
    ]


class Relay:
    """WSGI middleware: a Host ``host_rule`` refuses gets 403; every other path that is not ours goes straight to
    ``forward``, the rest to Flask (``ours``).

    Relayed calls skip Flask's request context, URL routing and hooks. The relay takes its app as an argument and
    never uses Flask's context-bound globals.
    """

    def __init__(self, app: Flask, ours, forward: Callable, refuse: Callable, host_rule: HostRule) -> None:
        self.app, self.ours = app, ours
        self.forward = forward  # the benchmark's breakdown swaps it to measure what is around it
        self.refuse, self.host_rule = refuse, host_rule

    def __call__(self, environ: dict, start_response):
        path = environ.get("PATH_INFO", "")
        host = environ.get("HTTP_HOST", "")
        if not self.host_rule.allows(host):
            response = self._refuse_host(environ, path, host)
        elif is_reserved(path):
            return self.ours(environ, start_response)
        else:
            response = self._relay(Request(environ))
        return response(environ, start_response)

    def refuse_unread(self, environ: dict, status: int, message: str) -> None:
        """Record a relayed call the server refused before any app ran (a body it could not read); the server
        answers it."""
        self.refuse(self.app, Request(environ), status, message)

    def _refuse_host(self, environ: dict, path: str, host: str) -> Response:
        """403 in the API's shape; a refused relayed call is recorded like any other."""
        message = f"the Host {host_of(host)[:100]!r} is not allowed here; to accept it, add it to {PREFIX}ALLOWED_HOSTS"
        if is_reserved(path):
            return answer_ourselves(path, 403, message)
        return self.refuse(self.app, Request(environ), 403, message)

    def _relay(self, req: Request):
        if req.method not in METHODS:
            response = answer_ourselves(req.path, 405, f"method {req.method[:20]!r} is not allowed")
            response.headers["Allow"] = ", ".join(METHODS)
            return response
        state_of(self.app).run_before_relay()
        try:
            return self.forward(self.app, req)
        except Exception:  # a bug of ours: the client still gets an answer in Ollama's shape
            log.exception("relaying %s %s failed", req.method, req.path)
            return answer_ourselves(req.path, 500, "internal error in the proxy")


def answer_ourselves(path: str, status: int, message: str) -> Response:
    """An error the proxy answers itself, shaped like Ollama's native errors, OpenAI's under /v1 or Anthropic's under
    /v1/messages."""
    body, content_type = error_body(path, message, status)
    return Response(body, status=status, content_type=content_type)


class RelayedAnswer:
    """A relayed answer as a WSGI response: the upstream's status line and headers, and its body as it arrives.

    werkzeug's Response would check and copy every header once more. ``generator`` has already run up to its first
    (empty) piece, so closing it before the server ever iterated still settles the call without reading the
    upstream. A head the server refuses to send (start_response
    raises: a header value it will not write) is settled by ``abandon``, which frees the call's slot and upstream
    connection, records it and returns the error to answer instead, in the API's shape.
    """

    def __init__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        generator: Iterator[bytes],
        abandon: Callable[[str], Response],
    ) -> None:
        self.status, self.headers, self._generator, self._abandon = status, headers, generator, abandon

    def __call__(self, environ: dict, start_response):
        try:
            start_response(self.status, self.headers)
        except BaseException as exc:  # nothing was sent: the call is settled here, and answered if the server lets us
            return self._answer_instead(environ, start_response, exc)
        return self

    def __iter__(self) -> Iterator[bytes]:
        return self._generator

    def close(self) -> None:
        self._generator.close()  # the relay starts it before handing it over, so its `finally` always runs

    def _answer_instead(self, environ: dict, start_response, exc: BaseException):
        message = f"the server could not send the upstream's answer: {type(exc).__name__}: {exc}"
        log.warning("%s", message)
        error = self._abandon(message)  # settles the call; the body closed next settles nothing more
        self._generator.close()
        if not isinstance(exc, Exception):  # the worker is exiting (SystemExit, KeyboardInterrupt): let it
            raise exc
        caught = (type(exc), exc, exc.__traceback__)
        # PEP 3333: start_response may be called again, with exc_info, as long as no header was sent
        return error(environ, lambda status, headers, exc_info=None: start_response(status, headers, caught))
