"""Pure: the stats document (cards, per-model rows, time series) from counted groups and sample rows.

Time buckets are named by the leading characters of a stored timestamp ("2025-05-01 12:3" is 12:30 to 12:40 UTC).
Percentiles are nearest rank: the smallest value with at least p % of the values at or below it. The per-model
table and token series name the TOP_MODELS busiest models and fold the rest into one "other" row (as the metrics'
model label does), so a flood of invented model names cannot grow the page. The cache-hit ratio counts only the calls
that reported cached prompt tokens and is None when none did. No SQL, no I/O (stats.py does the reading).
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from proxy_app.calls import format_timestamp

# (longest range, bucket seconds, leading characters of a stored timestamp that name the bucket): 15 to 250 buckets
BUCKETS = ((3 * 3600, 60, 16), (36 * 3600, 600, 15), (10 * 86400, 3600, 13), (math.inf, 86400, 10))
SERIES_PERCENTILES = ("total_time_ms_p50", "total_time_ms_p95", "ttft_ms_p50", "ttft_ms_p95")
TOP_MODELS = 20  # models named in the per-model table and token series, busiest first
OTHER_NAME = "other"  # the row that sums the rest; its "folded" count tells it from a model of that name
# What a group sums after its bucket key and model; cache_* over the calls that reported cached prompt tokens only.
COUNTS = ("calls", "errors", "input_tokens", "output_tokens", "cache_calls", "cached_input_tokens",
          "cache_input_tokens", "cold_starts")  # fmt: skip


class _Other:
    """The key of the folded row (a key no model name can equal)."""


OTHER = _Other()


def bucket_width(since: datetime, end: datetime) -> tuple[int, int]:
    """Return (seconds, key characters) of the time-series buckets for a range."""
    span = (end - since).total_seconds()
    return next((seconds, chars) for longest, seconds, chars in BUCKETS if span <= longest)


def floor_time(moment: datetime, seconds: int) -> datetime:
    """Return the start of the ``seconds``-long bucket (aligned to UTC midnight) holding ``moment``."""
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    into = (moment - midnight).total_seconds()
    return midnight + timedelta(seconds=int(into // seconds) * seconds)


def ceil_time(moment: datetime, seconds: int) -> datetime:
    """Return the start of the first bucket at or after ``moment``."""
    start = floor_time(moment, seconds)
    return start if start == moment else start + timedelta(seconds=seconds)


def time_key(moment: datetime, chars: int) -> str:
    """Return a moment's bucket key: the leading characters of its stored form (naive UTC ISO text)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")[:chars]


def key_time(key: str) -> datetime:
    """Return the start of the bucket a key names."""
    return datetime.fromisoformat(key + "2000-01-01 00:00:00"[len(key) :]).replace(tzinfo=UTC)


def bucket_keys(since: datetime, end: datetime, seconds: int, chars: int) -> list[str]:
    """Return every bucket key from ``since`` to ``end``, empty buckets included."""
    keys, moment = [], floor_time(since, seconds)
    while moment < end:
        keys.append(time_key(moment, chars))
        moment += timedelta(seconds=seconds)
    return keys or [time_key(floor_time(since, seconds), chars)]


# ---- percentiles -------------------------------------------------------------------------------------------------


def percentile(values: list[float], rank: float) -> float | None:
    """Nearest-rank percentile (``rank`` in 0..100) of values already sorted; None when there are none."""
    if not values:
        return None
    return values[max(0, math.ceil(rank / 100 * len(values)) - 1)]


def percentiles_of(latency: list, ttft: list, rate: list) -> dict:
    """Return p50/p95 latency, p50/p95 TTFT and p50 tokens/s from sorted values (None where there are none)."""
    found = {
        "total_time_ms_p50": percentile(latency, 50),
        "total_time_ms_p95": percentile(latency, 95),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p95": percentile(ttft, 95),
        "tokens_per_second_p50": percentile(rate, 50),
    }
    return {name: None if value is None else round(value, 3) for name, value in found.items()}


NO_FIGURES = percentiles_of([], [], [])


def summaries(rows: list[tuple], group) -> dict:
    """Return {group(row): percentiles_of(...)} for sample rows (timestamp, model, latency, TTFT, tokens/s)."""
    lists = defaultdict(lambda: ([], [], []))
    for row in rows:
        latency, ttft, rate = lists[group(row)]
        latency.append(row[2])  # total_time_ms is never unknown
        if row[3] is not None:
            ttft.append(row[3])
        if row[4] is not None:
            rate.append(row[4])
    for values in lists.values():
        for metric in values:
            metric.sort()
    return {key: percentiles_of(*values) for key, values in lists.items()}


# ---- the document ------------------------------------------------------------------------------------------------


def assemble(
    filters, since: datetime, now: datetime, groups: list, clients: int, sample: list, exact: bool, cold: list = ()
) -> dict:
    """Return the stats document for the groups (bucket key, model, then COUNTS), the sample rows and the cold starts'
    (model, load time in ms) of a range starting at ``since``."""
    end = filters.until or now
    seconds, chars = bucket_width(since, end)
    rows = ModelRows(groups)
    per_model, per_bucket, tokens = _totals(groups, chars, rows.key)
    overall = [sum(column) for column in zip(*per_model.values(), strict=True)] or [0] * len(COUNTS)
    minutes = max(end - since, timedelta(minutes=1)).total_seconds() / 60
    models = _models(rows, per_model, summaries(sample, lambda row: rows.key(row[1])), _load_times(cold, rows.key))
    keys = bucket_keys(since, end, seconds, chars)
    layers = [tokens[key] for key in rows.keys]
    series = _series(keys, per_bucket, layers, models, summaries(sample, lambda row: str(row[0])[:chars]))
    calls = sum(row["calls"] for row in models)
    return {
        "empty": False,
        "filters": filters.describe(),
        "range": {"since": format_timestamp(since), "until": filters.until and format_timestamp(filters.until),
                  "now": format_timestamp(now), "minutes": round(minutes, 3)},
        "cards": _cards(models, minutes, clients, rows.named, cache_figures(*overall[4:7]),
                        summaries(sample, lambda row: None).get(None, NO_FIGURES)),
        "models": models,
        "series": {"bucket_seconds": seconds, **series},
        "percentiles": {"method": "nearest rank", "exact": exact, "sample_rows": len(sample), "of_rows": calls},
    }  # fmt: skip


