"""What an API key with limits costs a call on the hot path, in CPU: in-process, no server.

Measured in rounds, the order rotating from round to round, against an anonymous twin (an app on a store of the same
kind with no key stored):

- ``check``: the key work alone, as the relay does it for one call: ``keycheck.identify`` (the header read and
  taken off, the hash, the ring lookup), ``keycheck.admit`` (a request of the minute's lease, the token view) and
  ``keycheck.settle_key`` (the charge), for keys with different limits, each far from being reached. The
  anonymous twin runs ``identify`` only, as the relay does for a call without a key.
- ``call``: a whole non-streaming /api/generate through the WSGI app to the fast fake upstream (bench/breakdown.py's
  call), with the key of every limit and without a key.
- ``in_call``: the CPU the calling thread spends inside those three functions during whole keyed calls, timed by
  wrapping them. In a whole call the key code runs with the rest of the call between its runs, so it costs more than
  in the tight loop of ``check``; this is the figure to hold to a budget, and it varies less than the difference of
  two whole calls. Reading the clock is as cold there as the code it times, so each wrapper also times two reads in a
  row at the same point (``timer``), and ``total_less_timers`` takes them off.
- ``lease_transaction_us``: one request lease taken from the store (the transaction every LEASE_MAX requests).

CPU is the calling thread's (``thread_us``) and the whole process's (``process_us``): the latter includes the
limiter's background thread, which writes the batched charges. The database round trips of the leases and token
views are spread over the calls. Run alone: ``python -m bench.keycost [--database-url URL]`` (default: SQLite in a
temporary directory; with a PostgreSQL URL each app gets a fresh schema there, dropped at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from bench import breakdown, client, targets
from proxy_app.relay import keycheck
from proxy_app.state import state_of
from proxy_app.store import counters, keystate
from proxy_app.store.keys import KeyChange, KeyTable

CALLS = 20_000
FAR = 10**9  # a limit no run comes near: the common case the budget is for
KEYS = {  # the keys measured, by what they limit
    "no_limit": KeyChange(),
    "rpm": KeyChange(rpm=FAR),
    "tokens": KeyChange(tpm=FAR, tokens_per_day=FAR),
    "rpm_and_tokens": KeyChange(rpm=FAR, tpm=FAR, tokens_per_day=FAR),
}
TOKENS_PER_CALL = 30  # charged at each settle_key, like a short generation
LEASES = 200


def _make_apps(upstream_url: str, data_dir: Path, stores: tuple[str | None, str | None]) -> tuple:
    """(keyed app, {name: secret} of KEYS, anonymous app), each app on its own store (None: SQLite in its data
    directory)."""
    from proxy_app import create_app

    apps = []
    for name, store in zip(("keyed", "anonymous"), stores, strict=True):
        settings = {"UPSTREAM": upstream_url, "LOG_LEVEL": "ERROR", "DATA_DIR": str(data_dir / name)}
        apps.append(create_app({**settings, "DATABASE_URL": store or ""}, environ={}))
    keys = state_of(apps[0]).keys
    with keys.connection as db:
        made = {name: KeyTable(db).create(name, change) for name, change in KEYS.items()}
    keys.ring.refresh()
    return apps[0], made, apps[1]


@contextlib.contextmanager
def _stores(database_url: str | None):
    """Two empty stores: SQLite files (None, None) by default, or two fresh schemas of a PostgreSQL database, dropped
    afterwards."""
    if not database_url:
        yield None, None
        return
    from proxy_app.store.models import open_database

    db, schemas = open_database(database_url), [f"bench_keycost_{secrets.token_hex(4)}_{n}" for n in range(2)]
    for schema in schemas:
        db.execute_sql(f"CREATE SCHEMA {schema}")
    try:
        joiner = "&" if "?" in database_url else "?"
        yield tuple(f"{database_url}{joiner}options=-csearch_path%3D{schema}" for schema in schemas)
    finally:
        for schema in schemas:
            db.execute_sql(f"DROP SCHEMA {schema} CASCADE")
        db.close()


def check(app, secret: str | None, calls: int) -> None:
    """The relay's key work for ``calls`` calls presenting ``secret`` (None: calls without a key)."""
    if secret is None:
        for _ in range(calls):
            keycheck.identify(app, {})
        return
    header = f"Bearer {secret}"
    for _ in range(calls):
        policy = keycheck.identify(app, {"HTTP_AUTHORIZATION": header}).policy
        if keycheck.admit(app, policy, "/api/chat", "llama3.2") is not None:
            raise AssertionError(f"the key {policy.name!r} was refused: a limit is not far")
        keycheck.settle_key(app, policy, TOKENS_PER_CALL)


def whole_calls(app, secret: str | None, calls: int) -> None:
    """``calls`` non-streaming /api/generate calls through the app, presenting ``secret`` (None: no key)."""
    body, headers = client.generate_body(stream=False), {"HTTP_AUTHORIZATION": f"Bearer {secret}"} if secret else {}
    for _ in range(calls):
        breakdown.call_app(app, body, headers=headers)


