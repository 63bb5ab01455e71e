"""glibc's malloc arenas: a serving process caps them before its threads start (service/heap.py).

Each check runs in a fresh interpreter, whose arenas are glibc's own doing until the code under test runs, and counts
them the way glibc reports them (``malloc_info``: one ``<heap nr=...>`` element per arena).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from proxy_app.service import heap

pytestmark = pytest.mark.skipif(not heap.is_glibc(), reason="glibc only")

THREADS = 8  # fewer than glibc's own limit here (eight per core), more than heap.ARENAS

# 8 threads each allocate 100 kB (glibc's heap, not Python's small-object arenas) while all are alive, then the
# process prints how many arenas glibc has.
_COUNT_ARENAS = textwrap.dedent(f"""
    import ctypes, re, sys, threading
    from proxy_app.service import heap
    capped = heap.cap_arenas() if sys.argv[1] == "cap" else None
    barrier, held = threading.Barrier({THREADS}), []
    def allocate():
        barrier.wait()
        held.append(bytes(100_000))
        barrier.wait()
    threads = [threading.Thread(target=allocate) for _ in range({THREADS})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    path = sys.argv[2]
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(capped, len(re.findall(r"<heap nr=", open(path).read())))
""")


def _arenas(tmp_path, mode: str, **environ: str) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    command = [sys.executable, "-c", _COUNT_ARENAS, mode, str(tmp_path / "malloc_info.xml")]
    result = subprocess.run(command, env={**env, **environ}, capture_output=True, text=True, timeout=60, check=True)
    capped, count = result.stdout.split()
    return capped, int(count)


def test_heap_arenas_are_capped_for_a_process_of_many_threads(tmp_path):
    assert _arenas(tmp_path, "cap") == ("True", heap.ARENAS)


def test_heap_threads_get_arenas_of_their_own_without_the_cap(tmp_path):
    """What the cap prevents: glibc hands each new thread an arena, up to eight per core."""
    _, count = _arenas(tmp_path, "none")
    assert count > heap.ARENAS


def test_heap_malloc_arena_max_in_the_environment_wins(tmp_path):
    assert _arenas(tmp_path, "cap", MALLOC_ARENA_MAX="3") == ("False", 3)
