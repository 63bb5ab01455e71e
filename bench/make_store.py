"""Fill a SQLite analytics store with N realistic calls, fast: ``python -m bench.make_store --rows 1000000 PATH``.

Rows spread over the last ``--days`` days (busier in the working day), six models with their own speeds, the usual
mix of endpoints and outcomes, a few dozen clients and prompts built from a vocabulary (about 1 in 100 mentions
"invoice", about 1 in 10,000 mentions "zanzibar", for the search benchmark). Rows go in through one raw
``executemany`` per 50,000 in big transactions; the schema is the real one (``schema.create_tables``). It does not
run the proxy or touch an existing file unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy_app.calls import COLUMNS
from proxy_app.store import models, schema

CHUNK_ROWS = 50_000  # rows per executemany and per transaction: big enough to amortise the commit
# (name, share of calls, mean tokens/s, mean TTFT ms) - rough figures for a single consumer GPU
MODELS = (
    ("llama3.2:3b", 0.38, 95.0, 120.0),
    ("qwen2.5:7b", 0.24, 55.0, 220.0),
    ("mistral:7b", 0.14, 50.0, 240.0),
    ("gemma2:9b", 0.10, 38.0, 320.0),
    ("deepseek-r1:14b", 0.06, 24.0, 900.0),
    ("nomic-embed-text", 0.08, None, None),
)
ENDPOINTS = (("/api/chat", 0.62, "native"), ("/api/generate", 0.2, "native"), ("/v1/chat/completions", 0.18, "openai"))
# (outcome, share, http status, error message)
OUTCOMES = (
    ("completed", 0.953, 200, None),
    ("upstream_error", 0.025, 500, "llama runner process has terminated: signal: killed"),
    ("client_gone", 0.01, 200, "client disconnected"),
    ("incomplete", 0.004, 200, "stream ended without a final line"),
    ("unreachable", 0.004, 502, "cannot reach the Ollama upstream"),
    ("rejected", 0.004, 503, "too many calls waiting"),
)
AGENTS = ("ollama-python/0.6.3", "ollama-js/0.5.14", "OpenAI/Python 1.82.0", "Open WebUI", "curl/8.5.0", "LangChain")
TEAMS = ("", "team-a", "team-b", "ci")  # key names by client; "" is an anonymous client
TOPICS = (
    "the quarterly report",
    "a pull request",
    "photosynthesis",
    "the French revolution",
    "a SQL query",
    "an invoice dispute",
    "kubernetes pods",
    "a cover letter",
    "the water cycle",
    "a unit test",
    "tax brackets",
    "a haiku about autumn",
    "rust lifetimes",
    "a recipe for bread",
    "zanzibar spice trade",
)
TASKS = (
    "Summarise {t} in three bullet points.",
    "Explain {t} to a ten year old.",
    "Write a short email about {t}.",
    "List five questions someone might ask about {t}.",
    "Translate a paragraph about {t} into German.",
    "Give me a step by step plan for {t}.",
    "Review {t} and point out mistakes.",
)
REPLIES = ("Sure! Here is a short summary: ", "Great question. ", "Here are the steps: 1. ", "Certainly. ", "")


def weighted(rng: random.Random, table: tuple, count: int) -> list:
    """Return ``count`` picks from ``table`` (rows whose second item is the share)."""
    return rng.choices(table, weights=[row[1] for row in table], k=count)


def make_prompt(rng: random.Random) -> str:
    """A prompt from the vocabulary; 1 in 100 is about an invoice and 1 in 10,000 about Zanzibar."""
    draw = rng.random()
    topic = TOPICS[5] if draw < 0.01 else TOPICS[-1] if draw > 0.9999 else rng.choice(TOPICS[:5] + TOPICS[6:-1])
    text = rng.choice(TASKS).format(t=topic)
    return text + f" Keep it under {rng.choice((50, 100, 200))} words." if rng.random() < 0.5 else text


def make_row(rng: random.Random, moment: datetime, model: tuple, endpoint: tuple, outcome: tuple) -> tuple:
    """One row's values in COLUMNS order."""
    name, _, speed, ttft = model
    embed = speed is None
    path, _, api = ("/api/embed", 0, "native") if embed else endpoint
    status_name, _, status, error = outcome if not embed or outcome[0] == "completed" else OUTCOMES[0]
    failed = status_name in ("upstream_error", "unreachable", "rejected")
    client = rng.randrange(40)
    input_tokens = rng.randint(8, 1800)
    output_tokens = None if embed or failed else rng.randint(5, 700)
    rate = None if output_tokens is None else max(1.0, rng.gauss(speed, speed * 0.12))
    first = None if output_tokens is None else max(5.0, rng.lognormvariate(0, 0.5) * ttft)
    work = 5.0 + input_tokens * 0.05 if embed else (first or 0) + (output_tokens or 0) / (rate or 1) * 1000
    work = 2.0 if status_name in ("unreachable", "rejected") else work
    prompt = make_prompt(rng)
    preview = None if output_tokens is None else rng.choice(REPLIES) + prompt[: rng.randint(20, 120)].lower()
    total = None if output_tokens is None else input_tokens + output_tokens
    params = json.dumps({"temperature": rng.choice((0.2, 0.7, 1.0)), "num_ctx": 4096}, separators=(",", ":"))
    return (
        moment.strftime("%Y-%m-%d %H:%M:%S.%f"),
        f"{rng.getrandbits(128):032x}",
        f"10.0.{client // 10}.{client}",
        AGENTS[client % len(AGENTS)],
        "POST",
        path,
        f"s-{client}-{rng.randrange(5)}",
        name,
        input_tokens,
        output_tokens,
        total,
        params,
        int(not embed),
        200 + len(prompt),
        rng.randint(300, 40000),
        0.0,
        round(work, 3),
        round(work + rng.random(), 3),
        status,
        error,
        round(rng.uniform(5, 90), 1),
        round(rng.uniform(30, 70), 1),
        rng.randint(0, 8),
        status_name,
        first and round(first, 3),
        rate and round(rate, 2),
        round(rng.uniform(0, 30), 3),
        round(input_tokens * 0.3, 3),
        rate and round(output_tokens / rate * 1000, 3),
        None if failed or embed else "stop",
        api,
        prompt,
        preview,
        None,  # cached_input_tokens: not generated
        None,  # remote_model
        None,  # remote_host
        None,  # cold_start
        TEAMS[client % len(TEAMS)],  # key_name
        "bench",  # instance
        "http://127.0.0.1:11435",  # upstream
    )


