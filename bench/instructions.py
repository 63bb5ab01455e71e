"""Instructions a relayed call costs, counted by valgrind's callgrind: the same figure on a quiet machine and a busy
one, so two commits compare without noise.

For each checkout, the proxy app runs in-process (no server) with full analytics against the fast fake upstream
(which runs apart, uncounted), once for WARM_CALLS non-streaming /api/generate calls and once for WARM_CALLS +
``calls``, each ending with the writer's flush; the difference between the two runs, divided by ``calls``, is what a
call costs, with start-up and warm-up cancelled out. It is given for the calling thread (the relay) and for the other
threads together (the writer, the samplers). Instructions are not seconds (a cache miss costs more than an add), so
this ranks changes and finds regressions; the timed benchmarks say what they cost.

Run alone: ``python -m bench.instructions [CHECKOUT ...] [--calls N]`` (default: this checkout), where a CHECKOUT
is a source tree of the proxy, e.g. made by ``git worktree add /tmp/other COMMIT``. It needs valgrind; each checkout
takes about a minute and a half.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALLS, WARM_CALLS = 200, 50
BODY = b'{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'  # bench.client.generate_body(False)
_SUMMARY = re.compile(rb"^summary: (\d+)$", re.MULTILINE)


def run(checkouts: list[Path], calls: int = CALLS) -> dict:
    """{checkout's commit: instructions per call of the relay thread, of the other threads, and in all}."""
    from bench import targets
    from bench.__main__ import code_version

    upstream = targets.start_upstream()
    try:
        figures = {}
        for checkout in checkouts:
            runs = [_counted(checkout, upstream.url, count) for count in (WARM_CALLS, WARM_CALLS + calls)]
            (relay_before, others_before), (relay_after, others_after) = runs
            relay, others = (relay_after - relay_before) / calls, (others_after - others_before) / calls
            figures[code_version(checkout)] = {"relay_thread": round(relay), "other_threads": round(others),
                                               "total": round(relay + others)}  # fmt: skip
        return figures
    finally:
        upstream.stop()


def _counted(checkout: Path, upstream_url: str, count: int) -> tuple[int, int]:
    """(instructions of the calling thread, of every other thread) of one child run of ``count`` calls."""
    out_dir = Path(tempfile.mkdtemp(prefix="ollama-proxy-callgrind-"))
    try:
        env = {key: value for key, value in os.environ.items() if not key.startswith("OLLAMA_PROXY_")}
        env["PYTHONPATH"] = str(checkout)
        command = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
                   f"--callgrind-out-file={out_dir / 'callgrind.out'}", sys.executable, __file__, "--child",
                   upstream_url, str(count)]  # fmt: skip
        subprocess.run(command, cwd=out_dir, env=env, check=True, capture_output=True, timeout=900)
        # One file per thread: callgrind.out-01 is the main (calling) thread, the rest were started by the app.
        per_thread = {path.name: int(_SUMMARY.search(path.read_bytes()).group(1))
                      for path in out_dir.glob("callgrind.out-*")}  # fmt: skip
        relay = per_thread.pop("callgrind.out-01")
        return relay, sum(per_thread.values())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def child(upstream_url: str, count: int) -> None:
    """In the counted process: ``count`` calls through the checkout's app, then the writer's flush.

    Imports only the checkout's ``proxy_app`` (this file runs by its path, so the checkout's own ``bench``, if any,
    is never imported), and finds the writer where each version of the app keeps it.
    """
    from proxy_app import create_app

    data_dir = os.path.abspath("data")  # in the run's own directory, which the parent deletes
    app = create_app({"UPSTREAM": upstream_url, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING"}, environ={})
    try:
        from proxy_app.state import state_of

        writer = state_of(app).writer
    except ImportError:  # a checkout from before proxy_app/state.py kept it in app.extensions
        writer = app.extensions["writer"]
    for _ in range(count):
        _call(app)
    writer.flush(60)
    os._exit(0)  # what shutdown would add is the same in both runs; skipping it keeps the runs short


def _call(app) -> None:
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/api/generate", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(BODY),
        "CONTENT_LENGTH": str(len(BODY)), "CONTENT_TYPE": "application/json", "HTTP_HOST": "127.0.0.1",
        "HTTP_USER_AGENT": "bench", "HTTP_X_FAKE_TOKENS": "5", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }  # fmt: skip
    body = app(environ, lambda status, headers, exc_info=None: None)
    for _ in body:
        pass
    if hasattr(body, "close"):
        body.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", type=Path, nargs="*", help="source trees of the proxy (default: this one)")
    parser.add_argument("--calls", type=int, default=CALLS, help="calls counted (after the warm-up)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<time>-instructions.json)")
    args = parser.parse_args(argv)
    from bench import targets
    from bench.__main__ import machine

    checkouts = [checkout.resolve() for checkout in args.checkouts] or [targets.ROOT]
    document = {"mode": "instructions", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(), "calls": args.calls, "warm_calls": WARM_CALLS,
                "figures": run(checkouts, args.calls)}  # fmt: skip
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = args.output or targets.ROOT / "bench" / "results" / f"{stamp}-instructions.json"
    output.write_text(json.dumps(document, indent=2) + "\n")
    for code, figures in document["figures"].items():
        print(f"{code}: {figures['relay_thread']:,} instructions a call in the relay thread, "
              f"{figures['other_threads']:,} in the others, {figures['total']:,} in all")  # fmt: skip
    print(f"written to {output}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.remove(str(Path(__file__).resolve().parent))  # run by path: bench's modules are no top-level names
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
