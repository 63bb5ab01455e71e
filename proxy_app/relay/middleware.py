"""The relay's WSGI face: which paths are relayed (``is_reserved``), the middleware in front of Flask (``Relay``),
and the two kinds of answer it gives the server: one the proxy makes itself (``answer_ourselves``), in the error shape
of the API asked, and a relayed one whose body goes out as it arrives (``RelayedAnswer``).

It does not talk to the upstream or record calls: the ``forward`` function it is given does (forward.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator

from flask import Flask
from werkzeug.wrappers import Request, Response

from proxy_app import RESERVED_PATHS
from proxy_app.ollama.errors import error_body

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def is_reserved(path: str) -> bool:
    """True for the proxy's own paths (RESERVED_PATHS and below them), which Flask serves; the rest is Ollama's."""
    return any(path == ours or path.startswith(ours + "/") for ours in RESERVED_PATHS)


class Relay:
    """WSGI middleware: every path that is not ours goes straight to ``forward``, the rest to Flask (``ours``).

    Relayed calls skip Flask's request context, URL routing and hooks. The relay takes its app as an argument and
    never uses Flask's context-bound globals.
    """

    def __init__(self, app: Flask, ours, forward: Callable) -> None:
        self.app, self.ours = app, ours
        self.forward = forward  # the benchmark's breakdown swaps it to measure what is around it

    def __call__(self, environ: dict, start_response):
        if is_reserved(environ.get("PATH_INFO", "")):
            return self.ours(environ, start_response)
        req = Request(environ)
        if req.method not in METHODS:
            response = answer_ourselves(req.path, 405, f"method {req.method[:20]!r} is not allowed")
            response.headers["Allow"] = ", ".join(METHODS)
        else:
            for hook in self.app.extensions["before_relay"]:
                hook()
            try:
                response = self.forward(self.app, req)
            except Exception:  # a bug of ours: the client still gets an answer in Ollama's shape
                log.exception("relaying %s %s failed", req.method, req.path)
                response = answer_ourselves(req.path, 500, "internal error in the proxy")
        return response(environ, start_response)


def answer_ourselves(path: str, status: int, message: str) -> Response:
    """An error the proxy answers itself, shaped like Ollama's native errors or, under /v1, like OpenAI's."""
    body, content_type = error_body(path, message, status)
    return Response(body, status=status, content_type=content_type)


class RelayedAnswer:
    """A relayed answer as a WSGI response: the upstream's status line and headers, and its body as it arrives.

    werkzeug's Response would check and copy every header once more. Closing the body before the server ever
    iterated it still settles the call (no drifting counts).
    """

    def __init__(self, status: str, headers: list[tuple[str, str]], generator: Iterator[bytes]) -> None:
        self.status, self.headers, self._generator = status, headers, generator

    def __call__(self, environ: dict, start_response):
        start_response(self.status, self.headers)
        return self

    def __iter__(self) -> Iterator[bytes]:
        return self._generator

    def close(self) -> None:
        if inspect.getgeneratorstate(self._generator) == inspect.GEN_CREATED:
            next(self._generator, None)  # run up to the first yield so `finally` has a frame to run in
        self._generator.close()
