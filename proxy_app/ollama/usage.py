"""Token counts and timings from an Ollama response body fed chunk by chunk (`UsageMeter`).

The meter frames the body (NDJSON lines, SSE events or one JSON document, as the Content-Type says), decodes each
object and hands it to its API family's reader: ``native`` (/api/*), ``completions`` (/v1 chat, completions and
embeddings), ``responses`` (/v1/responses) or ``messages`` (/v1/messages); it folds their Readings into one `Usage`.
Does not: use Flask, a clock, I/O or anything outside the stdlib and this package; time anything (TTFT is the
relay's job); raise on bad input (an unreadable line is skipped); or set `has_content` for a plain JSON body before
`result()`, since nothing is decoded before then. `UsageStripper` lives in ``stripper`` and is importable from here too.
"""

import json
import re
from dataclasses import dataclass

from proxy_app.ollama.intake import as_go_text
from proxy_app.ollama.native import NATIVE_FIELDS
from proxy_app.ollama.readers import read_object
from proxy_app.ollama.reading import as_count
from proxy_app.ollama.stripper import MAX_EVENT_BYTES, UsageStripper

__all__ = ["EDGE_BYTES", "MAX_EVENT_BYTES", "MAX_PARSE_BYTES", "Usage", "UsageMeter", "UsageStripper"]

MAX_PARSE_BYTES = 16 * 1024 * 1024  # bigger bodies or lines are not json-decoded, so memory per call stays bounded
EDGE_BYTES = 4096  # kept from each end of an oversized body: model and done flag at the head, metrics at the tail
# /v1/completions with include_usage puts this placeholder on every chunk (ollama middleware/openai.go); it is no
# count. The second form is the same placeholder from servers that report cached prompt tokens.
_ZERO_USAGES = (
    b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}',
    b'"usage":{"prompt_tokens":0,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":0,"total_tokens":0}',
)
# Stream events that carry no count, reason or error but still matter: the ends of /v1/messages and /v1/responses
_ENDING_MARKERS = (b'"message_stop"', b'"response.incomplete"')
_INT_KEYS = "|".join([key for key, _ in NATIVE_FIELDS] + ["prompt_tokens", "completion_tokens"])
_SALVAGE_INT = re.compile(rb'"(' + _INT_KEYS.encode() + rb')":(\d{1,19})(?!\d)')
_SALVAGE_STR = re.compile(rb'"(model|done_reason|remote_model|remote_host)":"([^"\\]{1,200})"')
_MODES = {"application/x-ndjson": "ndjson", "text/event-stream": "sse", "application/json": "json"}
_TEXT = rb'"((?:[^"\\\x00-\x1f]|\\.)*)"'  # a JSON string's body, still escaped
_CLOUD = rb'(?:"remote_model":"[^"\\]*",)?(?:"remote_host":"[^"\\]*",)?'  # only in answers of cloud models
# Ollama's intermediate generate and chat lines exactly (wire format): their text is read without decoding the line
_PLAIN_LINE = re.compile(
    rb'\{"model":"[^"\\]*",' + _CLOUD + rb'"created_at":"[^"\\]*",(?:"response":' + _TEXT
    + rb'|"message":\{"role":"assistant","content":' + _TEXT + rb'\}),"done":false\}[ \t\r]*'
)  # fmt: skip
_PLAIN_LINES = re.compile(rb"^" + _PLAIN_LINE.pattern + rb"\n", re.MULTILINE)  # each matches one whole line or none


