"""glibc's malloc arenas, capped before a serving process starts its threads.

glibc gives each thread that allocates an arena of its own, until there are eight per core, and each arena keeps
the memory freed in it for itself. With a thread per call, a worker's freed memory is spread
over every arena its threads ever used, and its resident size climbs long after its live objects stopped growing
(docs/benchmarks.md, memory). Python's own threads allocate while holding the GIL, so they seldom contend for one
heap: ARENAS arenas serve them as well as sixteen do. The cap is glibc's own ``mallopt(M_ARENA_MAX)``; a
``MALLOC_ARENA_MAX`` in the environment, which glibc reads itself, wins. Elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


def is_glibc() -> bool:
    """True when this process's C library is glibc (the only one with these arenas)."""
    return platform.libc_ver()[0] == "glibc"


def cap_arenas(environ: Mapping[str, str] = os.environ) -> bool:
    """Cap this process's malloc arenas at ARENAS (its forked children inherit it); True when the cap was set."""
    if "MALLOC_ARENA_MAX" in environ or not is_glibc():
        return False
    return ctypes.CDLL(None).mallopt(M_ARENA_MAX, ARENAS) == 1
