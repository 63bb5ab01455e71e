"""A fake `ollama serve`: a plain WSGI app that answers with Ollama's exact wire format.

It is the upstream for our tests and benchmarks (shared/reference/ollama-wire-format.md is the spec it follows).
Replies are generated in code: deterministic token counts, Go-style compact JSON, one flushed chunk per NDJSON
line under waitress. Knobs (attributes, or `X-Fake-<Knob-Name>` request headers) inject delays, errors and cuts.

What it does not do: run a model, keep blob bytes, or check CORS origins. Known differences from real Ollama
(mostly waitress): a chunked reply ends with `Connection: close`; HEAD replies always carry a Content-Length;
non-ASCII text is escaped as \\uXXXX rather than sent as raw UTF-8; Go's JSON decoder messages are approximated.
"""

import argparse
import base64
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from http import HTTPStatus
from types import SimpleNamespace

import waitress
from waitress import wasyncore

try:
    from tests import fake_formats
except ImportError:  # run as a script, `python tests/fake_ollama.py`: its own folder is on the path
    import fake_formats
go_json = fake_formats.go_json

VERSION = "0.12.6"
PROMPT_OVERHEAD_TOKENS = 10  # chat template and BOS tokens a real prompt adds on top of its words
DEFAULT_TOKENS = ("The", " sky", " is", " blue", ".")
THINKING_TOKENS = ("Let", " me", " think", ".")
MODEL_ERROR = "an error was encountered while running the model"  # docs/api/errors.mdx
GO_BUFFER_BYTES = 2048  # Go sends Content-Length only when the whole body fits its first write buffer
PIECE_BYTES = 64 * 1024  # read request bodies in pieces this big
SEEN_BODY_LIMIT = 1 << 20  # keep request bodies in `seen` only below this size
PROGRESS_STEPS = 4  # progress lines per layer in pull/push
JSON_UTF8 = "application/json; charset=utf-8"
V1_JSON = "application/json"  # /v1 replies written by json.Encoder after the handler ran
NDJSON = "application/x-ndjson"
MAX_EXPIRY_NS = 4102444800 * 10**9  # 2100-01-01: keep_alive < 0 means "for ever"
WAITRESS_OPTIONS = {  # Ollama sets no timeouts or body limit; lookahead=1 lets waitress notice a departed client
    "ident": "",
    "channel_timeout": 3600,
    "channel_request_lookahead": 1,
    "max_request_body_size": 1 << 40,
    "asyncore_use_poll": True,
}


def _model(family, params, quant, size, ctx, dims, caps, modified_ns, remote=None):
    digest = hashlib.sha256(f"{family}{params}".encode()).hexdigest()
    return {
        "remote": remote or {},  # a cloud model: remote_model and remote_host, on its tags entry and answers
        "family": family,
        "parameter_size": params,
        "quantization_level": quant,
        "size": size,
        "digest": digest,
        "context_length": ctx,
        "embedding_length": dims,
        "capabilities": caps,
        "modified_ns": modified_ns,
    }


CATALOG = {  # what "the registry" can pull; a fresh fake has all of them installed
    "llama3.2:latest": _model(
        "llama", "3.2B", "Q4_K_M", 2019393189, 131072, 3072, ["completion", "tools"], 1746405464706015396
    ),
    "all-minilm:latest": _model("bert", "23M", "F16", 45960996, 512, 384, ["embedding"], 1746405001250402937),
    "qwen3:latest": _model(
        "qwen3", "8.2B", "Q4_K_M", 5225388164, 40960, 4096, ["completion", "tools", "thinking"], 1746404002000000000
    ),
    # A cloud model (server/routes.go, remote model path): run on ollama.com, answered through the local server
    "gpt-oss:120b-cloud": _model(
        "gptoss",
        "116.8B",
        "MXFP4",
        384,
        131072,
        2880,
        ["completion", "tools", "thinking"],
        1746403001000000000,
        {"remote_model": "gpt-oss:120b", "remote_host": "https://ollama.com:443"},
    ),
}
TEMPLATE = "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"


def rfc3339(ns: int, local: bool = False) -> str:
    """Format like Go's RFC3339Nano: trailing zeros trimmed; `Z` when the offset is zero."""
    seconds, fraction = divmod(ns, 10**9)
    moment = datetime.fromtimestamp(seconds).astimezone() if local else datetime.fromtimestamp(seconds, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    offset = moment.strftime("%z")
    return text + ("Z" if offset in ("+0000", "") else f"{offset[:3]}:{offset[3:]}")


def _now() -> str:
    return rfc3339(time.time_ns())


def normalize(name: str) -> str:
    """Give a model name its default tag: `llama3.2` -> `llama3.2:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def count_words(text: str) -> int:
    """Our tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def chat_text(messages) -> str:
    """Join the text of chat messages, native or OpenAI (string or list of text parts)."""
    parts = []
    for message in messages or []:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content)
    return " ".join(parts)


def make_tokens(n: int) -> list[str]:
    """Make `n` output tokens for the `X-Fake-Tokens: <n>` header."""
    return ["tok" if i == 0 else " tok" for i in range(n)]


@lru_cache(maxsize=512)
def _vector(text: str, dims: int) -> tuple[float, ...]:
    rng = random.Random(zlib.crc32(text.encode()))
    values = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


def _float32(values) -> list[float]:
    return [float(f"{v:.8g}") for v in values]  # about what Go prints for a float32


def _optional_int(value: str):
    return None if value.strip().lower() in ("", "none", "null") else int(value)


KNOBS = {  # name -> parser for its X-Fake-<Name> header
    "tokens": lambda v: json.loads(v) if v.lstrip().startswith("[") else make_tokens(int(v)),
    "token_delay": float,
    "load_delay": float,
    "error_after": _optional_int,
    "cut_after": _optional_int,
    "fail_status": _optional_int,
    "omit_done": lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
    "v1_legacy_layout": lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
    "cached_tokens": _optional_int,
}


class _Fail(Exception):
    """An error reply. `early` marks /v1 request-validation errors (gin c.JSON instead of json.Encoder)."""

    def __init__(self, status: int, message: str, early: bool = False):
        super().__init__(message)
        self.status, self.message, self.early = status, message, early


