"""Reading the OpenAI Responses API (``/v1/responses``): its stream events and its whole response object.

A stream is SSE with ``event:`` lines and ends after ``response.completed`` (no ``data: [DONE]``); the usage sits
in that event's ``response``. Text, reasoning and tool-call arguments arrive as ``*.delta`` events. Ollama itself
ends a stream with ``response.completed`` or, when its web search fails, ``response.failed``; a stream that breaks
mid-way simply stops. ``response.incomplete`` and the ``error`` event are the OpenAI API's, which a cloud model's
relayed answer may carry. Does not frame events or decode JSON (``usage``).
"""

from proxy_app.ollama.reading import Reading, read_error

TEXT_DELTA = "response.output_text.delta"
# Content that is not previewed: reasoning and tool-call arguments. has_content turns on at the first of any delta.
OTHER_DELTAS = frozenset(
    {
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
    }
)
ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def is_responses_event(kind: str) -> bool:
    """True for the ``type`` of a Responses stream event."""
    return kind.startswith("response.") or kind == "error"


def read_event(obj: dict) -> Reading:
    """Read one stream event: a delta, an ending with the usage, an error, or the model from the first events."""
    kind = obj["type"]
    if kind == TEXT_DELTA:
        return Reading(text=obj.get("delta"))
    if kind in OTHER_DELTAS:
        return Reading(extra=obj.get("delta"))
    if kind == "error":  # the OpenAI API's stream error: {"type":"error","code":…,"message":…}
        return Reading(is_failed=True, error=obj.get("message"))
    response = obj.get("response")
    if not isinstance(response, dict):
        return Reading()
    if kind in ENDINGS:  # its output repeats the deltas already read, so only its status and usage count
        return _read_outcome(response)
    return Reading(model=response.get("model"))


def read_response(obj: dict) -> Reading:
    """Read a whole (non-streamed) response object: its output text as well as its status and usage."""
    reading = _read_outcome(obj)
    texts, extra = [], None
    output = obj.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message" and isinstance(item.get("content"), list):
            texts += [part.get("text") for part in item["content"] if _is_output_text(part)]
        elif item.get("type") in ("reasoning", "function_call"):
            extra = extra or item.get("summary") or item.get("arguments")
    reading.text, reading.extra = "".join(texts), extra
    return reading


def _read_outcome(response: dict) -> Reading:
    """Status, usage, model and any error of a response object (ToResponse, buildResponseObject in Go)."""
    status = response.get("status")
    reading = read_error(response["error"]) if response.get("error") else Reading(is_failed=status == "failed")
    reading.model, reading.counts = response.get("model"), _usage_counts(response.get("usage"))
    reading.reason = status
    details = response.get("incomplete_details")
    if status == "incomplete" and isinstance(details, dict) and details.get("reason"):
        reading.reason = details["reason"]
    reading.is_complete = status == "completed"
    reading.is_cut_short = status == "incomplete"
    return reading


def _usage_counts(usage: object) -> dict | None:
    """Counts from a Responses usage. cached_tokens is taken only when positive: Ollama's own Responses layer
    writes a constant 0 there (openai/responses.go, "TODO: wire through the actual values"), so 0 says nothing."""
    if not isinstance(usage, dict):
        return None
    counts = {"input_tokens": usage.get("input_tokens"), "output_tokens": usage.get("output_tokens")}
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if type(cached) is int and cached > 0:
        counts["cached_input_tokens"] = cached
    return counts


def _is_output_text(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str)
