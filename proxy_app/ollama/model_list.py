"""Pure: a model list answer with only some of its models, for a key limited to those.

``GET /api/tags`` answers ``{"models": [{"name": …, "model": …}, …]}`` (server/routes.go, ListHandler), ``GET
/api/ps`` lists the loaded models in the same shape (PsHandler), and ``GET /v1/models`` answers
``{"object": "list", "data": [{"id": …}, …]}`` (openai/openai.go, ListCompletion). The rest of the answer is kept as
it came, written back compactly like Go's encoding/json.
"""

from __future__ import annotations

import json
from collections.abc import Callable

# path -> (the list's member, the field naming each model)
LISTS = {"/api/tags": ("models", "name"), "/api/ps": ("models", "name"), "/v1/models": ("data", "id")}
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})  # Go's HTML-safe escaping


def only_allowed(path: str, body: bytes, allows: Callable[[str], bool]) -> bytes | None:
    """The answer with the models ``allows`` refuses left out; None when it is not a model list we can read."""
    member, name_field = LISTS.get(path, (None, None))
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if member is None or not isinstance(document, dict) or not isinstance(document.get(member), list):
        return None
    document[member] = [
        entry
        for entry in document[member]
        if isinstance(entry, dict) and isinstance(entry.get(name_field), str) and allows(entry[name_field])
    ]
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).translate(_GO_ESCAPES).encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return None