class _Cut(Exception):
    """Raised from the body iterator so that waitress drops the socket without the last chunk."""


@dataclass
class _Stream:
    """A streamed reply: objects made lazily, then a final one, each rendered as one flushed chunk."""

    events: object
    final: object  # callable returning the done/success object
    render: object = lambda obj: (go_json(obj) + "\n").encode()
    error: dict = field(default_factory=lambda: {"error": MODEL_ERROR})


@dataclass
class _Reply:
    status: int
    ctype: str | None = JSON_UTF8
    body: bytes | str | _Stream = b""
    headers: list = field(default_factory=list)


@dataclass
class _Plan:
    """One generation: who asked, what comes out, and the metrics Ollama would report."""

    model: str
    prompt_tokens: int
    thinking: list
    tokens: list
    tool_calls: list
    done_reason: str = "stop"
    remote: dict = field(default_factory=dict)  # remote_model and remote_host of a cloud model

    @property
    def eval_count(self) -> int:
        return len(self.thinking) + len(self.tokens) + len(self.tool_calls)

    def metrics(self, knobs) -> dict:
        load = int(knobs.load_delay * 1e9) or 1_000_000
        prompt = self.prompt_tokens * 1_000_000
        gen = self.eval_count * (int(knobs.token_delay * 1e9) or 10_000_000)
        values = {
            "total_duration": load + prompt + gen + 500_000,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            # api/types.go Metrics on Ollama's cache-metrics branch: the part of the prompt read from the cache
            "prompt_eval_cached_count": min(knobs.cached_tokens or 0, self.prompt_tokens),
            "prompt_eval_duration": prompt,
            "eval_count": self.eval_count,
            "eval_duration": gen,
        }
        return {k: v for k, v in values.items() if v}  # omitempty