def _timed(spent: dict, name: str, function):
    """``function``, adding the calling thread's CPU in it to ``spent[name]``, and what reading the clock costs at
    that same point of the call to ``spent["timer"]``: two reads in a row, as cold as the reads around the function."""

    def wrapper(*args):
        before = time.thread_time()
        started = time.thread_time()
        try:
            return function(*args)
        finally:
            ended = time.thread_time()
            spent[name] = spent.get(name, 0.0) + ended - started
            spent["timer"] = spent.get("timer", 0.0) + started - before

    return wrapper


@contextlib.contextmanager
def _timing_key_work(spent: dict):
    """Wrap keycheck's identify, admit and settle_key so that ``spent[name]`` adds up their calling-thread CPU."""
    originals = {name: getattr(keycheck, name) for name in ("identify", "admit", "settle_key")}
    for name, function in originals.items():
        setattr(keycheck, name, _timed(spent, name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(keycheck, name, function)


def key_work_in_calls(app, secret: str, calls: int, rounds: int) -> dict:
    """Median over ``rounds`` of the calling-thread CPU in each key function during whole calls, µs per call."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        spent: dict[str, float] = {}
        with _timing_key_work(spent):
            whole_calls(app, secret, calls)
        timer = spent.pop("timer")  # the three functions' timers together, read where they ran
        total = sum(spent.values())
        for name, seconds in [*spent.items(), ("total", total), ("timer", timer), ("total_less_timers", total - timer)]:
            samples.setdefault(name, []).append(seconds / calls * 1e6)
    return {f"{name}_thread_us": round(statistics.median(values), 1) for name, values in samples.items()}


def lease_transaction_us(app) -> float:
    """Calling-thread CPU of one request lease taken from the store (``Limiter._grant_requests``), µs."""
    limiter, minute = state_of(app).keys.limiter, counters.window_start(counters.MINUTE, time.time())
    started = time.thread_time()
    for _ in range(LEASES):
        limiter._grant_requests("bench-lease", minute, FAR)
    return (time.thread_time() - started) / LEASES * 1e6


def run(calls: int = CALLS, rounds: int = 5, database_url: str | None = None) -> dict:
    """Medians over ``rounds`` of each measurement, µs per call (see the module's docstring)."""
    from proxy_app import shutdown

    upstream = targets.start_upstream()
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as data_dir, _stores(database_url) as stores:
            keyed, made, anonymous = _make_apps(upstream.url, Path(data_dir), stores)
            plan = [("check", "anonymous", check, anonymous, None, calls)]
            plan += [("check", name, check, keyed, made[name], calls) for name in KEYS]
            whole = calls // 10  # a whole call costs ten checks or more
            plan += [("call", "anonymous", whole_calls, anonymous, None, whole),
                     ("call", "rpm_and_tokens", whole_calls, keyed, made["rpm_and_tokens"], whole)]  # fmt: skip
            for _figure, _who, action, app, secret, count in plan:  # warm-up
                action(app, secret, count // 10)
            for number in range(rounds):
                for figure, who, action, app, secret, count in plan[number:] + plan[:number]:
                    thread, process = time.thread_time(), time.process_time()
                    action(app, secret, count)
                    spent = (time.thread_time() - thread, time.process_time() - process)
                    samples.setdefault((figure, who), []).append(tuple(value / count * 1e6 for value in spent))
            in_call = key_work_in_calls(keyed, made["rpm_and_tokens"], whole, rounds)
            lease = lease_transaction_us(keyed)
            for app in (keyed, anonymous):
                shutdown(app)
    finally:
        upstream.stop()
    return {**_summary(samples, database_url), "in_call": in_call, "lease_transaction_us": round(lease),
            "lease_max": keystate.LEASE_MAX}  # fmt: skip


def _summary(samples: dict, database_url: str | None) -> dict:
    medians = {key: [round(statistics.median(sample[i] for sample in values), 1) for i in (0, 1)]
               for key, values in samples.items()}  # fmt: skip
    result: dict = {"store": "postgresql" if database_url and "postgres" in database_url else "sqlite"}
    for figure in ("check", "call"):
        base_thread, base_process = medians[figure, "anonymous"]
        result[figure] = {
            who: {"thread_us": thread, "process_us": process, "added_thread_us": round(thread - base_thread, 1),
                  "added_process_us": round(process - base_process, 1),
                  "per_anonymous": round(process / base_process, 3)}
            for (shown, who), (thread, process) in medians.items() if shown == figure
        }  # fmt: skip
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keycost", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="the store (default: SQLite in a temporary directory)")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write a results file (python -m bench.report reads it)")
    args = parser.parse_args(argv)
    from bench.__main__ import code_version, machine  # here: bench.__main__ imports this module

    document = {"mode": "keycost", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                "code": code_version()}  # fmt: skip
    document["figures"] = {"keys": run(args.calls, args.rounds, args.database_url)}
    document["machine"]["load_average_at_end"] = [round(value, 1) for value in os.getloadavg()]
    if args.output:
        args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["figures"]["keys"], indent=2))


if __name__ == "__main__":
    main()
