"""Pure: what the client asked for (model, effective stream mode, parameters, prompt), read from the request body.

The body is read as Ollama's Go code reads it (gojson.py): keys matched to fields case-insensitively, the last of
several winning, trailing bytes after the first value ignored, zstd decompressed where Ollama does (bodies.py). The
reading costs bounded memory and time whatever the body holds (jsonscan.py). It never changes the body, except
``with_usage_requested``, which splices one key onto the end of a /v1 chat request so the proxy can count tokens of
clients that did not ask for usage. No Flask, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from proxy_app.ollama import bodies, gojson, jsonscan

# Why: Ollama streams these unless the body says "stream": false (absent, null or true all stream).
NATIVE_STREAMING = frozenset({"/api/generate", "/api/chat", "/api/pull", "/api/push", "/api/create"})

# Why: these routes name a second model besides ``model`` (api/types.go, CopyRequest and CreateRequest): the one
# /api/copy writes, and the one /api/create builds from. A key's model list must allow both.
SECOND_MODEL_KEYS = {"/api/copy": "destination", "/api/create": "from"}
# Why: these routes change what every caller of the server has (server/routes.go): its models (pull, create with its
# blob uploads, copy, delete), what it publishes under its registry credentials (push), and its ollama.com sign-in
# (signout, and DELETE /api/user/keys/:encodedKey, which runs the same handler).
MANAGEMENT_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/signout"})
MANAGEMENT_PREFIXES = ("/api/blobs/", "/api/user/keys/")
# Top-level request keys that shape generation; stored with `options` as model_parameters.
GENERATION_KEYS = gojson.REPLACED[1:]  # all but input
_GENERATION_KEY_SET = frozenset(GENERATION_KEYS)

# Where each route's request struct holds the prompt; a key the struct lacks is ignored by Ollama, and so here.
PROMPT_FIELDS = {"/api/generate": "prompt", "/api/embeddings": "prompt", "/v1/completions": "prompt",
                 "/api/embed": "input", "/v1/embeddings": "input", "/v1/responses": "input",
                 "/api/chat": "messages", "/v1/chat/completions": "messages", "/v1/messages": "messages"}  # fmt: skip
PROMPT_CHARS = gojson.TEXT_CHARS  # issue 3: the prompt is cut to 1000 characters (not bytes)
USAGE_KEY = b'"stream_options":{"include_usage":true}'
_SURROGATE = re.compile("[\ud800-\udfff]")  # after json's decoding, a lone one (a valid pair is one character)


def is_management(path: str) -> bool:
    """True for a call that manages the server's models or its sign-in (MANAGEMENT_PATHS), whatever its method."""
    return path in MANAGEMENT_PATHS or path.startswith(MANAGEMENT_PREFIXES)


@dataclass(frozen=True)
class Intake:
    """What a call asked for. None where the body does not say."""

    api: str  # native, openai or anthropic
    model: str | None = None
    stream_mode: bool = False
    model_parameters: str | None = None
    prompt: str | None = None
    wants_usage_injected: bool = False  # a /v1 chat stream without include_usage
    second_model: str | None = None  # the other model a call names (SECOND_MODEL_KEYS): one it writes or reads


def read_intake(
    path: str,
    body: bytes | None,
    content_encoding: str | None = None,
    content_type: str | None = None,
    query: str | bytes | None = None,
) -> Intake:
    """Return what the client asked for; never raises, whatever the body holds.

    ``content_encoding`` (zstd is decompressed where Ollama does), ``content_type`` and ``query`` (for the multipart
    form of audio transcriptions) are the request's; a body that cannot be read gives an Intake without its fields.
    """
    api = "anthropic" if path == "/v1/messages" else "openai" if path.startswith("/v1/") else "native"
    unread = Intake(api=api, stream_mode=path in NATIVE_STREAMING, model=_model_from_path(path))
    if path in bodies.FORM_PATHS:
        return Intake(api=api, model=as_go_text(bodies.form_model(body or b"", content_type, query)))
    try:
        data = bodies.decoded(path, body or b"", content_encoding)
        request = _read_request(path, data)
    except ValueError:  # jsonscan.Invalid, bodies.Undecodable: Ollama refuses the body too
        return unread
    if request is None:
        return unread
    stream = _is_streaming(path, request.stream if request.has_stream() else None)
    return Intake(
        api=api,
        model=as_go_text(_model(path, request)),
        stream_mode=stream,
        model_parameters=as_go_text(_parameters(request)),
        prompt=as_go_text(_prompt(path, request)),
        # A compressed body is relayed as it came: no key can be spliced into it.
        wants_usage_injected=stream and path == "/v1/chat/completions" and not request.include_usage and data is body,
        second_model=as_go_text(gojson.string_of(request.values.get(SECOND_MODEL_KEYS.get(path)))),
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
    """Return the body with ``stream_options.include_usage`` set by a key spliced in as the object's last.

    Go decodes every key that folds to stream_options into one struct in order, so this last one sets include_usage
    whatever came before; bytes after the object, which Go ignores, stay where they are.
    """
    start = jsonscan.skip_space(body)
    whole = jsonscan.parse_small(body, start, 0)
    if whole is None:
        reader = jsonscan.ObjectReader(body, start)
        for _ in reader:  # read to the end of the object, where the key goes
            pass
        whole = None, reader.end
    closing = whole[1] - 1
    has_members = jsonscan.skip_space(body, start + 1) != closing
    return body[:closing] + (b"," if has_members else b"") + USAGE_KEY + body[closing:]


def _read_request(path: str, data: bytes) -> gojson.Request | None:
    """Decode the first JSON value of the body as Ollama's request struct; None when it is not an object."""
    start = jsonscan.skip_space(data)
    if data[start : start + 1] != b"{":
        return None  # not an object: Go refuses it
    whole = jsonscan.parse_small(data, start, 0)
    return gojson.read_request(path, whole[0] if whole is not None else jsonscan.ObjectReader(data, start))


def _is_streaming(path: str, value) -> bool:
    if path in NATIVE_STREAMING:
        return value is not False
    if path.startswith("/v1/"):
        return value is True
    return False


def _model(path: str, request: gojson.Request) -> str | None:
    for key in ("model", "name", "source"):
        if value := gojson.string_of(request.values.get(key)):
            return value
    return _model_from_path(path)


def _model_from_path(path: str) -> str | None:
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return path[len("/v1/models/") :]
    return None


def _parameters(request: gojson.Request) -> str | None:
    room = [gojson.PARAMETER_CHARS]
    chosen = {}
    if not _GENERATION_KEY_SET.isdisjoint(request.values):  # most requests name none: no loop over every key
        chosen = {key: gojson.bounded(request.values[key], room) for key in GENERATION_KEYS if key in request.values}
    if request.options is not None:
        chosen.update((key, gojson.bounded(value, room)) for key, value in request.options.items())
    if not chosen:
        return None
    try:  # strict JSON: a number too big for a float (1e999) would otherwise be stored as Infinity
        return json.dumps(chosen, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, RecursionError):
        return None


def _prompt(path: str, request: gojson.Request) -> str | None:
    field = PROMPT_FIELDS.get(path)
    if field == "messages" or (field is None and request.messages.length is not None):
        return request.messages.last_user_text()
    if field is not None:
        return gojson.text_of(request.values.get(field))
    return gojson.text_of(request.values.get("prompt", request.values.get("input")))
