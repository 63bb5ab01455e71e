"""What crosses the wire, as pure functions: which headers go each way, the request target, the client's address and
the status line. No I/O, no Flask, no state; forward.py decides when each is used.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from werkzeug.http import HTTP_STATUS_CODES

from proxy_app import access

# RFC 9110 7.6.1 hop-by-hop headers, plus those the WSGI servers set themselves (waitress 500s on the former).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
     "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip
NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"server", "date"}
_NOT_IN_TARGET = re.compile("[\x00-\x20\x7f]")  # what http.client refuses in a request line
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and "/": kept as they are when a path must be quoted again
_QUERY_SAFE = _PATH_SAFE + "?%"


def client_address(environ: dict, trusted: tuple) -> str:
    """Return the client's IP; X-Forwarded-For is believed only when the peer is a trusted proxy."""
    return access.client_address(environ.get("REMOTE_ADDR") or "", environ.get("HTTP_X_FORWARDED_FOR"), trusted)


def request_target(environ: dict, path: str) -> str:
    """The target to send upstream: the client's own, byte for byte (``%2F`` stays ``%2F``), in origin form.

    An absolute-form target ("GET http://elsewhere/x") keeps only its path: the host is always the upstream's.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""  # gunicorn, waitress
    if raw.startswith("/") and raw.isascii() and not _NOT_IN_TARGET.search(raw):
        return raw
    target = quote(path, safe=_PATH_SAFE)
    query = quote(environ.get("QUERY_STRING", ""), safe=_QUERY_SAFE, encoding="latin-1")  # WSGI strings are latin-1
    return f"{target}?{query}" if query else target


def named_in_connection(headers) -> set[str]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 7.6.1), lower-cased."""
    return {name.strip().lower() for name in headers.get("Connection", "").split(",")}


def upstream_headers(req, body) -> dict:
    """The headers to send upstream: the client's end-to-end ones, identity encoding, and the body's length."""
    incoming = req.headers
    hop_by_hop = named_in_connection(incoming)
    headers = {}
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered not in NOT_FORWARDED_UP and lowered not in hop_by_hop:
            headers[name] = value if lowered not in headers else headers[name] + ", " + value
    headers["Accept-Encoding"] = "identity"
    if isinstance(body, bytes):
        if body or req.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            headers["Content-Length"] = str(len(body))
    elif req.content_length is not None:
        headers["Content-Length"] = str(req.content_length)
    return headers


def client_headers(upstream_headers) -> list[tuple[str, str]]:
    """The upstream's end-to-end headers, in order, for the client."""
    hop_by_hop = named_in_connection(upstream_headers)
    return [
        (name, value)
        for name, value in upstream_headers.items()
        if name.lower() not in NOT_FORWARDED_DOWN and name.lower() not in hop_by_hop
    ]


def status_line(status: int, reason: str) -> str:
    """The status line for the client: the upstream's own reason (Go's "Not Found") when printable ASCII, else the
    standard one."""
    if not (reason and reason.isascii() and reason.isprintable()):
        reason = HTTP_STATUS_CODES.get(status, "UNKNOWN")
    return f"{status} {reason}"
