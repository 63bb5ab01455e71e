"""The API keys of one app, wired together: the ring the relay looks keys up in (keys.py), the limiter of their
counters (limits.py) and the one database connection they share (counters.py), in ``state_of(app).keys``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy_app.state import state_of
from proxy_app.store.counters import OneConnection, create_tables
from proxy_app.store.keys import KeyRing
from proxy_app.store.limits import Limiter

log = logging.getLogger(__name__)


@dataclass
class Keys:
    """The API keys of one app: the ring the relay looks keys up in, and the limiter of their counters."""

    ring: KeyRing
    limiter: Limiter
    connection: OneConnection


def init_app(app) -> None:
    """Create the key tables and put the keys in ``state_of(app).keys`` (the relay reads them there)."""
    connection = OneConnection(app.config["DATABASE"])
    try:
        with connection as db:
            create_tables(db)
    except Exception:
        log.exception("cannot prepare the API key tables; keyed calls are refused until the database answers")
    finally:
        connection.close()  # never carry a connection across gunicorn's fork
    keys = Keys(KeyRing(connection), Limiter(connection, app.config.get("INSTANCE") or "proxy"), connection)
    state_of(app).keys = keys
    state_of(app).shutdown_hooks.append(keys.ring.ticker.stop)
    state_of(app).shutdown_hooks.append(keys.limiter.close)
