"""Pure: a request body's fields as Ollama's Go code reads them, by the rules of Go's encoding/json (v1).

Go matches an object key to a struct field by its exact name, else case-insensitively: both sides folded, each ASCII
letter to upper case and each other rune to the smallest rune of its simple-fold orbit, so that "MODEL", "Model" and
"\u017ftream" (long s) reach the fields model and stream. Every key that reaches a field is decoded into it in order:
a later one replaces a string, a number or a bool (null leaves those as they are, and clears a pointer, a map, a
slice or an interface); an object decoded into a map or a struct pointer adds to what is there; an array decoded
into a slice reuses its elements, so a field an element does not name keeps the value an earlier array gave it
(except in Ollama's native messages, whose UnmarshalJSON builds each element afresh). Map keys (``options``) are
matched exactly. This module does not parse JSON (jsonscan.py) or decide what the proxy records (intake.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from proxy_app.ollama.jsonscan import Big, Pairs, Unreadable

TEXT_CHARS = 1000  # the most characters of a text field kept (a prompt is cut to this anyway)
MESSAGES_KEPT = 1000  # elements of a messages array remembered for a later array with the same key
MESSAGES_READ = 100_000  # past this many elements the prompt is not looked for (the rest is only located)
OPTIONS_KEPT = 256  # distinct options recorded; Ollama knows a few dozen
PARAMETER_CHARS = 4096  # text rendered into model_parameters at most: the record keeps no more of it
_UNSET = object()

_FOLD = {ord("\u017f"): "S", ord("\u212a"): "K"}  # the only non-ASCII runes whose fold orbit holds an ASCII letter


def fold_name(name: str) -> str:
    """Return Go's folded form of an object key (ASCII letters upper-cased, long s as S, Kelvin sign as K).

    Exact for matching the ASCII field names of Ollama's requests; other non-ASCII runes are left as they are, which
    never matches an ASCII name, as in Go.
    """
    return "".join(char.upper() if char.isascii() else char for char in name).translate(_FOLD)


class Fields:
    """The JSON names of a struct's fields, looked up as Go does: exact name first, else the folded name."""

    def __init__(self, names: Iterable[str]) -> None:
        self.exact = frozenset(names)
        self.folded = {fold_name(name): name for name in reversed(tuple(names))}  # the first declared wins a tie

    def find(self, key: str | None) -> str | None:
        """Return the field a key reaches, or None."""
        if key is None:
            return None
        if key in self.exact:
            return key
        return self.folded.get(fold_name(key))


# Top-level fields: plain ones take a later value, except that null leaves them unchanged.
PLAIN = ("model", "name", "source", "destination", "from", "prompt")
# Fields whose Go type is a pointer, an interface or raw JSON in at least the requests the proxy reads: any value
# (null included) replaces the one before. The generation keys are recorded as sent.
REPLACED = ("input", "format", "keep_alive", "think", "raw", "truncate", "shift", "dimensions", "logprobs",
            "top_logprobs", "temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "max_completion_tokens",
            "frequency_penalty", "presence_penalty", "response_format", "reasoning_effort", "n", "suffix")  # fmt: skip
TOP_FIELDS = Fields((*PLAIN, *REPLACED, "stream", "options", "stream_options", "messages"))
MESSAGE_FIELDS = Fields(("role", "content"))
STREAM_OPTION_FIELDS = Fields(("include_usage",))
# Go types of stream: *bool in native requests and /v1/responses (null clears it), bool elsewhere (null is ignored).
STREAM_IS_POINTER_PATHS = frozenset({"/v1/responses"})
# Routes whose message type has its own UnmarshalJSON (Anthropic's MessageParam), so each element is built afresh.
REBUILT_MESSAGE_PATHS = frozenset({"/v1/messages"})


@dataclass
class Slot:
    """One element of a messages slice: whether its role is user, and the start of its text."""

    is_user: bool = False
    text: str | None = None


@dataclass
class Messages:
    """Go's []Message after each array given for it; elements far from the end of the last array are forgotten."""

    reuse: bool  # openai.Message is decoded into the element already there; api.Message is built afresh
    length: int | None = None  # None: nil
    slots: dict[int, Slot] = field(default_factory=dict)
    complete: bool = True  # False once an array had too many elements to follow

    def assign(self, value) -> None:
        """Decode one value given for the messages field."""
        if value is None:
            self.length, self.slots, self.complete = None, {}, True
            return
        if not _is_array(value):
            return  # a type error: Go leaves the field and refuses the request
        count = 0
        for element in _items(value):
            if count == MESSAGES_READ:
                self.complete = False
                return
            self.slots[count] = self._decode(element, self.slots.get(count) if self.reuse else None)
            self.slots.pop(count - MESSAGES_KEPT, None)
            count += 1
        if count == 0:
            self.slots, self.complete = {}, True  # Go makes a new empty slice
        self.complete = self.complete or not self.reuse  # fresh elements need nothing from an earlier array
        self.length = count

    def last_user_text(self) -> str | None:
        """Return the text of the last element whose role is user."""
        if not self.complete or not self.length:
            return None
        for index in range(self.length - 1, max(-1, self.length - 1 - MESSAGES_KEPT), -1):
            slot = self.slots.get(index)
            if slot is not None and slot.is_user:
                return slot.text
        return None

    def _decode(self, element, old: Slot | None) -> Slot:
        if element is None:
            return old or Slot()  # null: a struct is left as it is; UnmarshalJSON("null") gives a zero Message
        slot = Slot(old.is_user, old.text) if old is not None else Slot()
        if not _is_object(element):
            return slot
        for key, value in _members(element):
            name = MESSAGE_FIELDS.find(key)
            if name == "role" and isinstance(value, str):
                slot.is_user = value.isascii() and value.lower() == "user"  # Ollama lowers the role (strings.ToLower)
            elif name == "content" and (value is not None or self.reuse):
                slot.text = text_of(value)  # openai's content is `any`: null clears it; a string ignores null
        return slot


