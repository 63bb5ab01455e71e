"""Reading the OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` objects.

Chunks, whole completions and embedding lists alike: text and finish reason from ``choices``, counts from
``usage``. Does not frame SSE events or decode JSON (``usage``), nor strip injected usage (``stripper``).
"""

from proxy_app.ollama.reading import Reading


def read_completion(obj: dict) -> Reading:
    """Read text, reasoning/tool calls and finish reason from ``choices``, and counts from ``usage``."""
    texts, extra, reason = [], None, None
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        part = choice.get("delta") or choice.get("message")
        if isinstance(part, dict):
            text = part.get("content")
            extra = extra or part.get("reasoning") or part.get("reasoning_content") or part.get("tool_calls")
        else:
            text = choice.get("text")
        if isinstance(text, str):
            texts.append(text)
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            reason = choice["finish_reason"]
    return Reading(text="".join(texts), extra=extra, reason=reason, counts=_usage_counts(obj.get("usage")))


def _usage_counts(usage: object) -> dict | None:
    """Counts from a ``usage`` object. The all-zero usage that /v1/completions puts on every chunk with
    include_usage (middleware/openai.go, CompleteWriter) is a placeholder, not a count, so it is skipped."""
    if not isinstance(usage, dict) or not (usage.get("prompt_tokens") or usage.get("completion_tokens")):
        return None
    counts = {"input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens")}
    details = usage.get("prompt_tokens_details")  # cached prompt tokens, where the server reports them
    if isinstance(details, dict) and "cached_tokens" in details:
        counts["cached_input_tokens"] = details["cached_tokens"]
    return counts
