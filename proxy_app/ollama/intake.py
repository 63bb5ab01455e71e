"""Pure: what the client asked for (model, effective stream mode, parameters, prompt), read from the request body.

It never changes the body, except ``with_usage_requested``, which splices one key onto the end of a /v1 chat request
so the proxy can count tokens of clients that did not ask for usage. No Flask, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Why: Ollama streams these unless the body says "stream": false (absent, null or true all stream).
NATIVE_STREAMING = frozenset({"/api/generate", "/api/chat", "/api/pull", "/api/push", "/api/create"})

# Top-level request keys that shape generation; stored with `options` as model_parameters.
GENERATION_KEYS = (
    "format", "keep_alive", "think", "raw", "truncate", "shift", "dimensions", "logprobs", "top_logprobs",
    "temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "max_completion_tokens", "frequency_penalty",
    "presence_penalty", "response_format", "reasoning_effort", "n", "suffix",
)  # fmt: skip

PROMPT_CHARS = 1000  # issue 3: the prompt is cut to 1000 characters (not bytes)
USAGE_SUFFIX = b',"stream_options":{"include_usage":true}}'
_SURROGATE = re.compile("[\ud800-\udfff]")  # after json's decoding, a lone one (a valid pair is one character)


@dataclass(frozen=True)
class Intake:
    """What a call asked for. None where the body does not say."""

    api: str  # native, openai or anthropic
    model: str | None = None
    stream_mode: bool = False
    model_parameters: str | None = None
    prompt: str | None = None
    wants_usage_injected: bool = False  # a /v1 chat stream without include_usage


def read_intake(path: str, body: bytes | None) -> Intake:
    """Return what the client asked for; never raises, whatever the body holds."""
    api = "anthropic" if path == "/v1/messages" else "openai" if path.startswith("/v1/") else "native"
    document = _decode(body)
    if not isinstance(document, dict):
        return Intake(api=api, stream_mode=path in NATIVE_STREAMING, model=_model_from_path(path))
    stream = _is_streaming(path, document.get("stream"))
    return Intake(
        api=api,
        model=as_go_text(_model(path, document)),
        stream_mode=stream,
        model_parameters=as_go_text(_parameters(document)),
        prompt=as_go_text(_prompt(path, document)),
        wants_usage_injected=stream and path == "/v1/chat/completions" and not _asked_usage(document),
    )


def as_go_text(text: str | None) -> str | None:
    """Return decoded JSON text as Go's encoding/json holds it: each lone surrogate becomes U+FFFD.

    Python's json keeps ``"\\ud800"`` (invalid UTF-16) as a lone surrogate, which no UTF-8 database, file or socket
    accepts; Ollama reads the same request with U+FFFD in its place, and so does the record of the call.
    """
    if not text or text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def with_usage_requested(body: bytes) -> bytes:
    """Return the body with ``stream_options.include_usage`` set, by appending a key (the last duplicate wins in Go)."""
    head = body.rstrip()[:-1].rstrip()  # only called for a JSON object, so this drops its closing brace
    return head + (USAGE_SUFFIX[1:] if head.endswith(b"{") else USAGE_SUFFIX)


def _decode(body: bytes | None):
    """Decode like Go's encoding/json: a BOM, UTF-16, NaN and Infinity are errors.

    Each byte that is not UTF-8 stays in the document as a lone surrogate (surrogateescape), as does a lone surrogate
    escape; ``as_go_text`` makes each of them U+FFFD in the fields the call record keeps, as Go does (one per byte).
    """
    if not body:
        return None
    try:
        return _DECODER.decode(body.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one for all calls: json.loads would build one each


def _is_streaming(path: str, value) -> bool:
    if path in NATIVE_STREAMING:
        return value is not False
    if path.startswith("/v1/"):
        return value is True
    return False


def _model(path: str, document: dict) -> str | None:
    for key in ("model", "name", "source"):
        value = document.get(key)
        if isinstance(value, str) and value:
            return value
    return _model_from_path(path)


def _model_from_path(path: str) -> str | None:
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return path[len("/v1/models/") :]
    return None


def _parameters(document: dict) -> str | None:
    chosen = {key: document[key] for key in GENERATION_KEYS if key in document}
    options = document.get("options")
    if isinstance(options, dict):
        chosen.update(options)
    if not chosen:
        return None
    try:  # strict JSON: a number too big for a float (1e999) would otherwise be stored as Infinity
        return json.dumps(chosen, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, RecursionError):
        return None


def _prompt(path: str, document: dict) -> str | None:
    messages = document.get("messages")
    if isinstance(messages, list):
        text = _last_user_text(messages)
    else:
        text = _text_of(document.get("prompt", document.get("input")))
    return text[:PROMPT_CHARS] if text else None


def _last_user_text(messages: list) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return None


def _text_of(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # /v1 content parts, or a list of inputs
        parts = [item if isinstance(item, str) else item.get("text") for item in value if isinstance(item, str | dict)]
        return "\n".join(part for part in parts if isinstance(part, str)) or None
    return None


def _asked_usage(document: dict) -> bool:
    options = document.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
