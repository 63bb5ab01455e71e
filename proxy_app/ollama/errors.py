"""The error shapes the proxy answers in itself: Ollama's native ``{"error": …}``, the OpenAI shape under ``/v1``,
the Anthropic shape under ``/v1/messages``, and the last words of a stream cut short, in the stream's own shape
(NDJSON line or SSE event).

Pure functions over strings and bytes: no Flask, no I/O, nothing else of the proxy. It does not decide when an error
is answered or how a call ends (relay/).
"""

from __future__ import annotations

import json

# Why: Go's encoding/json writes compact JSON; an error of ours must look like one of Ollama's byte for byte.
_COMPACT = (",", ":")
# The OpenAI error type Ollama's /v1 layer gives each status; any other status is an api_error.
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
# The Anthropic error type Ollama's /v1/messages layer gives each status; any other status is an api_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error",
}  # fmt: skip
ANTHROPIC_PATH = "/v1/messages"


def error_body(path: str, message: str, status: int) -> tuple[bytes, str]:
    """Return (body, content type) for an error we raise, shaped like Ollama's native, /v1 or /v1/messages errors."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        document = {"type": "error", "error": {"type": kind, "message": message}}
        return json.dumps(document, separators=_COMPACT).encode() + b"\n", "application/json"
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