class FakeOllama:
    """WSGI app that imitates `ollama serve`.

    Knobs are attributes (tests mutate them between calls); each can also be set for one request with an
    `X-Fake-<Knob-Name>` header, e.g. `X-Fake-Token-Delay: 0.05`:
      tokens            output tokens; the header takes a count (`64`) or a JSON list
      token_delay       seconds between streamed lines (a non-stream reply waits for all of them)
      line_gate         attribute only: a threading.Semaphore a stream acquires before each line after the first
                        (up to 10 s), so a test can let lines out one at a time
      load_delay        seconds before a POST's reply starts (headers and first byte)
      error_after       after N lines send Ollama's mid-stream error and end (non-stream: a 500 reply)
      cut_after         streams only: after N >= 1 lines drop the connection without the terminating chunk
      fail_status       answer every POST with this status and Ollama's body for it (404, 500, 503, ...)
      omit_done         end streams cleanly but without the done/success line
      v1_legacy_layout  /v1 chat streams as before v0.32.10 (role in every delta, finish on the last chunk)
      cached_tokens     prompt tokens read from the cache: prompt_eval_cached_count (omitted while 0) and the
                        cached-token usage fields of /v1 chat, Responses and Anthropic; None = a server without them
    For tests: `seen` (a dict per request), counters `completed`, `cancelled` (client left), `aborted` (cut),
    `wait_for(predicate)`, and the expected_* token helpers. State: `models`, `loaded` (/api/ps), `blobs`.
    /api/ps knobs (attributes only): `set_loaded(*names)` replaces the loaded list, `ps_fail_status` answers /api/ps
    with that status, `ps_omit` drops those fields from each entry (an older Ollama); `ps_polls` counts the proxy's
    residency polls, which stay out of `seen`.
    """

    def __init__(self):
        self.check_host = True  # Ollama checks Host only when bound to loopback
        self._changed = threading.Condition()
        self._hostname = socket.gethostname().lower()
        self._routes = self._make_routes()
        self.reset()

    def reset(self):
        """Restore default knobs, models and counters (use between tests on a shared server)."""
        self.tokens = list(DEFAULT_TOKENS)
        self.token_delay = self.load_delay = 0.0
        self.line_gate = None
        self.error_after = self.cut_after = self.fail_status = None
        self.omit_done = self.v1_legacy_layout = False
        self.cached_tokens = None
        self.models = {name: dict(info) for name, info in CATALOG.items()}
        self.loaded, self.blobs, self.seen = {}, set(), []
        self.completed = self.cancelled = self.aborted = 0
        self.ps_fail_status, self.ps_omit, self.ps_polls = None, (), 0

    # -- expected counts, for tests ---------------------------------------------------------------
    @staticmethod
    def expected_prompt_tokens(text: str) -> int:
        """prompt_eval_count for a generate prompt (system and prompt joined by a space)."""
        return count_words(text) + PROMPT_OVERHEAD_TOKENS

    def expected_chat_prompt_tokens(self, messages) -> int:
        """prompt_eval_count (or usage.prompt_tokens) for a list of chat messages."""
        return self.expected_prompt_tokens(chat_text(messages))

    @staticmethod
    def expected_embed_tokens(inputs) -> int:
        """prompt_eval_count of /api/embed (and usage of /v1/embeddings) for a string or list of strings."""
        inputs = [inputs] if isinstance(inputs, str) else inputs
        return sum(FakeOllama.expected_prompt_tokens(s) for s in inputs if s)

    def expected_eval_tokens(self, think: bool = False, tool_call: bool = False, tokens=None) -> int:
        """eval_count: one per streamed line (thinking lines, then content or a single tool call)."""
        content = 1 if tool_call else len(self.tokens if tokens is None else tokens)
        return (len(THINKING_TOKENS) if think else 0) + content

    def wait_for(self, predicate, timeout: float = 5.0):
        """Block until predicate() is true; counters and `seen` change under this condition."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError("fake_ollama: condition not reached")

    # -- WSGI ---------------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        req = SimpleNamespace(
            environ=environ,
            method=environ["REQUEST_METHOD"],
            path=environ.get("PATH_INFO", "/"),
            knobs=self._knobs(environ),
            body=b"",
            param="",
        )
        req.v1 = req.path.startswith("/v1/")
        req.entry = self._record(environ, req)
        try:
            reply = self._route(req)
        except _Fail as fail:
            reply = self._error_reply(req, fail)
        return self._respond(req, reply, start_response)

    def _knobs(self, environ):
        values = {}
        for name, parse in KNOBS.items():
            header = environ.get("HTTP_X_FAKE_" + name.upper())
            values[name] = parse(header) if header is not None else getattr(self, name)
        return SimpleNamespace(**values, line_gate=self.line_gate)

    def _record(self, environ, req) -> dict:
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").title()] = environ[key]
        if not (req.method == "POST" and req.path.startswith("/api/blobs/")):  # blobs are hashed in pieces
            req.body = b"".join(_iter_body(environ))
        entry = {
            "method": req.method,
            "path": req.path,
            "query": environ.get("QUERY_STRING", ""),
            "headers": headers,
            "body_len": len(req.body),
            "body": req.body if len(req.body) < SEEN_BODY_LIMIT else None,
        }
        with self._changed:
            if req.path == "/api/ps" and headers.get("User-Agent", "").startswith("ollama-proxy-residency/"):
                self.ps_polls += 1  # the proxy's own poller, kept out of `seen` (tests read it as the relayed calls)
            else:
                self.seen.append(entry)
            self._changed.notify_all()
        return entry

    def _respond(self, req, reply, start_response):
        headers = ([("Content-Type", reply.ctype)] if reply.ctype else []) + reply.headers
        if isinstance(reply.body, _Stream):
            chunks = self._run_stream(reply.body, req.knobs)
        else:
            body = reply.body.encode() if isinstance(reply.body, str) else reply.body
            if req.method == "HEAD" or len(body) <= GO_BUFFER_BYTES:
                headers.append(("Content-Length", str(len(body))))
            chunks = iter([body] if body and req.method != "HEAD" else [])
        start_response(f"{reply.status} {_phrase(reply.status)}", headers)
        return self._track(chunks, req.environ.get("waitress.client_disconnected"))

    def _track(self, chunks, is_gone):
        """Hand chunks to the server and count how the reply ended: completed, cancelled or aborted."""
        outcome = "cancelled"
        try:
            for chunk in chunks:
                if is_gone is not None and is_gone():
                    return  # like Ollama cancelling the request context
                yield chunk
            outcome = "completed"
        except _Cut:
            outcome = "aborted"
            raise
        finally:
            with self._changed:
                setattr(self, outcome, getattr(self, outcome) + 1)
                self._changed.notify_all()

    def _run_stream(self, stream, knobs):
        for n, obj in enumerate(self._stream_objects(stream, knobs)):
            if n == knobs.cut_after:
                raise _Cut(f"cut after {n} lines")
            yield stream.render(obj)
        if knobs.cut_after is not None:
            raise _Cut("cut before the terminating chunk")

    @staticmethod
    def _stream_objects(stream, knobs):
        """Yield a stream's objects with token_delay, error_after and omit_done applied."""
        events, n = iter(stream.events), 0
        while True:
            if n and knobs.token_delay:
                time.sleep(knobs.token_delay)
            if n and knobs.line_gate is not None:
                knobs.line_gate.acquire(timeout=10)
            if n == knobs.error_after:
                yield stream.error
                return
            obj = next(events, None)
            if obj is None:
                break
            yield obj
            n += 1
        if knobs.error_after is not None:
            yield stream.error
        elif not knobs.omit_done:
            yield stream.final()

    # -- routing ------------------------------------------------------------------------------------
    def _make_routes(self) -> dict:
        """Path -> {method: handler}; a path ending in "/" takes one more segment (gin's `:param`)."""
        return {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/api/blobs/": {"HEAD": self._blob_head, "POST": self._blob_post},
            "/v1/chat/completions": {"POST": self._v1_chat},
            "/v1/completions": {"POST": self._v1_completions},
            "/v1/embeddings": {"POST": self._v1_embeddings},
            "/v1/models": {"GET": self._v1_models},
            "/v1/models/": {"GET": self._v1_model},
            "/v1/responses": {"POST": self._v1_responses},
            "/v1/messages": {"POST": self._v1_messages},
        }

    def _match(self, path):
        if path in self._routes:
            return self._routes[path], ""
        prefix, _, param = path.rpartition("/")
        if param and prefix and prefix + "/" in self._routes:  # /api/blobs/:digest, /v1/models/:model
            return self._routes[prefix + "/"], param
        return None, ""

    def _route(self, req) -> _Reply:
        if self.check_host and not _is_allowed_host(req.environ.get("HTTP_HOST", ""), self._hostname):
            return _Reply(403, None)
        methods, req.param = self._match(req.path)
        if methods is None:
            return self._redirect_or_404(req)
        handler = methods.get(req.method)
        if handler is None:
            return _Reply(405, "text/plain", "405 method not allowed")
        if req.method == "POST":
            self._before_work(req)
        return handler(req)

    def _redirect_or_404(self, req) -> _Reply:
        if req.path.endswith("/") and self._match(req.path[:-1])[0]:  # gin's RedirectTrailingSlash
            query = req.environ.get("QUERY_STRING")
            target = req.path[:-1] + (f"?{query}" if query else "")
            if req.method in ("GET", "HEAD"):
                body = f'<a href="{target}">Moved Permanently</a>.\n\n'
                return _Reply(301, "text/html; charset=utf-8", body, [("Location", target)])
            return _Reply(307, None, b"", [("Location", target)])
        return _Reply(404, "text/plain", "404 page not found")

    def _before_work(self, req):
        """Apply load_delay and fail_status to work requests (every POST)."""
        if req.knobs.load_delay:
            time.sleep(req.knobs.load_delay)
        status = req.knobs.fail_status
        if status:
            messages = {
                404: self._not_found_message(req),
                500: "llama runner process has terminated: exit status 2",
                503: "server busy, please try again.  maximum pending requests exceeded",
            }
            raise _Fail(status, messages.get(status, _phrase(status).lower() or "error"))

    def _not_found_message(self, req) -> str:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        name = body.get("model") or body.get("name") or body.get("source") or ""
        if req.path in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
            return f'model "{name}" not found, try pulling it first'
        return f'model "{name}" not found' if req.path == "/api/copy" else f"model '{name}' not found"

    @staticmethod
    def _error_reply(req, fail) -> _Reply:
        if not req.v1:
            return _Reply(fail.status, JSON_UTF8, go_json({"error": fail.message}))
        if req.path == "/v1/messages":  # Anthropic's shape (anthropic/anthropic.go NewError)
            body = fake_formats.anthropic_error(fail.status, fail.message)
            return _Reply(fail.status, JSON_UTF8, body) if fail.early else _Reply(fail.status, V1_JSON, body + "\n")
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(fail.status, "api_error")
        body = go_json({"error": {"message": fail.message, "type": kind, "param": None, "code": None}})
        if fail.early:
            return _Reply(fail.status, JSON_UTF8, body)
        return _Reply(fail.status, "application/json", body + "\n")

    # -- request helpers ----------------------------------------------------------------------------
    def _json(self, req) -> dict:
        """Decode the body like Ollama: empty -> `missing request body` (native) or `EOF` (/v1)."""
        if not req.body.strip():
            raise _Fail(400, "EOF" if req.v1 else "missing request body", early=True)
        try:
            body = json.loads(req.body)
        except ValueError as error:
            raise _Fail(400, _go_decode_error(req.body, error), early=True) from None
        if body is None:
            return {}  # Go decodes `null` into an empty request
        if not isinstance(body, dict):
            kind = {list: "array", str: "string", bool: "bool"}.get(type(body), "number")
            raise _Fail(400, f"json: cannot unmarshal {kind} into Go value of type api.Request", early=True)
        return body

    def _find(self, name, message="model '{}' not found") -> tuple[str, dict]:
        """Return (key, info) of an installed model or fail with Ollama's 404."""
        key = normalize(name or "")
        if not name:
            raise _Fail(400, "model is required")
        if key not in self.models:
            raise _Fail(404, message.format(name))
        return key, self.models[key]

    def _touch(self, key, keep_alive):
        seconds = _keep_alive_seconds(keep_alive)
        if seconds == 0:
            self.loaded.pop(key, None)
        else:
            self.loaded[key] = MAX_EXPIRY_NS if seconds < 0 else time.time_ns() + int(seconds * 1e9)

    def _plan(self, req, verb, model, text, info, think, tools=(), num_predict=None) -> _Plan:
        """Decide one generation's output; 400 when the model lacks a capability (`"x" does not support chat`)."""
        for cap, wanted in (("completion", verb), ("thinking", think), ("tools", bool(tools))):
            if wanted and cap not in info["capabilities"]:
                raise _Fail(400, f'"{model}" does not support {verb if cap == "completion" else cap}')
        tokens, tool_calls, reason = list(req.knobs.tokens), [], "stop"
        if tools:
            tokens, tool_calls = [], [_tool_call(tools[0])]
        if isinstance(num_predict, int) and 0 <= num_predict < len(tokens):
            tokens, reason = tokens[:num_predict], "length"
        thinking = list(THINKING_TOKENS) if think else []
        return _Plan(model, self.expected_prompt_tokens(text), thinking, tokens, tool_calls, reason, info["remote"])

    def _finish(self, plan, knobs):
        """Non-stream replies arrive only after the whole generation; error_after turns into a 500."""
        if knobs.token_delay:
            time.sleep(knobs.token_delay * plan.eval_count)
        if knobs.error_after is not None:
            raise _Fail(500, MODEL_ERROR)

    # -- native endpoints ---------------------------------------------------------------------------
    def _root(self, req):
        return _Reply(200, "text/plain; charset=utf-8", "Ollama is running")

    def _version(self, req):
        return _Reply(200, JSON_UTF8, go_json({"version": VERSION}))

    def _tags(self, req):
        names = sorted(self.models, key=lambda n: -self.models[n]["modified_ns"])
        return _Reply(200, JSON_UTF8, go_json({"models": [self._tag_entry(n) for n in names]}))

    def _tag_entry(self, name) -> dict:
        info = self.models[name]
        return {
            "name": name,
            "model": name,
            **info["remote"],  # api/types.go ListModelResponse
            "modified_at": rfc3339(info["modified_ns"], local=True),
            "size": info["size"],
            "digest": info["digest"],
            "details": _details(info),
        }

    def set_loaded(self, *names: str, seconds: float = 300.0) -> None:
        """Make /api/ps list exactly these installed models, each expiring ``seconds`` from now."""
        self.loaded = {normalize(name): time.time_ns() + int(seconds * 1e9) for name in names}

    def _ps(self, req):
        # Like server/routes.go PsHandler: the scheduler's loaded runners as api.ProcessModelResponse entries (name,
        # model, size, digest, details, expires_at, size_vram, context_length), those not yet expired.
        if self.ps_fail_status:
            return _Reply(self.ps_fail_status, JSON_UTF8, go_json({"error": "ps failed"}))
        now, models = time.time_ns(), []
        for name, expires in list(self.loaded.items()):
            if expires > now and name in self.models:
                info = self.models[name]
                models.append(
                    {
                        "name": name,
                        "model": name,
                        "size": info["size"],
                        "digest": info["digest"],
                        "details": _details(info),
                        "expires_at": rfc3339(expires, local=True),
                        "size_vram": info["size"],
                        "context_length": 4096,
                    }
                )
        models = [{key: value for key, value in entry.items() if key not in self.ps_omit} for entry in models]
        return _Reply(200, JSON_UTF8, go_json({"models": models}))

    def _show(self, req):
        body = self._json(req)
        key, info = self._find(body.get("model") or body.get("name"))
        family = info["family"]
        model_info = {
            "general.architecture": family,
            "general.parameter_count": info["size"] // 2,
            f"{family}.context_length": info["context_length"],
            f"{family}.embedding_length": info["embedding_length"],
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": None,
        }
        modelfile = (
            f'# Modelfile generated by "ollama show"\n# FROM {key}\n\n'
            f'FROM /root/.ollama/models/blobs/sha256-{info["digest"]}\nTEMPLATE """{TEMPLATE}"""\n'
        )
        obj = {
            "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n" + "Terms & conditions. " * 60,
            "modelfile": modelfile,
            "parameters": 'stop                           "<|eot_id|>"',
            "template": TEMPLATE,
            "details": _details(info),
            "model_info": dict(sorted(model_info.items())),
            "capabilities": info["capabilities"],
            "modified_at": rfc3339(info["modified_ns"], local=True),
        }
        return _Reply(200, JSON_UTF8, go_json(obj))

    def _load_reply(self, key, name, keep_alive, chat) -> _Reply:
        """Empty prompt or no messages: one plain JSON object that loads (or unloads) the model."""
        self._touch(key, keep_alive)
        obj = {"model": name, "created_at": _now()}
        obj.update({"message": _message()} if chat else {"response": ""})
        obj.update(done=True, done_reason="unload" if _keep_alive_seconds(keep_alive) == 0 else "load")
        return _Reply(200, JSON_UTF8, go_json(obj))

    def _generate(self, req):
        body = self._json(req)
        name = body.get("model")
        key, info = self._find(name)
        if not body.get("prompt") and not body.get("images"):
            return self._load_reply(key, name, body.get("keep_alive"), chat=False)
        text = " ".join(filter(None, [body.get("system"), body.get("prompt")]))
        plan = self._plan(
            req,
            "generate",
            name,
            text,
            info,
            _wants_think(body.get("think")),
            num_predict=(body.get("options") or {}).get("num_predict"),
        )
        self._touch(key, body.get("keep_alive"))
        raw, knobs = bool(body.get("raw")), req.knobs
        if body.get("stream") is False:
            self._finish(plan, knobs)
            return _Reply(200, JSON_UTF8, _native_body(plan, _generate_final(plan, knobs, raw, full=True)))
        return _Reply(200, NDJSON, _Stream(_generate_events(plan), lambda: _generate_final(plan, knobs, raw)))

    def _chat(self, req):
        body = self._json(req)
        name, messages = body.get("model"), body.get("messages") or []
        key, info = self._find(name)
        if not messages:
            return self._load_reply(key, name, body.get("keep_alive"), chat=True)
        plan = self._chat_plan(req, body, name, info, _wants_think(body.get("think")))
        self._touch(key, body.get("keep_alive"))
        if body.get("stream") is False:
            self._finish(plan, req.knobs)
            return _Reply(200, JSON_UTF8, _native_body(plan, _chat_final(plan, req.knobs, full=True)))
        return _Reply(200, NDJSON, _Stream(_chat_events(plan), lambda: _chat_final(plan, req.knobs)))

    def _chat_plan(self, req, body, name, info, think, num_predict=None) -> _Plan:
        messages = body.get("messages") or []
        tools = body.get("tools") or []
        answering_tool = messages[-1].get("role") == "tool"  # after a tool result the model answers in text
        if num_predict is None:
            num_predict = (body.get("options") or {}).get("num_predict")
        return self._plan(
            req, "chat", name, chat_text(messages), info, think, [] if answering_tool else tools, num_predict
        )

    def _embed(self, req):
        body = self._json(req)
        name = body.get("model")
        key, info = self._find(name, 'model "{}" not found, try pulling it first')
        raw = body.get("input")
        texts = [t for t in ([raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []) if t]
        if not texts:
            return _Reply(200, JSON_UTF8, go_json({"model": name, "embeddings": []}))
        self._touch(key, body.get("keep_alive"))
        dims = body.get("dimensions") or info["embedding_length"]
        vectors = [_float32(_renormalize(_vector(t, info["embedding_length"])[:dims])) for t in texts]
        tokens = self.expected_embed_tokens(texts)
        obj = {
            "model": name,
            "embeddings": vectors,
            "total_duration": 14_143_917 + tokens * 100_000,
            "load_duration": int(req.knobs.load_delay * 1e9) or 1_019_500,
            "prompt_eval_count": tokens,
        }
        return _Reply(200, JSON_UTF8, go_json(obj))

    def _embeddings(self, req):
        body = self._json(req)
        key, info = self._find(body.get("model"), 'model "{}" not found, try pulling it first')
        prompt = body.get("prompt") or ""
        vector = list(_vector(prompt, info["embedding_length"])) if prompt else []
        return _Reply(200, JSON_UTF8, go_json({"embedding": vector}))

    def _progress_reply(self, req, body, events: list, final) -> _Reply:
        """Stream progress lines then `final()`; with stream:false send only the last object, after the work."""
        if body.get("stream") is False:
            time.sleep(req.knobs.token_delay * len(events))
            last = final()
            if "error" in last:
                raise _Fail(500, last["error"])
            return _Reply(200, JSON_UTF8, go_json(last))
        return _Reply(200, NDJSON, _Stream(events, final))

    def _pull(self, req):
        body = self._json(req)
        key = normalize(body.get("model") or body.get("name") or "")
        if key not in CATALOG:
            error = {"error": "pull model manifest: file does not exist"}
            return self._progress_reply(req, body, [{"status": "pulling manifest"}], lambda: error)

        def install():
            self.models[key] = dict(CATALOG[key])
            return {"status": "success"}

        layers = _layer_progress("pulling", CATALOG[key])
        events = [
            {"status": "pulling manifest"},
            *layers,
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
        ]
        return self._progress_reply(req, body, events, install)

    def _push(self, req):
        body = self._json(req)
        name = body.get("model") or body.get("name") or ""
        key, info = self._find(name, 'model "{}" not found')
        events = [{"status": "retrieving manifest"}, *_layer_progress("pushing", info), {"status": "pushing manifest"}]
        return self._progress_reply(req, body, events, lambda: {"status": "success"})

    def _create(self, req):
        body = self._json(req)
        name = body.get("model") or body.get("name")
        if not name:
            raise _Fail(400, "model is required")
        key, source = normalize(name), normalize(body.get("from") or "llama3.2")
        digests = list((body.get("files") or {}).values())
        events = [{"status": "parsing GGUF"}] if digests else []
        events += [{"status": f"using existing layer {d}"} for d in digests]
        events.append({"status": "writing manifest"})

        def install():
            if source not in self.models:
                return {"error": "pull model manifest: file does not exist"}
            self.models[key] = dict(self.models[source], modified_ns=time.time_ns())
            return {"status": "success"}

        return self._progress_reply(req, body, events, install)

    def _copy(self, req):
        body = self._json(req)
        source, _ = self._find(body.get("source"), 'model "{}" not found')
        self.models[normalize(body.get("destination") or "")] = dict(self.models[source], modified_ns=time.time_ns())
        return _Reply(200, None)

    def _delete(self, req):
        body = self._json(req)
        key, _ = self._find(body.get("model") or body.get("name"))
        del self.models[key]
        self.loaded.pop(key, None)
        return _Reply(200, None)

    def _blob_head(self, req):
        _check_digest(req.param)
        return _Reply(200 if req.param in self.blobs else 404, None)

    def _blob_post(self, req):
        """Hash the upload in 64 KiB pieces; keep only the digest, never the whole body."""
        _check_digest(req.param)
        hasher, size, kept = hashlib.sha256(), 0, bytearray()
        for piece in _iter_body(req.environ):
            hasher.update(piece)
            size += len(piece)
            if size < SEEN_BODY_LIMIT:
                kept += piece
        req.entry.update(body_len=size, body=bytes(kept) if size < SEEN_BODY_LIMIT else None)
        if req.param in self.blobs:
            return _Reply(200, None)
        actual = "sha256:" + hasher.hexdigest()
        if actual != req.param:
            raise _Fail(400, f'digest mismatch, expected "{req.param}", got "{actual}"')
        self.blobs.add(actual)
        return _Reply(201, None)

    # -- OpenAI-compatible endpoints ------------------------------------------------------------------
    def _v1_chat(self, req):
        body = self._json(req)
        if not body.get("messages"):
            raise _Fail(400, "[] is too short - 'messages'", early=True)
        name = body.get("model") or ""
        key, info = self._find(name)
        effort = body.get("reasoning_effort") or (body.get("reasoning") or {}).get("effort")
        plan = self._chat_plan(req, body, name, info, effort not in (None, "none"), body.get("max_tokens"))
        self._touch(key, None)
        cid, knobs = f"chatcmpl-{random.randrange(999)}", req.knobs
        if not body.get("stream"):
            self._finish(plan, knobs)
            return _Reply(200, "application/json", go_json(_v1_chat_completion(cid, plan, knobs)) + "\n")
        render = _v1_chat_renderer(cid, knobs.v1_legacy_layout, _include_usage(body), _is_cached(knobs))
        stream = _Stream(_chat_events(plan), lambda: _chat_final(plan, knobs), render)
        return _Reply(200, "text/event-stream", stream)

    def _v1_completions(self, req):
        body = self._json(req)
        name = body.get("model") or ""
        key, info = self._find(name)
        plan = self._plan(
            req, "generate", name, body.get("prompt") or "", info, False, num_predict=body.get("max_tokens")
        )
        self._touch(key, None)
        cid, knobs = f"cmpl-{random.randrange(999)}", req.knobs
        if not body.get("stream"):
            self._finish(plan, knobs)
            final = _generate_final(plan, knobs, raw=True, full=True)
            obj = {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": final["response"], "index": 0, "finish_reason": plan.done_reason}],
                "usage": _usage(final, _is_cached(knobs)),
            }
            return _Reply(200, "application/json", go_json(obj) + "\n")
        render = _v1_completion_renderer(cid, _include_usage(body), _is_cached(knobs))
        stream = _Stream(_generate_events(plan), lambda: _generate_final(plan, knobs, raw=True), render)
        return _Reply(200, "text/event-stream", stream)

    def _v1_embeddings(self, req):
        body = self._json(req)
        raw, fmt = body.get("input"), (body.get("encoding_format") or "float").lower()
        if fmt not in ("float", "base64"):
            raise _Fail(
                400, f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].", early=True
            )
        texts = [""] if raw == "" else [raw] if isinstance(raw, str) else raw
        if not texts or not isinstance(texts, list):
            raise _Fail(400, "invalid input", early=True)
        name = body.get("model") or ""
        _, info = self._find(name, 'model "{}" not found, try pulling it first')
        data = []
        for i, text in enumerate(texts):
            vector = _float32(_vector(str(text), info["embedding_length"]))
            if fmt == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": i})
        tokens = self.expected_embed_tokens([str(t) for t in texts])
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        obj = {"object": "list", "data": data, "model": name, "usage": usage}
        return _Reply(200, "application/json", go_json(obj) + "\n")

    def _v1_responses(self, req):
        """openai/responses.go and middleware/openai.go (ResponsesMiddleware): a chat answer converted."""
        body = self._json(req)
        name = body.get("model") or ""
        key, info = self._find(name)
        chat = {"messages": fake_formats.responses_messages(body), "tools": fake_formats.responses_tools(body)}
        think = (body.get("reasoning") or {}).get("effort") not in (None, "", "none")
        if chat["messages"]:
            plan = self._chat_plan(req, chat, name, info, think, body.get("max_output_tokens"))
        else:  # no input: the chat handler's load reply (done, no text, no counts), converted like any answer
            plan = _Plan(name, 0, [], [], [], "load", info["remote"])
        self._touch(key, None)
        rid, item_id = f"resp_{random.randrange(999999)}", f"msg_{random.randrange(999999)}"
        knobs, cached = req.knobs, _is_cached(req.knobs)
        if body.get("stream") is not True:  # streams only when asked (ResponsesMiddleware)
            self._finish(plan, knobs)
            final = _chat_final(plan, knobs, full=True)
            return _Reply(200, V1_JSON, fake_formats.responses_body(rid, item_id, name, final, body, cached))
        render = fake_formats.ResponsesEvents(rid, item_id, name, body, cached)
        stream = _Stream(_chat_events(plan), lambda: _chat_final(plan, knobs), render)
        return _Reply(200, "text/event-stream", stream, [("Cache-Control", "no-cache")])

    def _v1_messages(self, req):
        """anthropic/anthropic.go and middleware/anthropic.go (AnthropicMessagesMiddleware): a chat answer converted."""
        body = self._json(req)
        for check, message in fake_formats.ANTHROPIC_CHECKS:
            if not check(body):
                raise _Fail(400, message, early=True)
        name = body["model"]
        key, info = self._find(name)
        messages = fake_formats.anthropic_messages(body)
        chat = {"messages": messages, "tools": fake_formats.anthropic_tools(body)}
        think = (body.get("thinking") or {}).get("type") == "enabled"
        plan = self._chat_plan(req, chat, name, info, think, body["max_tokens"])
        self._touch(key, None)
        mid, knobs, cached = fake_formats.message_id(), req.knobs, _is_cached(req.knobs)
        if not body.get("stream"):
            self._finish(plan, knobs)
            return _Reply(200, V1_JSON, fake_formats.messages_body(mid, _chat_final(plan, knobs, full=True), cached))
        estimate = len(chat_text(messages)) // 4  # anthropic.EstimateInputTokens: about four characters a token
        render = fake_formats.MessagesEvents(mid, name, estimate, cached)
        stream = _Stream(_chat_events(plan), lambda: _chat_final(plan, knobs), render)
        return _Reply(200, "text/event-stream", stream, [("Cache-Control", "no-cache")])

    def _v1_models(self, req):
        data = [_v1_model_entry(name, self.models[name]) for name in self.models] or None
        return _Reply(200, "application/json", go_json({"object": "list", "data": data}) + "\n")

    def _v1_model(self, req):
        _, info = self._find(req.param)
        return _Reply(200, "application/json", go_json(_v1_model_entry(req.param, info)) + "\n")


