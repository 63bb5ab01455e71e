"""Reading the Anthropic-compatible ``/v1/messages``: its stream events and its whole message object.

A stream is ``message_start``, content blocks (``content_block_start``/``_delta``/``_stop``), ``message_delta``
with ``stop_reason`` and the usage, then ``message_stop``. Ollama fills ``message_start``'s input count with an
estimate made from the request (anthropic/anthropic.go, StreamConverter), so the counts are read from
``message_delta`` and from a whole message only. Errors (``{"type":"error","error":{…}}``) are read by the meter
with every other ``error`` member. Does not frame events or decode JSON (``usage``).
"""

from proxy_app.ollama.reading import Reading, as_count

EVENTS = frozenset(
    {"message", "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
     "message_stop", "ping"}
)  # fmt: skip
DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


def read_message(obj: dict) -> Reading:
    """Read one stream event or a whole message (``"type": "message"``)."""
    kind = obj["type"]
    if kind == "content_block_delta":
        return _read_delta(obj.get("delta"))
    if kind == "message_delta":
        delta = obj.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        return Reading(reason=reason, counts=_usage_counts(obj.get("usage")))
    if kind == "message_stop":
        return Reading(is_complete=True)
    if kind == "message_start":  # its usage holds the estimate, not a count
        message = obj.get("message")
        return Reading(model=message.get("model") if isinstance(message, dict) else None)
    if kind == "message":
        return _read_whole(obj)
    return Reading()


def _read_delta(delta: object) -> Reading:
    """A text delta is previewed; thinking and tool input (input_json_delta) are content that is not."""
    if not isinstance(delta, dict) or delta.get("type") not in DELTA_FIELDS:
        return Reading()
    value = delta.get(DELTA_FIELDS[delta["type"]])
    return Reading(text=value) if delta["type"] == "text_delta" else Reading(extra=value)


def _read_whole(obj: dict) -> Reading:
    """A non-streamed message: text blocks, thinking and tool_use blocks, stop_reason and usage."""
    texts, extra = [], None
    content = obj.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") in ("thinking", "tool_use", "server_tool_use"):
            extra = extra or [block]
    return Reading(text="".join(texts), extra=extra, reason=obj.get("stop_reason"),
                   counts=_usage_counts(obj.get("usage")))  # fmt: skip


def _usage_counts(usage: object) -> dict | None:
    """Counts from an Anthropic usage. Its input_tokens leaves out the tokens read from or written to the prompt
    cache (cache_read_input_tokens, cache_creation_input_tokens), so they are added back: input_tokens is the
    whole prompt here as in every other API, and cached_input_tokens its cached part."""
    if not isinstance(usage, dict):
        return None
    counts = {"output_tokens": usage.get("output_tokens")}
    read = as_count(usage.get("cache_read_input_tokens"))
    written = as_count(usage.get("cache_creation_input_tokens"))
    uncached = as_count(usage.get("input_tokens"))
    if uncached is not None:
        counts["input_tokens"] = uncached + (read or 0) + (written or 0)
    if read is not None:
        counts["cached_input_tokens"] = read
    return counts
