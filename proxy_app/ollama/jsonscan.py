"""Pure: a JSON request body read in bounded memory and time, whatever it holds.

A value that ends within ``VALUE_BYTES`` is parsed whole at C speed from a window of the body (Python's objects cost
at most about 32 times the bytes of their JSON); a larger one is only located, in slices of at most ``SLICE_BYTES``
between which other threads get the GIL, and stays a ``Big`` span that is read on demand: its members, its items,
or the first characters of a string. Objects come back
as ``Pairs`` (every key in order, duplicates kept) so that Go's key rules can be applied (gojson.py).

Like Go's ``json.Decoder`` it reads the first value and ignores what follows; it refuses what Go's scanner refuses
where it looks (a syntax error in a parsed value, nesting deeper than 10,000, an unterminated value). A syntax error
inside a large value that is only located is not noticed. This module does not know Ollama's fields (gojson.py).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator
from itertools import accumulate

VALUE_BYTES = 64 * 1024  # a value this small is parsed whole
SLICE_BYTES = 64 * 1024  # the most bytes examined by one C call while locating a large value
FIRST_WINDOW = 256  # bytes examined first when locating an array or an object
MAX_DEPTH = 10_000  # Go's scanner refuses a document nested deeper (encoding/json maxNestingDepth)
KEY_BYTES = 4096  # a longer key matches no field of Ollama's and is not decoded
_PARSER_DEPTH = 1000  # Python's parser stops with RecursionError before nesting this deep
TEXT_ESCAPE_BYTES = 12  # the most bytes one character takes in a JSON string (a surrogate pair as two escapes)

_STRING_BODY = re.compile(rb'[^"\\]*(?:\\[\s\S][^"\\]*)*')
_LITERAL = re.compile(rb"[-+.0-9A-Za-z]*")
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_BRACKET = re.compile(rb"[\[\]{}]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DELTA = bytes(1 if byte in b"[{" else 255 if byte in b"]}" else 0 for byte in range(256))  # 255 is -1 as a signed byte
_REDUCE_PASSES = 4  # inner pairs removed before counting bracket by bracket (deep nesting is counted)


class Invalid(ValueError):
    """The body is not a JSON document Go's decoder accepts."""


class Pairs(list):
    """A JSON object as its (key, value) pairs in order, duplicates kept."""


class Unreadable:
    """A valid value that Python's parser cannot build (nested past its recursion limit); Go reads it."""


UNREADABLE = Unreadable()


def _go_int(text: str) -> int | float:
    return int(text) if len(text) <= 4000 else float(text)  # Go holds numbers as float64; Python refuses long ints


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=Pairs, parse_constant=_reject_constant, parse_int=_go_int)


class Big:
    """A value larger than ``VALUE_BYTES``: where it lies in the body, read piece by piece on demand."""

    __slots__ = ("data", "start", "end", "depth")

    def __init__(self, data: bytes, start: int, end: int, depth: int) -> None:
        self.data, self.start, self.end, self.depth = data, start, end, depth

    @property
    def kind(self) -> str:
        """The JSON type by its first byte: '"' (string), '[' (array), '{' (object), or another (a literal)."""
        return chr(self.data[self.start])

    def text(self, chars: int) -> str | None:
        """Return the first ``chars`` characters of a string value (lone surrogates kept, as a whole parse does)."""
        if self.kind != '"':
            return None
        body = self.start + 1
        head = self.data[body : min(self.end - 1, body + (chars + 2) * TEXT_ESCAPE_BYTES)]
        for cut in range(TEXT_ESCAPE_BYTES + 1):  # the slice may end inside an escape or a UTF-8 sequence
            try:
                return json.loads('"' + head[: len(head) - cut].decode("utf-8", "surrogateescape") + '"')[:chars]
            except ValueError:
                continue
        return None

    def items(self) -> Iterator:
        """Yield each item of an array value, parsed or Big."""
        if self.kind != "[":
            return
        pos = _skip_space(self.data, self.start + 1)
        if self.data[pos : pos + 1] == b"]":
            return
        while True:
            value, end = read_value(self.data, pos, self.depth + 1)
            yield value
            pos = _after_item(self.data, end, b"]")
            if pos < 0:
                return

    def members(self) -> Iterator[tuple[str | None, object]]:
        """Yield each (key, value) of an object value in order; a key too long to match a field is None."""
        if self.kind == "{":
            yield from ObjectReader(self.data, self.start, self.depth + 1)