# -- pure helpers -------------------------------------------------------------------------------------
def _iter_body(environ):
    """Yield the request body in 64 KiB pieces."""
    stream = environ["wsgi.input"]
    remaining = None if environ.get("wsgi.input_terminated") else int(environ.get("CONTENT_LENGTH") or 0)
    while remaining is None or remaining > 0:
        piece = stream.read(PIECE_BYTES if remaining is None else min(PIECE_BYTES, remaining))
        if not piece:
            return
        if remaining is not None:
            remaining -= len(piece)
        yield piece


def _is_allowed_host(host: str, hostname: str) -> bool:
    """Ollama's Host check for a loopback listener: localhost, local/private IPs, *.localhost|local|internal."""
    host = host.lower()
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host in ("", "localhost", hostname) or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _go_decode_error(body: bytes, error) -> str:
    """Approximate Go's json decoder message for a malformed body."""
    text, pos = body.decode("utf-8", "replace"), getattr(error, "pos", 0)
    if pos >= len(text.rstrip()):
        return "unexpected EOF"
    return f"invalid character '{text[pos]}' looking for beginning of value"


def _keep_alive_seconds(value) -> float:
    """Parse keep_alive: None -> 5m; a number of seconds; or a Go duration like "10m"; < 0 means for ever."""
    if value is None:
        return 300.0
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(-?[\d.]+)(ms|s|m|h)?", str(value).strip())
    if not match:
        return 300.0
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def _wants_think(value) -> bool:
    return value not in (None, False, "", "none")


