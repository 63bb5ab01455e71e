"""Which Host a request may name: Ollama's defence against DNS rebinding, and the proxy's list of extra names.

A web page whose name its owner re-points at 127.0.0.1 becomes same-origin with a loopback server in the browser, so
it could read the answers; but its requests still name the page's own host in ``Host``. Ollama therefore refuses,
when it listens on a loopback address, every Host but local names and addresses (server/routes.go,
``allowedHostsMiddleware``, ``allowedHost`` and ``isLocalIP``), and checks nothing on any other address. ``HostRule``
applies the same rule, plus a configured list (exact names, ``*.domain``, IP addresses, or ``*``): the names a
reverse proxy forwards, or the only ones accepted on an open bind.

Pure: the machine's host name and addresses are given to it. It does not answer refused requests (relay/).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Why: Ollama's allowedHost accepts these names and every name under these top-level domains.
LOCAL_NAMES = frozenset({"", "localhost"})
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Why: Go's netip.Addr.IsPrivate (RFC 1918 and RFC 4193), narrower than Python's is_private.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network) for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


def host_of(header: str) -> str:
    """The host part of a Host header: lower-cased, without its port or an IPv6 address's brackets."""
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host  # "[::1" is no address and stays as it is, to be refused
    if host.count(":") == 1:  # name:port or IPv4:port; more colons are a bare IPv6 address
        return host.partition(":")[0]
    return host


def is_loopback_bind(address: str) -> bool:
    """True for a listen address only this machine can reach (a loopback IP or ``localhost``)."""
    address = address.strip().strip("[]").lower()
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def normalised_entry(entry: str) -> str:
    """An ALLOWED_HOSTS entry as ``HostRule`` compares it (IP addresses in their canonical form)."""
    entry = entry.strip().lower().removeprefix("[").removesuffix("]")
    address = _address(entry)
    return entry if address is None else str(address)


@dataclass(frozen=True)
class HostRule:
    """Decides whether a request's Host header is acceptable on this listener.

    ``checks_local``: the listener is on loopback, so Ollama's rule applies. ``allowed``: extra entries (see
    ``normalised_entry``). ``local_addresses`` returns the machine's own interface addresses when a Host names an IP
    that is neither loopback nor private; it is asked only then, as Ollama does.
    """

    checks_local: bool
    allowed: tuple[str, ...] = ()
    hostname: str = ""
    local_addresses: Callable[[], Iterable[str]] = field(default=lambda: ())

    @property
    def checks_anything(self) -> bool:
        """False on an open bind with no list, where Ollama accepts every Host."""
        return (self.checks_local or bool(self.allowed)) and "*" not in self.allowed

    def allows(self, header: str) -> bool:
        """True when a request naming ``header`` in Host may be served."""
        if not self.checks_anything:
            return True
        host = host_of(header)
        return self._is_local(host) or self._is_listed(host)

    def _is_local(self, host: str) -> bool:
        if host in LOCAL_NAMES or host == self.hostname or host.endswith(LOCAL_SUFFIXES):
            return True
        address = _address(host)
        if address is None:
            return False
        if address.is_loopback or address.is_unspecified or any(address in net for net in PRIVATE_NETWORKS):
            return True
        return any(_address(local) == address for local in self.local_addresses())

    def _is_listed(self, host: str) -> bool:
        address = _address(host)
        host = host if address is None else str(address)
        return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in self.allowed)


@functools.lru_cache(maxsize=1024)  # every call names a Host, nearly always one of a few; a flood of others is bounded
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` spells (an IPv4-mapped IPv6 address as IPv4, as Go compares them), else None."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # a zone (fe80::1%eth0) names no other address
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address