class ModelRows:
    """Which row of the per-model table each model's calls go to: the TOP_MODELS busiest models (ties by name, the
    calls without a model first) have a row each, in that order, and the rest share the last one, OTHER."""

    def __init__(self, groups: list) -> None:
        calls = defaultdict(int)
        for _, model, count, *_ in groups:
            calls[model or None] += count
        ranked = sorted((model for model, count in calls.items() if count), key=lambda m: (-calls[m], m or ""))
        self._busiest = set(ranked[:TOP_MODELS])
        self.keys = ranked[:TOP_MODELS] + ([OTHER] if len(ranked) > TOP_MODELS else [])
        self.folded = len(ranked) - len(self._busiest)  # models in the OTHER row
        self.named = sum(1 for model in ranked if model)  # distinct model names, folded ones too

    def key(self, model: str | None):
        """Return the row key of a stored model name ("" or None for none): the name, None, or OTHER."""
        model = model or None
        return model if model in self._busiest else OTHER


def _totals(groups: list, chars: int, key) -> tuple[dict, dict, dict]:
    """Sum the groups' COUNTS per row ``key(model)``, calls and errors per bucket, and tokens per (row, bucket)."""
    per_model, per_bucket = defaultdict(lambda: [0] * len(COUNTS)), defaultdict(lambda: [0, 0])
    tokens = defaultdict(lambda: defaultdict(int))
    for bucket, model, *counts in groups:
        calls, errors, input_tokens, output_tokens = counts[:4]
        row = key(model)
        totals = per_model[row]
        for index, value in enumerate(counts):
            totals[index] += value
        per_bucket[bucket[:chars]][0] += calls
        per_bucket[bucket[:chars]][1] += errors
        tokens[row][bucket[:chars]] += input_tokens + output_tokens
    return per_model, per_bucket, tokens


def _models(rows: ModelRows, per_model: dict, figures: dict, load_times: dict) -> list[dict]:
    """The per-model table; ``folded`` is how many models a row sums (0 for a model's own row)."""
    return [
        {"model": OTHER_NAME if key is OTHER else key, "folded": rows.folded if key is OTHER else 0,
         **dict(zip(COUNTS[:4], per_model[key], strict=False)), **cache_figures(*per_model[key][4:7]),
         "cold_starts": per_model[key][7], "load_duration_ms_p50": load_times.get(key),
         **figures.get(key, NO_FIGURES)}
        for key in rows.keys
    ]  # fmt: skip


def _load_times(cold: list, key) -> dict:
    """Return {row key: p50 load time in ms} of the cold starts (model, load time) whose load time is known."""
    found = defaultdict(list)
    for model, load_ms in cold:
        if load_ms is not None:
            found[key(model)].append(load_ms)
    return {row: round(percentile(sorted(values), 50), 3) for row, values in found.items()}


def cache_figures(calls: int, cached_tokens: int, input_tokens: int) -> dict:
    """Return the cached prompt tokens and the cache-hit ratio (cached / input tokens) of the ``calls`` that reported
    a cached count: None when none did, since a missing count is unknown, not a miss."""
    return {
        "cached_input_tokens": cached_tokens if calls else None,
        "cache_hit_ratio": round(cached_tokens / input_tokens, 4) if calls and input_tokens else None,
    }


def _cards(models: list[dict], minutes: float, clients: int, named: int, cache: dict, figures: dict) -> dict:
    calls, errors = sum(row["calls"] for row in models), sum(row["errors"] for row in models)
    return {
        "calls": calls,
        "calls_per_minute": round(calls / minutes, 3),
        "errors": errors,
        "error_rate": round(errors / calls, 4) if calls else None,
        "input_tokens": sum(row["input_tokens"] for row in models),
        "output_tokens": sum(row["output_tokens"] for row in models),
        **cache,
        **figures,
        "clients": clients,
        "models": named,
    }


def _series(keys: list[str], per_bucket: dict, layers: list[dict], models: list[dict], figures: dict) -> dict:
    series = {
        "buckets": [format_timestamp(key_time(key)) for key in keys],
        "calls": [per_bucket[key][0] for key in keys],
        "errors": [per_bucket[key][1] for key in keys],
        "tokens": [{"model": row["model"], "folded": row["folded"], "values": [layer[key] for key in keys]}
                   for row, layer in zip(models, layers, strict=True)],
    }  # fmt: skip
    for name in SERIES_PERCENTILES:
        series[name] = [figures.get(key, NO_FIGURES)[name] for key in keys]
    return series


def empty_document(filters, now: datetime) -> dict:
    """The stats document of an empty store: zero counts, unknown percentiles, no buckets."""
    document = assemble(filters, filters.since or now, now, [], 0, [], True)
    series = {name: [] for name in ("buckets", "calls", "errors", "tokens", *SERIES_PERCENTILES)}
    return {**document, "empty": True, "series": {"bucket_seconds": None, **series}}