def _is_cached(knobs) -> bool:
    """Whether this server reports cached prompt tokens in its /v1, Responses and Anthropic usage."""
    return knobs.cached_tokens is not None


def _include_usage(body) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _check_digest(digest):
    if not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
        raise _Fail(400, "invalid digest format")


def _details(info) -> dict:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info["family"],
        "families": [info["family"]],
        "parameter_size": info["parameter_size"],
        "quantization_level": info["quantization_level"],
    }


def _renormalize(values) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _layer_progress(verb, info):
    """Progress lines for a model's layers; `completed` is omitted while it is zero (omitempty)."""
    for digest, total in ((info["digest"], info["size"]), (hashlib.sha256(info["digest"].encode()).hexdigest(), 1429)):
        for step in range(PROGRESS_STEPS + 1):
            line = {"status": f"{verb} {digest[:12]}", "digest": f"sha256:{digest}", "total": total}
            if step:
                line["completed"] = total * step // PROGRESS_STEPS
            yield line


def _tool_call(tool) -> dict:
    function = tool.get("function") or {}
    properties = (function.get("parameters") or {}).get("properties") or {}
    return {
        "id": f"call_{os.urandom(4).hex()}",
        "function": {"index": 0, "name": function.get("name", ""), "arguments": dict.fromkeys(properties, "Paris")},
    }


