"""The bounded label values of the metrics (metrics.py, otel.py): an ``endpoint`` label from a fixed set whatever
paths clients invent, and model and key names capped per process (``BoundedLabels``), the rest counted as ``other``.
A prompt, a client address or an id never becomes a label.
"""

from __future__ import annotations

import threading

# Why: the label set stays fixed whatever paths clients invent: Ollama's routes (server/routes.go), each prefix
# below as one label for the paths under it (an id or an experimental tool), and OTHER for the rest.
ENDPOINTS = frozenset(
    {"/", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/ps",
     "/api/version", "/api/status", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
     "/api/blobs", "/api/me", "/api/signout", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
     "/v1/models", "/v1/responses", "/v1/messages", "/v1/audio/transcriptions"}
)  # fmt: skip
FOLDED_PREFIXES = (("/api/blobs/", "/api/blobs"), ("/v1/models/", "/v1/models/{id}"),
                   ("/api/experimental/", "/api/experimental/*"))  # fmt: skip
OTHER = "other"
NO_MODEL = "none"  # calls that name no model (/api/tags, /api/version, ...)
NO_KEY = "none"  # anonymous calls, which carry no API key: the same word as a call without a model
MAX_MODEL_CHARS = 200  # longer "model names" are junk; they must not bloat every series


def endpoint_label(path: str) -> str:
    """Return the ``endpoint`` label for a request path: a known Ollama endpoint, a folded prefix's label, or other."""
    if path in ENDPOINTS:
        return path
    for prefix, label in FOLDED_PREFIXES:
        if path.startswith(prefix):
            return label
    return OTHER


class BoundedLabels:
    """Per-process label cap for a name (a model's, a key's): the first ``limit`` names admitted keep their name, the
    rest are OTHER, and a missing name is ``missing``."""

    def __init__(self, limit: int, missing: str = NO_MODEL) -> None:
        self.limit = limit
        self.missing = missing
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, name: str | None, is_success: bool) -> str:
        """Return the label for ``name``; only a successful call may admit a new name (random names fail upstream)."""
        if not name:
            return self.missing
        if name in self._known:
            return name
        if not is_success or len(name) > MAX_MODEL_CHARS:
            return OTHER
        with self._lock:
            if len(self._known) < self.limit:
                self._known.add(name)
                return name
        return OTHER