@dataclass
class Request:
    """The fields the proxy reads, as Go's decoder leaves them; ``values`` holds the set plain and replaced ones."""

    values: dict[str, object] = field(default_factory=dict)
    stream: object = _UNSET  # _UNSET: absent (or cleared)
    options: dict | None = None
    include_usage: bool | None = None  # None: no stream_options
    messages: Messages | None = None

    def has_stream(self) -> bool:
        """True when the body set stream."""
        return self.stream is not _UNSET


def read_request(path: str, members: Iterable[tuple[str | None, object]]) -> Request:
    """Decode the top-level members of a request body into the fields the proxy reads, as Go would."""
    request = Request(messages=Messages(reuse=path.startswith("/v1/") and path not in REBUILT_MESSAGE_PATHS))
    stream_is_pointer = not path.startswith("/v1/") or path in STREAM_IS_POINTER_PATHS
    for key, value in members:
        name = TOP_FIELDS.find(key)
        if name is None:
            continue
        if name in PLAIN:
            if value is not None:
                request.values[name] = value
        elif name == "stream":
            if value is not None:
                request.stream = value
            elif stream_is_pointer:
                request.stream = _UNSET
        elif name == "options":
            request.options = _merge_map(request.options, value)
        elif name == "stream_options":
            request.include_usage = _merge_stream_options(request.include_usage, value)
        elif name == "messages":
            request.messages.assign(value)
        else:
            request.values[name] = value
    return request


def string_of(value) -> str | None:
    """Return the first ``TEXT_CHARS`` characters of a string value (parsed or Big), else None."""
    if isinstance(value, str):
        return value[:TEXT_CHARS]
    if isinstance(value, Big) and value.kind == '"':
        return value.text(TEXT_CHARS)
    return None


def text_of(value) -> str | None:
    """Return the text of a prompt or content value: a string, or the strings and "text" members of a list."""
    if not _is_array(value):
        return string_of(value)
    parts, size = [], 0
    for item in _items(value):
        part = string_of(_last(item, "text")) if _is_object(item) else string_of(item)
        if isinstance(part, str):
            parts.append(part)
            size += len(part) + 1
            if size > TEXT_CHARS:
                break
    return "\n".join(parts)[:TEXT_CHARS] or None


def bounded(value, room: list[int]):
    """Return a value as Go's `any` holds it (objects as dicts, the last duplicate key winning), cut to fit ``room``.

    ``room`` holds the characters still to spend, shared by the values of one record: strings are cut and items
    dropped once it runs out, so a parameter of any size costs bounded memory and still renders as valid JSON.
    """
    if isinstance(value, str) or (isinstance(value, Big) and value.kind == '"'):
        text = value[: max(room[0], 0)] if isinstance(value, str) else value.text(max(room[0], 0)) or ""
        room[0] -= len(text) + 2
        return text
    if _is_array(value) or _is_object(value):
        room[0] -= 2
        pairs = _members(value) if _is_object(value) else enumerate(_items(value))
        kept = {}
        for key, item in pairs:
            if room[0] <= 0:
                break
            room[0] -= len(key) + 3 if isinstance(key, str) else 1
            kept[key] = bounded(item, room)
        return kept if _is_object(value) else list(kept.values())
    room[0] -= 8
    return None if isinstance(value, Big | Unreadable) else value


def _merge_map(current: dict | None, value) -> dict | None:
    if value is None:
        return None
    if not _is_object(value):
        return current
    merged = {} if current is None else current
    for key, item in _members(value):
        if key is not None and (key in merged or len(merged) < OPTIONS_KEPT):
            merged[key] = item  # rendered within the record's room by bounded()
    return merged


def _merge_stream_options(current: bool | None, value) -> bool | None:
    if value is None:
        return None
    if not _is_object(value):
        return current
    include_usage = bool(current)
    for key, item in _members(value):
        if STREAM_OPTION_FIELDS.find(key) and isinstance(item, bool):
            include_usage = item
    return include_usage


def _last(value, key: str):
    """Return the last member named exactly ``key`` (a map[string]any keeps the last duplicate)."""
    found = None
    for name, item in _members(value):
        if name == key:
            found = item
    return found


def _members(value) -> Iterator[tuple[str | None, object]]:
    return value.members() if isinstance(value, Big) else iter(value)


def _items(value) -> Iterator:
    return value.items() if isinstance(value, Big) else iter(value)


def _is_object(value) -> bool:
    return isinstance(value, Pairs) or (isinstance(value, Big) and value.kind == "{")


def _is_array(value) -> bool:
    return (isinstance(value, list) and not isinstance(value, Pairs)) or (isinstance(value, Big) and value.kind == "[")
