"""The error shapes the proxy answers in itself: Ollama's native ``{"error": …}``, the OpenAI shape under ``/v1``,
and the last words of a stream cut short, in the stream's own shape (NDJSON line or SSE event).

Pure functions over strings and bytes: no Flask, no I/O, nothing else of the proxy. It does not decide when an error
is answered or how a call ends (relay/).
"""

from __future__ import annotations

import json

# Why: Go's encoding/json writes compact JSON; an error of ours must look like one of Ollama's byte for byte.
_COMPACT = (",", ":")
# The OpenAI error type Ollama's /v1 layer gives each status; any other status is an api_error.
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def error_body(path: str, message: str, status: int) -> tuple[bytes, str]:
    """Return (body, content type) for an error we raise, shaped like Ollama's native or /v1 errors."""
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status, "api_error")
        document = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return json.dumps(document, separators=_COMPACT).encode() + b"\n", "application/json"
    return json.dumps({"error": message}, separators=_COMPACT).encode(), "application/json; charset=utf-8"


def error_tail(content_type: str, message: str, at_line_start: bool) -> bytes:
    """Return the last words of a broken stream, in the stream's own error shape, so clients fail cleanly."""
    if content_type.startswith("text/event-stream"):
        event = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        # A blank line first ends any half-sent event (after a whole event it is an empty one, which SSE ignores).
        start = b"\n" if at_line_start else b"\n\n"
        return start + b"data: " + json.dumps(event, separators=_COMPACT).encode() + b"\n\n"
    if content_type.startswith("application/x-ndjson"):
        line = json.dumps({"error": message}, separators=_COMPACT).encode() + b"\n"
        return line if at_line_start else b"\n" + line  # end a half-sent line first
    return b""
