"""Where a process's memory goes over many calls: ``python -m bench.heap [--calls 320000]``.

Runs the proxy app in this process (no server; 8 threads calling it, a quarter of the calls streaming 20 tokens, the
fast fake upstream in its own process) and after each tenth of the calls reports, next to the resident size, what
the allocators hold: Python's objects and blocks, Python's arenas (1 MiB each), glibc's bytes in use and free
(``mallinfo2``, summed over all of glibc's arenas), and SQLite's own heap. A leak grows what is in use;
fragmentation grows only what is held. Linux with glibc only. Run alone: it measures, so it needs a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import sys
import tempfile
import threading

import psutil

from bench import client, targets
from proxy_app.state import state_of

from .breakdown import call_app

THREADS = 8
STREAM_SHARE = 0.25
MB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def _python_arenas() -> int:
    """Python's arenas allocated now, from ``sys._debugmallocstats`` (it writes to the C stderr)."""
    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(write)
        os.close(saved)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    return int(re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)[1].replace(",", ""))


def snapshot(libc, sqlite) -> dict:
    gc.collect()
    info = libc.mallinfo2()
    return {
        "rss_mb": round(psutil.Process().memory_info().rss / MB, 1),
        "python_objects": len(gc.get_objects()),
        "python_blocks": sys.getallocatedblocks(),
        "python_arenas": _python_arenas(),
        "malloc_in_use_mb": round(info.uordblks / MB, 2),
        "malloc_free_mb": round(info.fordblks / MB, 2),
        "sqlite_mb": round(sqlite.sqlite3_memory_used() / MB, 2),
    }


def run(calls: int) -> list[dict]:
    from proxy_app import create_app, shutdown

    libc, sqlite = ctypes.CDLL("libc.so.6"), ctypes.CDLL("libsqlite3.so.0")
    libc.mallinfo2.restype, sqlite.sqlite3_memory_used.restype = _MallInfo2, ctypes.c_int64
    short, streamed = client.generate_body(stream=False), client.generate_body(stream=True)
    upstream = targets.start_upstream()
    points = []
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            app = create_app({"UPSTREAM": upstream.url, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING"}, environ={})
            step = calls // 10 // THREADS

            def work(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(step):
                    if rng.random() < STREAM_SHARE:
                        call_app(app, streamed, tokens=20)
                    else:
                        call_app(app, short)

            for tenth in range(1, 11):
                threads = [threading.Thread(target=work, args=(tenth * 100 + i,)) for i in range(THREADS)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                state_of(app).writer.flush(60)
                points.append({"calls": tenth * step * THREADS, **snapshot(libc, sqlite)})
                print(json.dumps(points[-1]), file=sys.stderr, flush=True)
            points.append({"rows_dropped": state_of(app).writer.dropped})
            shutdown(app)
    finally:
        upstream.stop()
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heap", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=320_000)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.calls), indent=1))


if __name__ == "__main__":
    main()
