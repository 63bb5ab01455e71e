"""Reading the client's request body: whole, up to the size limit, for API calls; in pieces for blob uploads.

A body shorter than its Content-Length means the client left (gunicorn hands over what arrived) and raises
werkzeug's ``ClientDisconnected``. A body the server cannot decode (a chunked one with a bad size line: gunicorn raises
its own parse errors as it is read) raises ``InvalidBody``. This module does not parse the body (ollama/intake.py) or
answer anything (forward.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from werkzeug.exceptions import BadRequest, ClientDisconnected
from werkzeug.wrappers import Request

UPLOAD_PIECE = 64 * 1024  # a blob upload (gigabytes) is read from the client in bigger pieces
WHOLE_READ_PIECE = 1 << 20  # without a Content-Length, no single read asks for the whole limit at once


class InvalidBody(BadRequest):
    """The server could not decode the client's request body, such as a chunked body with a bad size line."""


def is_blob_upload(method: str, path: str) -> bool:
    """True for a model blob upload, which streams to the upstream and has no size limit."""
    return method in ("POST", "PUT") and path.startswith("/api/blobs/")


def read_request_body(req: Request, limit: int):
    """Return (body, size): bytes for API calls, a streaming iterator for blob uploads; size -1 means too big."""
    declared = req.content_length
    if is_blob_upload(req.method, req.path):
        return _iter_upload(req.stream, declared), declared or 0
    piece_size = declared + 1 if declared is not None else WHOLE_READ_PIECE
    data = _read_at_most(req.stream, limit + 1, piece_size) if limit else _read(req.stream, -1)
    if limit and len(data) > limit:
        return None, -1
    if declared is not None and len(data) < declared:  # gunicorn hands over a short body when the client left
        raise ClientDisconnected(f"the client sent {len(data)} of {declared} body bytes")
    return data, len(data)


def _read_at_most(stream, size: int, piece_size: int) -> bytes:
    """Read until EOF or ``size`` bytes (a single read() may return less, e.g. from a LimitedStream)."""
    pieces = []
    while size > 0 and (piece := _read(stream, min(size, piece_size))):
        pieces.append(piece)
        size -= len(piece)
    return b"".join(pieces)


def _iter_upload(stream, declared: int | None = None) -> Iterator[bytes]:
    """Yield a blob upload in 64 KiB pieces so a 5 GB model file never sits in memory."""
    sent = 0
    while piece := _read(stream, UPLOAD_PIECE):
        sent += len(piece)
        yield piece
    if declared is not None and sent < declared:  # the upstream would wait for the rest for ever
        raise ClientDisconnected(f"the client sent {sent} of {declared} body bytes")


def _read(stream, size: int) -> bytes:
    """One read from the server's input stream; a body the server cannot decode raises InvalidBody."""
    try:
        return stream.read(size)
    except (OSError, ClientDisconnected):  # the client left (gunicorn's NoMoreData is an OSError)
        raise
    except Exception as exc:  # the server's own error for framing it refuses, e.g. gunicorn's InvalidChunkSize
        raise InvalidBody(f"invalid request body: {str(exc)[:80] or type(exc).__name__}") from exc
