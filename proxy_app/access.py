"""Who may reach the proxy's own pages: the bearer-token check that ``/metrics`` and ``/analytics`` share, whether
an address is loopback (the start-up warning, the supervised Ollama's address), and who a client is
(``client_address``, which the relay's records and the dashboard's sign-in throttle share).

It reads no request and no setting: callers pass the header, the token and the host.
"""

from __future__ import annotations

import hmac
import ipaddress


def is_authorized(header: str | None, token: str) -> bool:
    """True when no token is set, or when ``header`` is "Bearer <token>" (any case of "Bearer"; constant time)."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, with or without brackets) or the name localhost."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def client_address(peer: str, forwarded: str | None, trusted: tuple) -> str:
    """Return the client's IP: the peer's, or from ``forwarded`` (X-Forwarded-For) only when the peer is trusted."""
    if not forwarded or not trusted:
        return peer
    chain = [hop.strip() for hop in forwarded.split(",") if hop.strip()] + [peer]
    for hop in reversed(chain):  # walk back from the peer, skipping our own trusted proxies
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop[:64]
        if not any(address in network for network in trusted):
            return hop
    return chain[0]