def _message(content="", thinking="", tool_calls=None) -> dict:
    message = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _generate_events(plan):
    """Intermediate generate lines: thinking, then one line per token; no metrics."""
    pieces = [("", {"thinking": t}) for t in plan.thinking] + [(t, {}) for t in plan.tokens]
    for response, extra in pieces:
        yield {"model": plan.model, **plan.remote, "created_at": _now(), "response": response, **extra, "done": False}


def _generate_final(plan, knobs, raw, full=False) -> dict:
    obj = {"model": plan.model, **plan.remote, "created_at": _now(), "response": "".join(plan.tokens) if full else ""}
    if full and plan.thinking:
        obj["thinking"] = "".join(plan.thinking)
    obj.update(done=True, done_reason=plan.done_reason)
    if not raw:
        obj["context"] = list(range(128000, 128000 + plan.prompt_tokens + plan.eval_count))
    obj.update(plan.metrics(knobs))
    return obj


def _chat_events(plan):
    """Intermediate chat lines: thinking, then content tokens or one tool-call line."""
    messages = [_message(thinking=t) for t in plan.thinking] + [_message(t) for t in plan.tokens]
    if plan.tool_calls:
        messages.append(_message(tool_calls=plan.tool_calls))
    for message in messages:
        yield {"model": plan.model, **plan.remote, "created_at": _now(), "message": message, "done": False}


