"""Pure: request bodies that are not plain JSON, read as Ollama reads them: zstd-compressed JSON, multipart forms.

Ollama decompresses ``Content-Encoding: zstd`` on its POST routes for OpenAI and Anthropic clients (Codex sends it
to /v1/responses), within its own limits, and reads any other encoding as the bytes it is. The audio transcription
route reads a multipart form and takes the model from its first ``model`` value, the query string first. Only the
proxy's copy is decoded: the bytes relayed are the client's. This module does not parse JSON (jsonscan.py).
"""

from __future__ import annotations

import email.message
import quopri
from urllib.parse import parse_qsl

import zstandard

# Ollama's routes that decompress zstd (cloudPassthroughMiddleware); elsewhere the body is read as the bytes it is.
ZSTD_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"})
ZSTD_MAX_BYTES = 20 << 20  # Ollama refuses a body that decompresses to more (maxDecompressedBodySize)
ZSTD_WINDOW_BYTES = 8 << 20  # Ollama's decoder refuses frames that need a larger window (WithDecoderMaxMemory)
ZSTD_PIECE = 1 << 20  # decompressed per call, so a bomb stops at the limit
FORM_PATHS = frozenset({"/v1/audio/transcriptions"})
FORM_BYTES = 8 * 1024  # a form's model field is looked for this far into the body only


class Undecodable(ValueError):
    """The body cannot be read the way Ollama reads it: Ollama refuses it."""


def decoded(path: str, body: bytes, content_encoding: str | None) -> bytes:
    """Return the bytes Ollama parses: the body, or its decompressed copy on the routes that take zstd."""
    if (content_encoding or "").strip() != "zstd" or path not in ZSTD_PATHS:
        return body  # Go compares the header with "zstd" exactly and otherwise reads the bytes as they are
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_BYTES)
    pieces, size = [], 0
    try:
        with decompressor.stream_reader(body, read_across_frames=True) as reader:
            while piece := reader.read(ZSTD_PIECE):
                size += len(piece)
                if size > ZSTD_MAX_BYTES:
                    raise Undecodable("the body decompresses past Ollama's limit")
                pieces.append(piece)
    except zstandard.ZstdError as exc:
        raise Undecodable(f"not zstd: {exc}") from None
    return b"".join(pieces)


def form_model(body: bytes, content_type: str | None, query: str | bytes | None) -> str | None:
    """Return the model of a multipart form, as Go's FormValue("model") finds it: the query first, then the body.

    Only the first ``FORM_BYTES`` of the body are read: a model field that comes after a large part is not found.
    """
    query_text = query.decode("latin-1") if isinstance(query, bytes) else (query or "")
    for name, value in parse_qsl(query_text, keep_blank_values=True):
        if name == "model":
            return value or None
    header = email.message.Message()
    header["content-type"] = content_type or ""
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        return None
    return _first_value(body[:FORM_BYTES], b"--" + boundary.encode("utf-8", "surrogateescape"), "model")


def _first_value(window: bytes, delimiter: bytes, wanted: str) -> str | None:
    """Return the first non-file part named ``wanted`` that ends within the window."""
    start = window.find(delimiter)
    if start < 0:
        return None
    line_end = window.find(b"\n", start)
    newline = b"\r\n" if window[line_end - 1 : line_end] == b"\r" else b"\n"  # Go accepts bare LF lines too
    while line_end >= 0:
        head_end = window.find(newline * 2, line_end + 1)
        if head_end < 0:
            return None
        content = head_end + 2 * len(newline)
        end = window.find(newline + delimiter, content)
        if end < 0:
            return None
        name, is_file, quoted = _part_header(window[line_end + 1 : head_end + len(newline)])
        if name == wanted and not is_file:
            value = quopri.decodestring(window[content:end]) if quoted else window[content:end]
            return value.decode("utf-8", "surrogateescape") or None
        after = end + len(newline) + len(delimiter)
        if window[after : after + 2] == b"--":
            return None
        line_end = window.find(b"\n", after)
    return None


def _part_header(block: bytes) -> tuple[str | None, bool, bool]:
    """Return a part's form name, whether it is a file, and whether it is quoted-printable."""
    header = email.message.Message()
    for line in block.decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            header[name.strip()] = value.strip()
    if header.get_content_disposition() != "form-data":
        return None, False, False
    name, filename = (
        header.get_param("name", header="content-disposition"),
        header.get_param("filename", header="content-disposition"),
    )
    quoted = (header.get("content-transfer-encoding") or "").strip().lower() == "quoted-printable"
    return (name if isinstance(name, str) else None), bool(filename), quoted
