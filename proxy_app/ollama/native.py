"""Reading Ollama's native answers: /api/generate, /api/chat and /api/embed objects, and pull/push/create progress.

Does not frame lines or decode JSON (``usage``), and reads nothing of the ``/v1`` shapes.
"""

from proxy_app.ollama.reading import Reading

# The final object's metrics (api.Metrics, all omitempty) -> Usage fields. Durations are int64 nanoseconds.
# prompt_eval_cached_count: the prompt tokens read from the cache, a part of prompt_eval_count.
NATIVE_FIELDS = (
    ("prompt_eval_count", "input_tokens"),
    ("prompt_eval_cached_count", "cached_input_tokens"),
    ("eval_count", "output_tokens"),
    ("total_duration", "total_duration_ns"),
    ("load_duration", "load_duration_ns"),
    ("prompt_eval_duration", "prompt_eval_duration_ns"),
    ("eval_duration", "eval_duration_ns"),
)


def read_native(obj: dict) -> Reading:
    """Read text, metrics, reason, completion and the cloud fields from one native object."""
    message = obj.get("message")
    part = message if isinstance(message, dict) else obj
    text = part.get("content") if part is message else obj.get("response")
    done = obj.get("done")
    return Reading(
        text=text,
        extra=part.get("thinking") or part.get("tool_calls"),
        counts=None if done is False else {name: obj[key] for key, name in NATIVE_FIELDS if key in obj},
        reason=obj.get("done_reason"),
        is_complete=done is True or obj.get("status") == "success",
        remote_model=obj.get("remote_model"),
        remote_host=obj.get("remote_host"),
    )