def _chat_final(plan, knobs, full=False) -> dict:
    message = _message("".join(plan.tokens), "".join(plan.thinking), plan.tool_calls) if full else _message()
    return {
        "model": plan.model,
        **plan.remote,
        "created_at": _now(),
        "message": message,
        "done": True,
        "done_reason": plan.done_reason,
        **plan.metrics(knobs),
    }


def _native_body(plan, obj) -> str:
    """A native non-stream reply: gin's c.JSON, or for a cloud model json.Marshal plus a newline (server/routes.go)."""
    return go_json(obj) + ("\n" if plan.remote else "")


def _usage(final, cached=False) -> dict:
    """openai/openai.go Usage; `cached`: with prompt_tokens_details, as on Ollama's cache-metrics branch."""
    prompt, completion = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    usage = {"prompt_tokens": prompt}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": final.get("prompt_eval_cached_count", 0)}
    usage.update(completion_tokens=completion, total_tokens=prompt + completion)
    return usage


def _v1_tool_calls(calls) -> list:
    return [
        {
            "id": c["id"],
            "index": c["function"]["index"],
            "type": "function",
            "function": {"name": c["function"]["name"], "arguments": go_json(c["function"]["arguments"])},
        }
        for c in calls
    ]


def _v1_chat_completion(cid, plan, knobs) -> dict:
    final = _chat_final(plan, knobs, full=True)
    message = {"role": "assistant", "content": final["message"]["content"]}
    if plan.thinking:
        message["reasoning"] = "".join(plan.thinking)
    if plan.tool_calls:
        message["tool_calls"] = _v1_tool_calls(plan.tool_calls)
    reason = "tool_calls" if plan.tool_calls else plan.done_reason
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        "usage": _usage(final, _is_cached(knobs)),
    }