def moments(rng: random.Random, count: int, end: datetime, days: float) -> list[datetime]:
    """``count`` ascending arrival times in the ``days`` before ``end``, busier between 08:00 and 18:00 UTC."""
    span = days * 86400.0
    picked = []
    while len(picked) < count:
        offset = rng.random() * span
        moment = end - timedelta(seconds=offset)
        if 8 <= moment.hour < 18 or rng.random() < 0.35:
            picked.append(moment)
    return sorted(picked)


def make_rows(rng: random.Random, count: int, end: datetime, days: float):
    """Yield ``count`` rows in arrival order."""
    times = moments(rng, count, end, days)
    picks = zip(
        weighted(rng, MODELS, count), weighted(rng, ENDPOINTS, count), weighted(rng, OUTCOMES, count), strict=True
    )
    for moment, (model, endpoint, outcome) in zip(times, picks, strict=True):
        yield make_row(rng, moment, model, endpoint, outcome)


def fill(path: Path, rows: int, days: float = 7.0, seed: int = 5, end: datetime | None = None) -> float:
    """Create the store at ``path`` with ``rows`` calls; return the seconds it took."""
    started = time.perf_counter()
    db = models.open_database(f"sqlite:///{path}")
    schema.create_tables(db)
    db.execute_sql("PRAGMA synchronous=OFF")  # a generated fixture: a crash just means running it again
    names, marks = ", ".join(f'"{name}"' for name in COLUMNS), ", ".join("?" * len(COLUMNS))
    sql = f"INSERT INTO calls ({names}) VALUES ({marks})"
    generated = make_rows(random.Random(seed), rows, end or datetime.now(UTC), days)
    while chunk := [row for _, row in zip(range(CHUNK_ROWS), generated, strict=False)]:
        with db.atomic():
            db.connection().executemany(sql, chunk)
    db.close()
    return time.perf_counter() - started


def main(argv=None) -> None:
    """Command line: the path, --rows, --days, --seed, --force."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    if args.path.exists():
        if not args.force:
            parser.error(f"{args.path} exists; pass --force to replace it")
        for suffix in ("", "-wal", "-shm"):
            Path(str(args.path) + suffix).unlink(missing_ok=True)
    seconds = fill(args.path, args.rows, args.days, args.seed)
    print(f"{args.rows} rows in {seconds:.1f} s -> {args.path}")


if __name__ == "__main__":
    main()