class ObjectReader:
    """Iterates the members of the object at ``start``; ``end`` is set once they are exhausted."""

    def __init__(self, data: bytes, start: int, depth: int = 1) -> None:
        if data[start : start + 1] != b"{":
            raise Invalid("not an object")
        self.data, self.start, self.depth, self.end = data, start, depth, None

    def __iter__(self) -> Iterator[tuple[str | None, object]]:
        data, depth = self.data, self.depth
        pos = _skip_space(data, self.start + 1)
        if data[pos : pos + 1] == b"}":
            self.end = pos + 1
            return
        while True:
            if data[pos : pos + 1] != b'"':
                raise Invalid("an object key must be a string")
            key_end = _string_end(data, pos + 1)
            key = _load_text(data, pos, key_end) if key_end - pos <= KEY_BYTES else None
            pos = _skip_space(data, key_end)
            if data[pos : pos + 1] != b":":
                raise Invalid("':' expected after an object key")
            pos = _skip_space(data, pos + 1)
            value, end = read_value(data, pos, depth)
            yield key, value
            pos = _after_item(data, end, b"}")
            if pos < 0:
                self.end = -pos
                return


def skip_space(data: bytes, pos: int = 0) -> int:
    """Return where the next token at or after ``pos`` begins (JSON whitespace skipped)."""
    return _skip_space(data, pos)