def _sse(objects, done) -> bytes:
    return ("".join(f"data: {go_json(o)}\n\n" for o in objects) + ("data: [DONE]\n\n" if done else "")).encode()


def _v1_chat_renderer(cid, legacy, include_usage, cached):
    """Turn native chat objects into SSE like Ollama's middleware (a native error object becomes an empty chunk)."""
    state = {"first": True, "tool": False, "created": int(time.time())}

    def render(obj):
        message = obj.get("message") or {}
        delta = {"role": "assistant", "content": message.get("content", "")} if legacy else {}
        if not legacy:
            delta.update({"role": "assistant"} if state["first"] else {})
            delta.update({"content": message["content"]} if message.get("content") else {})
        delta.update({"reasoning": message["thinking"]} if message.get("thinking") else {})
        if message.get("tool_calls"):
            delta["tool_calls"], state["tool"] = _v1_tool_calls(message["tool_calls"]), True
        state["first"] = False
        reason = obj.get("done_reason") and ("tool_calls" if state["tool"] else obj["done_reason"])
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": state["created"],
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason or None}],
        }
        extra = [{**chunk, "choices": [], "usage": _usage(obj, cached)}] if obj.get("done") and include_usage else []
        return _sse([chunk, *extra], obj.get("done"))

    return render


def _v1_completion_renderer(cid, include_usage, cached):
    """Turn native generate objects into /v1/completions SSE; with include_usage every chunk has zero usage."""
    created = int(time.time())

    def render(obj):
        chunk = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "choices": [{"text": obj.get("response", ""), "index": 0, "finish_reason": obj.get("done_reason")}],
            "model": obj.get("model", ""),
            "system_fingerprint": "fp_ollama",
        }
        if include_usage:
            chunk["usage"] = _usage({}, cached)  # a zero placeholder on every chunk (CompleteWriter)
        extra = [{**chunk, "choices": [], "usage": _usage(obj, cached)}] if obj.get("done") and include_usage else []
        return _sse([chunk, *extra], obj.get("done"))

    return render


def _v1_model_entry(name, info) -> dict:
    owner = name.split("/")[-2] if "/" in name else "library"
    return {"id": name, "object": "model", "created": info["modified_ns"] // 10**9, "owned_by": owner}


# -- serving ----------------------------------------------------------------------------------------------
class ServerHandle:
    """A running waitress server: `.url`, `.port`, `.close()`.

    The loop thread is the only one that closes sockets (waitress's map is not thread-safe), so close() only sets
    flags and waits: first the listener and connections go, then the worker threads finish, then the loop ends.
    """

    def __init__(self, server):
        self._server = server
        self.port = server.effective_port
        self.url = f"http://{server.effective_host}:{self.port}"
        self._closing, self._closed_sockets, self._stopping = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"waitress:{self.port}", daemon=True)
        self._thread.start()

    def _run(self):
        server = self._server
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)
            if self._closing.is_set() and not self._closed_sockets.is_set():
                self._close_sockets(keep_trigger=True)
                self._closed_sockets.set()
        self._close_sockets(keep_trigger=False)

    def _close_sockets(self, keep_trigger):
        server = self._server
        for dispatcher in list(server._map.values()):
            if dispatcher is server:
                wasyncore.dispatcher.close(server)  # server.close() would also close the trigger
            elif not (keep_trigger and dispatcher is server.trigger):
                dispatcher.close()

    def wait_ready(self, timeout: float = 5.0):
        """Return once the port accepts a connection (a TCP probe, so the app never sees it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self._server.effective_host, self.port), timeout=timeout).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # retry back-off, not synchronisation

    def close(self):
        """Close the listener and every connection, let the worker threads finish, then stop the loop."""
        self._closing.set()
        self._server.pull_trigger()  # wake the loop now rather than at its next poll timeout
        self._closed_sockets.wait(5)
        self._server.task_dispatcher.shutdown(timeout=5)  # running tasks end at their next write
        self._server.pull_trigger()  # before _stopping: once that is set, the loop may close the trigger at any time
        self._stopping.set()
        self._thread.join(timeout=5)


def serve(app, port: int = 0, threads: int = 64, host: str = "127.0.0.1", **options) -> ServerHandle:
    """Run `app` with waitress in a daemon thread; return a handle once it answers (``options`` go to waitress)."""
    options = {"connection_limit": threads + 100, **WAITRESS_OPTIONS, **options}
    server = waitress.create_server(app, host=host, port=port, threads=threads, **options)
    handle = ServerHandle(server)
    handle.wait_ready()
    return handle


def main(argv=None):
    """Run the fake in the foreground: `python tests/fake_ollama.py --port 11435 [--token-delay 0.02]`."""
    parser = argparse.ArgumentParser(description="A fake `ollama serve` for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--threads", type=int, default=64)
    for knob in KNOBS:
        parser.add_argument("--" + knob.replace("_", "-"), dest=knob, help=f"same as the X-Fake-{knob} header")
    args = parser.parse_args(argv)
    app = FakeOllama()
    for knob, parse in KNOBS.items():
        if getattr(args, knob) is not None:
            setattr(app, knob, parse(getattr(args, knob)))
    try:
        app.check_host = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        app.check_host = args.host == "localhost"
    waitress.serve(
        app,
        host=args.host,
        port=args.port,
        threads=args.threads,
        connection_limit=args.threads + 100,
        **WAITRESS_OPTIONS,
    )


if __name__ == "__main__":
    sys.exit(main())