@dataclass
class Usage:
    """What one response body said about tokens and timings; None means the body did not say.

    The outcome: `error_message` is set when the upstream reported a failure (an error line or event, a failed
    response); otherwise `is_complete` False means the answer stopped short (a cut stream, or an answer its API
    marks incomplete, with the reason in `done_reason`).
    """

    input_tokens: int | None = None  # the whole prompt, its cached part included, in every API
    output_tokens: int | None = None
    cached_input_tokens: int | None = None  # the part of input_tokens read from the prompt cache
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None
    done_reason: str | None = None  # done_reason, finish_reason, stop_reason, or a Responses status or reason
    error_message: str | None = None
    is_complete: bool = False
    response_preview: str = ""
    model: str | None = None
    remote_model: str | None = None  # a cloud model's name upstream, as its native answers say
    remote_host: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed (output tokens per second of eval); None when either number is unknown or zero."""
        if not self.output_tokens or not self.eval_duration_ns:
            return None
        return self.output_tokens / self.eval_duration_ns * 1e9

    @property
    def total_tokens(self) -> int | None:
        """Sum of the known token counts; None when neither is known."""
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


def _salvage(head: bytes, tail: bytes) -> dict:
    """Pull counts, model, reason and done flag out of the two ends of a body too big to decode."""
    obj: dict = {}
    usage: dict = {}
    for edge in (head, tail):
        for key, digits in _SALVAGE_INT.findall(edge):
            name = key.decode()
            (usage if name in ("prompt_tokens", "completion_tokens") else obj)[name] = int(digits)
        for key, text in _SALVAGE_STR.findall(edge):
            obj.setdefault(key.decode(), text.decode("utf-8", "replace"))
    if usage:
        obj["usage"] = usage
    if b'"done":true' in head or b'"done":true' in tail:
        obj["done"] = True
    return obj


def _decode(data: bytes) -> dict | None:
    """Decode one JSON object; None for anything else. Oversized data is salvaged instead."""
    if len(data) > MAX_PARSE_BYTES:
        return _salvage(data[:EDGE_BYTES], data[-EDGE_BYTES:])
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # invalid JSON, ints over the digit limit, deep nesting
        return None
    return obj if isinstance(obj, dict) else None


def _unescape(text: bytes) -> str | None:
    """The value of an escaped JSON string body; None if it is no valid JSON string."""
    if b"\\" not in text:
        return text.decode("utf-8", "replace")
    try:
        return json.loads(b'"' + text + b'"')
    except ValueError:
        return None


def _is_plain_chunk(data: bytes) -> bool:
    """True for a /v1 content chunk or event with no count, reason, error or ending, decided on bytes alone."""
    return (
        b'"error"' not in data
        and (b'"finish_reason"' not in data or b'"finish_reason":null' in data)
        and (b'"usage"' not in data or any(zero in data for zero in _ZERO_USAGES))
        and not any(marker in data for marker in _ENDING_MARKERS)
    )


class _Buffer:
    """The bytes of one line or body: all of them up to MAX_PARSE_BYTES, else only its head and tail."""

    def __init__(self) -> None:
        self.parts: list[bytes] | None = []
        self.size = 0
        self.head = self.tail = b""

    def add(self, data: bytes) -> None:
        """Append data, dropping the middle once the total passes MAX_PARSE_BYTES."""
        self.size += len(data)
        if self.parts is None:
            self.tail = (self.tail + data[-EDGE_BYTES:])[-EDGE_BYTES:]
            return
        self.parts.append(data)
        if self.size > MAX_PARSE_BYTES:
            whole = b"".join(self.parts)
            self.head, self.tail, self.parts = whole[:EDGE_BYTES], whole[-EDGE_BYTES:], None

    def take(self) -> bytes | dict:
        """Return the whole bytes, or a salvaged object if it overflowed, and start empty again."""
        data = b"".join(self.parts) if self.parts is not None else _salvage(self.head, self.tail)
        self.parts, self.size, self.head, self.tail = [], 0, b"", b""
        return data


class UsageMeter:
    """Feed it a response body in any pieces; `result()` returns its `Usage`. Mode comes from the Content-Type."""

    def __init__(self, content_type: str, status: int = 200, preview_chars: int = 200) -> None:
        self.status = status
        self.preview_chars = preview_chars
        self.has_content = False  # the relay reads this after each feed() to time the first token
        self._mode = _MODES.get((content_type or "").split(";", 1)[0].strip().lower())
        self._on_line = self._sse_line if self._mode == "sse" else self._ndjson_line
        self._usage = Usage()
        self._carry = _Buffer()  # an unfinished line, or the whole body in json mode
        self._preview: list[str] = []
        self._preview_size = 0
        self._settled = False  # content seen and preview full: lines without counts can be skipped on bytes
        self._complete = self._failed = False  # failed: the body reports an error or an early end

    def feed(self, chunk: bytes) -> None:
        """Read the next piece of the body, split anywhere (mid-line, mid-character)."""
        if self._mode == "json":
            self._carry.add(chunk)
        elif self._mode is not None and chunk:
            if self._mode == "ndjson" and not self._carry.size and self._read_plain_lines(chunk):
                return
            lines = chunk.split(b"\n")  # scans only the new chunk, so a huge line costs linear time
            rest = lines.pop()
            if lines:
                self._finish_line(lines[0])
                for line in lines[1:]:
                    self._on_line(line)
            if rest:
                self._carry.add(rest)

    def result(self) -> Usage:
        """Finish the body (a last line without its newline counts) and return what it said."""
        if self._mode == "json":
            self._finish_body()
        elif self._carry.size:
            self._finish_line(b"")
        usage = self._usage  # the meter's own, completed (dataclasses.replace would cost more than the rest here)
        usage.response_preview = as_go_text("".join(self._preview)[: self.preview_chars])
        usage.is_complete = self._complete and not self._failed and self.status < 400
        return usage

    def _finish_line(self, piece: bytes) -> None:
        """Complete the carried line (if any) with piece and handle it."""
        if self._carry.size:
            self._carry.add(piece)
            piece = self._carry.take()
        if isinstance(piece, dict):  # salvaged from an oversized line
            self._take(piece)
        else:
            self._on_line(piece)

    def _finish_body(self) -> None:
        """Decode the buffered JSON body; an oversized one counts as complete if it ends with a brace."""
        closed = self._carry.tail.rstrip().endswith(b"}")
        data = self._carry.take()
        obj = data if isinstance(data, dict) else _decode(data)
        if obj is not None:
            self._take(obj)
            self._complete = closed if isinstance(data, dict) else True

    def _ndjson_line(self, line: bytes) -> None:
        """Handle one native line; intermediate lines are skipped unread once nothing more is needed from them,
        and until then an intermediate line of the usual shape has only its text read."""
        if b'"done":false' in line and b'"done":true' not in line:
            if self._settled:
                return
            if self._usage.model is not None and (plain := _PLAIN_LINE.fullmatch(line)):
                text = _unescape(plain[1] if plain[1] is not None else plain[2])
                if text is not None:
                    self._add_text(text, None)
                    return
        obj = _decode(line)
        if obj is not None:
            self._take(obj)

    def _read_plain_lines(self, chunk: bytes) -> bool:
        """Read whole lines that are all intermediate lines of the usual shape in one regex pass (Ollama sends a
        token a line, so a read holds many); False, with nothing read, when any line is not of that shape."""
        if self._usage.model is None or not chunk.endswith(b"\n"):
            return False
        texts = _PLAIN_LINES.findall(chunk)
        if len(texts) != chunk.count(b"\n"):
            return False
        if self._settled:
            return True
        escaped = [response or content for response, content in texts]
        joined = b"".join(escaped)
        if joined.isascii() and b"\\" not in joined:  # the usual case: the texts need no decoding, one at a time
            self._add_text(joined.decode("ascii"), None)
            return True
        for text in map(_unescape, escaped):
            if text is not None:  # None: an invalid escape, which json.loads would refuse too
                self._add_text(text, None)
        return True

    def _sse_line(self, line: bytes) -> None:
        """Handle one SSE line: `data:` payloads count; blank, `event:`, `id:` and comment lines do not."""
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self._complete = True
        elif not (self._settled and _is_plain_chunk(payload)):
            obj = _decode(payload)
            if obj is not None:
                self._take(obj)

    def _take(self, obj: dict) -> None:
        """Fold one decoded object (of any API family, or salvaged) into the running usage."""
        model = obj.get("model")
        if self._usage.model is None and isinstance(model, str) and model:
            self._usage.model = as_go_text(model)
        reading = read_object(obj)
        if reading.is_failed or reading.is_cut_short:  # the body itself says the answer did not finish
            self._failed = True
            if isinstance(reading.error, str):
                self._usage.error_message = as_go_text(reading.error)
        self._add_text(reading.text, reading.extra)
        if reading.counts:  # the last count seen wins, as /v1 chunks repeat usage and the final line holds metrics
            usage = self._usage
            for name, value in reading.counts.items():
                if as_count(value) is not None:  # a plausible non-negative int (bools and floats are ignored)
                    setattr(usage, name, value)
        self._set_reason(reading.reason)
        self._complete = self._complete or reading.is_complete
        for name in ("model", "remote_model", "remote_host"):
            value = getattr(reading, name)
            if getattr(self._usage, name) is None and isinstance(value, str) and value:
                setattr(self._usage, name, as_go_text(value))

    def _add_text(self, text: object, extra: object) -> None:
        """Note answer text (kept for the preview) or thinking/tool calls (content, but not previewed)."""
        if isinstance(text, str) and text:
            if self._preview_size < self.preview_chars:
                self._preview.append(text)
                self._preview_size += len(text)
            self.has_content = True
        elif isinstance(extra, (str, list)) and extra:
            self.has_content = True
        self._settled = self.has_content and self._preview_size >= self.preview_chars

    def _set_reason(self, value: object) -> None:
        """Store a non-empty done_reason, finish_reason, stop_reason or Responses status."""
        if isinstance(value, str) and value:
            self._usage.done_reason = as_go_text(value)
