"""What one client may hold of a server process's front (front.py): connections per client address, and how
slowly it may send a request. ``Limits`` holds the settings; ``Guard`` counts the open connections by address,
refuses one over the cap (a warning at most once a minute), and tells which channels are overdue.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from waitress.channel import HTTPChannel

log = logging.getLogger(__name__)

REFUSAL_LOG_SECONDS = 60.0  # at most one warning a minute about refused connections


@dataclass(frozen=True)
class Limits:
    """What one client may hold: connections per address (0: no cap), and how slowly it may send a request."""

    per_client: int = 0
    header_seconds: float = 0.0  # 0: no deadline
    body_seconds: float = 0.0  # 0: no deadline
    exempt: tuple = ()  # networks whose connections are not capped (a reverse proxy speaks for many clients)

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits set by MAX_CONNECTIONS_PER_CLIENT, HEADER_TIMEOUT, BODY_TIMEOUT and TRUSTED_PROXIES."""
        return cls(settings["MAX_CONNECTIONS_PER_CLIENT"], settings["HEADER_TIMEOUT"], settings["BODY_TIMEOUT"],
                   tuple(settings["TRUSTED_PROXIES"]))  # fmt: skip

    def is_capped(self, host: str) -> bool:
        """True when connections from ``host`` count against the per-client cap."""
        if not self.per_client:
            return False
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return True
        return not any(address in network for network in self.exempt)


class Guard:
    """Open connections by client address, and the deadlines of each channel; shared by a front's channels."""

    def __init__(self, limits: Limits, clock=time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.open: Counter = Counter()
        self.total = 0  # open client connections, from every address
        self.refused = 0
        self.closed_slow = 0
        self.stopping = False  # set as the server stops: every answer from then on closes its connection
        self._lock = threading.Lock()
        self._next_log = 0.0

    def admit(self, host: str, last_chance: bool = True) -> bool:
        """Count a new connection from ``host``; False (and nothing counted) when it is over the cap, which counts as
        a refusal only on its ``last_chance``."""
        with self._lock:
            if self.limits.is_capped(host) and self.open[host] >= self.limits.per_client:
                if last_chance:
                    self.refused += 1
                    self._log_refusal(host)
                return False
            self.open[host] += 1
            self.total += 1
            return True

    def release(self, host: str) -> None:
        """Forget a closed connection from ``host``."""
        with self._lock:
            self.open[host] -= 1
            self.total -= 1
            if self.open[host] <= 0:
                del self.open[host]

    def _log_refusal(self, host: str) -> None:
        now = self.clock()
        if now >= self._next_log:
            self._next_log = now + REFUSAL_LOG_SECONDS
            log.warning("refused a connection from %s, which holds %d already (MAX_CONNECTIONS_PER_CLIENT); "
                        "%d refused so far", host, self.limits.per_client, self.refused)  # fmt: skip

    def is_overdue(self, channel: HTTPChannel, now: float) -> bool:
        """True when ``channel``'s headers are late or its body has been silent too long (front.GuardedChannel)."""
        request = channel.request
        if channel.will_close:
            return False  # already on its way out
        if request is None or not request.headers_finished:
            return channel.header_deadline is not None and now > channel.header_deadline
        body_seconds = self.limits.body_seconds
        return bool(body_seconds) and not request.completed and now - channel.last_heard > body_seconds