def read_value(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    """Return the value starting at ``pos`` (parsed if small, else a ``Big`` span) and where it ends."""
    found = parse_small(data, pos, depth)
    if found is not None:
        return found
    end = value_end(data, pos, depth)
    return load(data, pos, end, depth), end


def parse_small(data: bytes, pos: int, depth: int) -> tuple[object, int] | None:
    """Return (value, end) when the value at ``pos`` is valid and ends within ``VALUE_BYTES``, else None.

    The value is parsed straight from a window of the body at C speed; a larger or invalid one is left to the
    piece-by-piece reading.
    """
    if depth + _PARSER_DEPTH >= MAX_DEPTH:  # a parse that succeeds must not be nested past Go's limit
        return None
    for window in (FIRST_WINDOW, VALUE_BYTES):
        found = _parse_within(data, pos, min(pos + window, len(data)))
        if found is not None:
            return found
    return None


def _parse_within(data: bytes, pos: int, stop: int) -> tuple[object, int] | None:
    """Return (value, end) when the value at ``pos`` parses and surely ends before ``stop``, else None."""
    text = data[pos:stop].decode("utf-8", "surrogateescape")
    try:
        value, size = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    end = pos + (size if text.isascii() else len(text[:size].encode("utf-8", "surrogateescape")))
    if end == stop and stop < len(data) and data[pos] not in b'"[{':
        return None  # a number cut by the window parses as a shorter one
    return value, end


def load(data: bytes, start: int, end: int, depth: int):
    """Return the value in ``data[start:end]``: parsed if small, else a ``Big`` span of it."""
    if end - start > VALUE_BYTES:
        if data[start] in b'"[{':
            return Big(data, start, end, depth)
        if end - start > SLICE_BYTES:
            return UNREADABLE  # a number of that many digits: Go cannot hold it either and refuses the request
    try:
        value, stop = _DECODER.raw_decode(data[start:end].decode("utf-8", "surrogateescape"))
    except RecursionError:
        return UNREADABLE
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    if stop != end - start:
        raise Invalid("unexpected bytes after a value")
    return value


def value_end(data: bytes, pos: int, depth: int) -> int:
    """Return where the value starting at ``pos`` ends, without building it."""
    first = data[pos : pos + 1]
    if first == b'"':
        return _string_end(data, pos + 1)
    if first in (b"[", b"{"):
        return _container_end(data, pos, depth)
    end = pos
    while (stop := _LITERAL.match(data, end, end + SLICE_BYTES).end()) == end + SLICE_BYTES:
        end = stop
    if stop == pos:
        raise Invalid("a value was expected")
    return stop


def _load_text(data: bytes, start: int, end: int) -> str:
    """Return a key (a string no longer than ``KEY_BYTES``)."""
    try:
        return json.loads(data[start:end].decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _after_item(data: bytes, end: int, closer: bytes) -> int:
    """Return where the next item starts, or minus the position after the closing bracket."""
    pos = _skip_space(data, end)
    separator = data[pos : pos + 1]
    if separator == b",":
        return _skip_space(data, pos + 1)
    if separator == closer:
        return -(pos + 1)
    raise Invalid(f"',' or '{closer.decode()}' expected")


def _skip_space(data: bytes, pos: int) -> int:
    while (stop := _WHITESPACE.match(data, pos, pos + SLICE_BYTES).end()) == pos + SLICE_BYTES:
        pos = stop
    return stop


def _string_end(data: bytes, pos: int) -> int:
    """Return the position after the closing quote of the string whose body starts at ``pos``."""
    size = len(data)
    while True:
        stop = min(pos + SLICE_BYTES, size)
        end = _STRING_BODY.match(data, pos, stop).end()
        if end < size and data[end] == 0x22:  # a quote that no backslash escapes
            return end + 1
        if end == pos and stop == size:
            raise Invalid("unterminated string")
        pos = end


def _container_end(data: bytes, pos: int, depth: int) -> int:
    """Return the position after the bracket that closes the array or object at ``pos``."""
    size, open_count, pos = len(data), 1, pos + 1
    room = MAX_DEPTH - depth  # containers this value may still open inside the document
    window = FIRST_WINDOW  # small values are common: look a little ahead first, then further
    while True:
        stop = min(pos + window, size)
        window = min(2 * window, SLICE_BYTES)
        quote = data.find(b'"', pos, stop)
        cut = stop if quote < 0 else quote
        closed_at, open_count = _brackets(data[pos:cut], open_count, room)
        if closed_at >= 0:
            return pos + closed_at + 1
        if quote >= 0:
            pos = _string_end(data, quote + 1)
        elif stop == size:
            raise Invalid("unterminated array or object")
        else:
            pos = stop


def _brackets(segment: bytes, open_count: int, room: int) -> tuple[int, int]:
    """Follow the brackets of a segment without strings: (where the count reaches 0 or -1, the count after it)."""
    opens = segment.count(b"[") + segment.count(b"{")
    closes = segment.count(b"]") + segment.count(b"}")
    if closes < open_count and open_count + opens <= room:
        return -1, open_count + opens - closes
    reduced = segment.translate(None, _NOT_BRACKETS)
    for passes in range(_REDUCE_PASSES):  # removing inner pairs leaves closers then openers
        shorter = reduced.replace(b"[]", b"").replace(b"{}", b"").replace(b"[}", b"").replace(b"{]", b"")
        if shorter == reduced:
            leading = len(reduced) - len(reduced.lstrip(b"]}"))
            # Unmatched closers all come before unmatched openers; pairs removed in k passes nest k deep.
            deepest = max(open_count, open_count - leading + len(reduced) - leading) + passes
            if leading < open_count and deepest <= room:
                return -1, open_count + opens - closes
            break
        reduced = shorter
    if len(segment) <= FIRST_WINDOW:
        return _brackets_one_by_one(segment, open_count, room)
    counts = list(accumulate(array("b", segment.translate(_DELTA)), initial=open_count))
    try:
        closed_at = counts.index(0)
    except ValueError:
        closed_at = len(counts)
    if max(counts[:closed_at]) > room:
        raise Invalid("nested too deeply")
    return (closed_at - 1, 0) if closed_at < len(counts) else (-1, counts[-1])


def _brackets_one_by_one(segment: bytes, open_count: int, room: int) -> tuple[int, int]:
    for match in _BRACKET.finditer(segment):
        open_count += 1 if segment[match.start()] in b"[{" else -1
        if open_count == 0:
            return match.start(), 0
        if open_count > room:
            raise Invalid("nested too deeply")
    return -1, open_count
