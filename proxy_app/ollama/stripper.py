"""Removing from a ``/v1/chat/completions`` stream the usage event that the proxy itself asked for (`UsageStripper`).

The proxy injects ``stream_options.include_usage`` into a streamed chat request sent without it, so it can count
tokens. Ollama then sends one more event, ``choices: []`` with ``usage``, between the finish chunk and
``data: [DONE]`` (middleware/openai.go, ChatWriter): the same in the current layout (role in the first delta, a
``delta: {}`` finish chunk) and the older one. Removing that event leaves the bytes Ollama sends without
include_usage. Does not count anything (``usage``).
"""

import json

MAX_EVENT_BYTES = 64 * 1024  # a usage-only SSE event is ~250 bytes, so bigger pending data is forwarded at once


class UsageStripper:
    """Removes the one usage-only SSE event (choices == [] and a usage key) that the proxy itself asked for
    by injecting stream_options.include_usage into a /v1/chat/completions request the client sent without it."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._passing = False  # inside an oversized event that was forwarded before its end arrived

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to forward now: whole events only, the usage-only one removed, the rest byte-identical."""
        start = max(len(self._pending) - 1, 0)  # a "\n\n" may straddle the old and new bytes
        self._pending += chunk
        end = self._pending.find(b"\n\n", start)
        if end == -1:
            return self._spill()
        while (later := self._pending.find(b"\n\n", end + 2)) != -1:  # left to right, as split() cuts "\n\n\n"
            end = later
        block = bytes(self._pending[: end + 2])
        del self._pending[: end + 2]
        if not self._passing:
            return _strip_usage_events(block)
        self._passing = False
        cut = block.find(b"\n\n") + 2
        return block[:cut] + _strip_usage_events(block[cut:])

    def flush(self) -> bytes:
        """Return whatever is left at EOF, unchanged."""
        rest, self._pending = bytes(self._pending), bytearray()
        return rest

    def _spill(self) -> bytes:
        """Forward a partial event early once it is too big to be the usage event (keep one byte for "\\n\\n")."""
        if not self._passing and len(self._pending) <= MAX_EVENT_BYTES:
            return b""
        self._passing = True
        out = bytes(self._pending[:-1])
        del self._pending[:-1]
        return out


def _strip_usage_events(block: bytes) -> bytes:
    """Drop usage-only events from a run of whole events, keeping every other byte as it was."""
    if b'"usage"' not in block:
        return block
    events = block.split(b"\n\n")
    kept = [event for event in events if not _is_usage_event(event)]
    return block if len(kept) == len(events) else b"\n\n".join(kept)


def _is_usage_event(event: bytes) -> bool:
    """True for an SSE event whose data is an object with "choices": [] and a "usage" key."""
    if b'"usage"' not in event:
        return False
    lines = event.strip(b"\n").split(b"\n")
    data = b"\n".join(line[5:].strip() for line in lines if line.startswith(b"data:"))
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and "usage" in obj
