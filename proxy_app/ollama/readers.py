"""Picking the reader of a decoded response object's API family, by its ``type`` or ``object`` member.

Ollama answers in four shapes: native (/api/*), OpenAI chat/completions/embeddings, OpenAI Responses and Anthropic
Messages. The meter (``usage``) does not know the request's path, and the objects say which shape they are.
"""

from proxy_app.ollama import messages, responses
from proxy_app.ollama.completions import read_completion
from proxy_app.ollama.native import read_native
from proxy_app.ollama.reading import Reading, read_error


def read_object(obj: dict) -> Reading:
    """Pick the reader of the object's API family (by its ``type`` or ``object`` member) and read the object."""
    kind = obj.get("type")
    if isinstance(kind, str) and kind in messages.EVENTS:
        return messages.read_message(obj)
    if isinstance(kind, str) and responses.is_responses_event(kind) and not obj.get("error"):
        return responses.read_event(obj)
    if obj.get("object") == "response":
        return responses.read_response(obj)
    if obj.get("error"):  # native {"error": "…"}, /v1 {"error": {"message": …}}, Anthropic {"type": "error", …}
        return read_error(obj["error"])
    if "choices" in obj or "usage" in obj:
        return read_completion(obj)
    return read_native(obj)
