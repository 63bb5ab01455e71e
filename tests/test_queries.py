"""The read side against a known data set: filters, stats, search paging and the read model, with hand-computed
expectations. Each store runs as SQLite without a read model, SQLite with the rollup and text index caught up,
and PostgreSQL (answers must not depend on which path computed them)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from proxy_app.calls import TEXT_CHARS
from proxy_app.dashboard import filters, queries, readmodel, stats
from proxy_app.dashboard.filters import FilterError, parse_filters
from proxy_app.store import models, schema, writes
from tests.conftest import postgres_schema
from tests.test_csvlog import sample_call

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
XSS = "explain <img src=x onerror=alert(1)>"


# Who made each of known_calls() (key_name, "" anonymous) and through which proxy instance, r1..r7.
ATTRIBUTION = [("alice", "gpu-a"), ("bob", "gpu-b"), ("alice", "gpu-a"), ("", "gpu-b"), ("alice", "gpu-a"),
               ("", "gpu-a"), ("bob", "gpu-b")]  # fmt: skip


def known_calls(now: datetime = NOW) -> list:
    """Seven calls: six in the last 24 hours (two errors), one 30 hours old. Ids r1..r7 in this order; keys and
    instances as ATTRIBUTION says. r1, r4 and r5 report cached prompt tokens (4 of 10, 60 of 100, 7 of 7); r1, r2,
    r4 and r5 paid a model load (1500, 500, 2500, 900 ms)."""
    ago = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    rows = [
        dict(timestamp=ago(10), model="llama3.2", endpoint="/api/chat", ip_source="10.0.0.1", session_id="s-a",
             input_tokens=10, output_tokens=20, total_tokens=30, total_time_ms=100.0, ttft_ms=10.0,
             tokens_per_second=50.0, prompt="hello world", response_preview="Hi there", cached_input_tokens=4,
             cold_start=True, load_duration_ms=1500.0),
        dict(timestamp=ago(20), model="llama3.2", endpoint="/api/generate", ip_source="10.0.0.2", session_id="s-b",
             input_tokens=30, output_tokens=40, total_tokens=70, total_time_ms=300.0, ttft_ms=30.0,
             tokens_per_second=30.0, prompt="invoice for march", response_preview="Dear customer",
             cached_input_tokens=None, cold_start=True, load_duration_ms=500.0),
        dict(timestamp=ago(120), model="qwen2.5", endpoint="/api/chat", ip_source="10.0.0.1", session_id="s-a",
             input_tokens=5, output_tokens=None, total_tokens=None, total_time_ms=50.0, ttft_ms=None,
             tokens_per_second=None, http_status=500, outcome="upstream_error", error_message="boom", prompt=XSS,
             response_preview=None, cached_input_tokens=None),
        dict(timestamp=ago(180), model="qwen2.5", endpoint="/v1/chat/completions", ip_source="10.0.0.3",
             session_id="s-c", input_tokens=100, output_tokens=200, total_tokens=300, total_time_ms=2000.0,
             ttft_ms=200.0, tokens_per_second=100.0, api="openai", prompt="summarise this",
             response_preview="The INVOICE total is 5", cached_input_tokens=60, cold_start=True,
             load_duration_ms=2500.0),
        dict(timestamp=ago(30 * 60), model="llama3.2", endpoint="/api/chat", ip_source="10.0.0.4", session_id="s-d",
             input_tokens=7, output_tokens=3, total_tokens=10, total_time_ms=700.0, ttft_ms=70.0,
             tokens_per_second=10.0, outcome="client_gone", prompt="old", response_preview="o", cached_input_tokens=7,
             cold_start=True, load_duration_ms=900.0),
        dict(timestamp=ago(5), model=None, endpoint="/api/tags", ip_source="10.0.0.2", session_id="s-b",
             input_tokens=None, output_tokens=None, total_tokens=None, total_time_ms=5.0, ttft_ms=None,
             tokens_per_second=None, stream_mode=False, http_method="GET", prompt=None, response_preview=None,
             cached_input_tokens=None),
        dict(timestamp=ago(1), model="nomic-embed", endpoint="/api/embed", ip_source="10.0.0.5", session_id="s-e",
             input_tokens=None, output_tokens=None, total_tokens=None, total_time_ms=2.0, ttft_ms=None,
             tokens_per_second=None, http_status=502, outcome="unreachable", prompt="embed me",
             response_preview=None, cached_input_tokens=None),
    ]  # fmt: skip
    return [
        sample_call(request_id=f"r{number}", key_name=key, instance=instance, **row)
        for number, (row, (key, instance)) in enumerate(zip(rows, ATTRIBUTION, strict=True), start=1)
    ]


def open_sqlite(path, read_model: bool):
    db = models.open_database(f"sqlite:///{path}")
    schema.create_tables(db)
    if read_model:
        readmodel.ensure_read_model(db)
    return db


def fold(db) -> None:
    """Catch the read model up completely (what the refresher thread does in the background)."""
    if readmodel.watermarks(db):
        while readmodel.catch_up(db):
            pass


@contextlib.contextmanager
def filled_store(kind: str, calls: list, tmp_path_factory):
    """A store holding ``calls``, read as ``kind``: sqlite, sqlite+rollup (caught up) or postgresql (own schema)."""
    with contextlib.ExitStack() as stack:
        if kind == "postgresql":
            db = models.open_database(stack.enter_context(postgres_schema("test_queries")))
            schema.create_tables(db)
        else:
            db = open_sqlite(tmp_path_factory.mktemp("store") / "calls.db", read_model=kind == "sqlite+rollup")
        stack.callback(db.close)
        writes.insert_calls(db, calls)
        fold(db)
        yield db


@pytest.fixture(scope="module", params=["sqlite", "sqlite+rollup", "postgresql"])
def store(request, tmp_path_factory):
    """A store holding known_calls(), in each of the three ways the dashboard reads; tests only read it."""
    with filled_store(request.param, known_calls(), tmp_path_factory) as db:
        yield db


def ids(found: dict) -> list[str]:
    return [row["request_id"] for row in found["results"]]


def filtered(**args) -> filters.Filters:
    return parse_filters(args, now=NOW)


# ---- stats --------------------------------------------------------------------------------------------------------


def test_stats_cards_last_24h(store):
    cards = stats.stats(store, filtered(), now=NOW)["cards"]
    assert cards == {
        "calls": 6, "calls_per_minute": 0.004, "errors": 2, "error_rate": 0.3333, "input_tokens": 145,
        "output_tokens": 260, "cached_input_tokens": 64, "cache_hit_ratio": 0.5818, "total_time_ms_p50": 50.0,
        "total_time_ms_p95": 2000.0, "ttft_ms_p50": 30.0, "ttft_ms_p95": 200.0, "tokens_per_second_p50": 50.0,
        "clients": 4, "models": 3,
    }  # fmt: skip


def test_stats_per_model_table(store):
    rows = stats.stats(store, filtered(), now=NOW)["models"]
    table = [(row["model"], row["calls"], row["errors"], row["input_tokens"], row["output_tokens"]) for row in rows]
    assert table == [
        ("llama3.2", 2, 0, 40, 60),
        ("qwen2.5", 2, 1, 105, 200),
        (None, 1, 0, 0, 0),
        ("nomic-embed", 1, 1, 0, 0),
    ]
    llama, qwen = rows[0], rows[1]
    assert (llama["total_time_ms_p50"], llama["total_time_ms_p95"], llama["ttft_ms_p50"]) == (100.0, 300.0, 10.0)
    assert (llama["tokens_per_second_p50"], qwen["tokens_per_second_p50"], qwen["ttft_ms_p50"]) == (30.0, 100.0, 200.0)
    # only the calls that reported cached tokens count: r1's 4 of 10 (not of r1 and r2's 40), r4's 60 of 100
    cache = [(row["cached_input_tokens"], row["cache_hit_ratio"]) for row in rows]
    assert cache == [(4, 0.4), (60, 0.6), (None, None), (None, None)]
    cold = [(row["cold_starts"], row["load_duration_ms_p50"]) for row in rows]
    assert cold == [(2, 500.0), (1, 2500.0), (0, None), (0, None)]  # nearest rank: the lower of two


@pytest.mark.parametrize(
    "args, expected",
    [({"since": "7d"}, {"llama3.2": (3, 900.0), "qwen2.5": (1, 2500.0)}),
     ({"endpoint": "/api/chat"}, {"llama3.2": (1, 1500.0), "qwen2.5": (0, None)}),
     ({"key": "alice", "since": "7d"}, {"llama3.2": (2, 900.0), "qwen2.5": (0, None)}),
     ({"since": "15m"}, {"llama3.2": (1, 1500.0)})],
)  # fmt: skip
def test_stats_cold_starts_and_p50_load_time_per_model(store, args, expected):
    rows = stats.stats(store, filtered(**args), now=NOW)["models"]
    found = {row["model"]: (row["cold_starts"], row["load_duration_ms_p50"]) for row in rows if row["model"]}
    assert {model: found[model] for model in expected} == expected
    assert sum(row["cold_starts"] for row in rows) == sum(count for count, _ in expected.values())


def test_stats_series_one_hour_in_minutes(store):
    found = stats.stats(store, filtered(since="1h"), now=NOW)
    series = found["series"]
    assert series["bucket_seconds"] == 60 and len(series["buckets"]) == 60
    assert series["buckets"][0] == "2025-05-01T11:00:00.000Z" and series["buckets"][-1] == "2025-05-01T11:59:00.000Z"
    assert {series["buckets"][i]: series["calls"][i] for i in range(60) if series["calls"][i]} == {
        "2025-05-01T11:40:00.000Z": 1, "2025-05-01T11:50:00.000Z": 1, "2025-05-01T11:55:00.000Z": 1,
        "2025-05-01T11:59:00.000Z": 1}  # fmt: skip
    assert series["errors"][-1] == 1 and sum(series["errors"]) == 1
    tokens = {layer["model"]: sum(layer["values"]) for layer in series["tokens"]}
    assert tokens == {"llama3.2": 100, None: 0, "nomic-embed": 0}
    assert series["total_time_ms_p50"][50] == 100.0 and series["ttft_ms_p50"][40] == 30.0
    assert series["total_time_ms_p95"][0] is None
    assert found["percentiles"] == {"method": "nearest rank", "exact": True, "sample_rows": 4, "of_rows": 4}


def test_stats_series_seven_days_hourly(store):
    series = stats.stats(store, filtered(since="7d"), now=NOW)["series"]
    assert series["bucket_seconds"] == 3600 and len(series["buckets"]) == 168
    assert sum(series["calls"]) == 7 and sum(series["errors"]) == 2
    assert series["calls"][-1] == 4 and series["calls"][-2] == 1 and series["calls"][-3] == 1
    assert series["calls"][-30] == 1  # the 30-hour-old call


def test_stats_24h_uses_ten_minute_buckets(store):
    series = stats.stats(store, filtered(), now=NOW)["series"]
    assert series["bucket_seconds"] == 600 and len(series["buckets"]) == 144
    assert sum(series["calls"]) == 6 and series["calls"][-1] == 3  # 11:50 to 12:00: calls r1, r6, r7


@pytest.mark.parametrize(
    "args, expected",
    [({}, 6), ({"q": "invoice"}, 2), ({"q": "INVOICE FOR"}, 1), ({"model": "llama3.2"}, 2),
     ({"endpoint": "/api/chat"}, 2), ({"outcome": "error"}, 2), ({"outcome": "completed"}, 4), ({"status": "5xx"}, 2),
     ({"status": "200"}, 4), ({"client": "10.0.0.1"}, 2), ({"client": "s-b"}, 2), ({"since": "15m"}, 3),
     ({"since": "7d"}, 7), ({"since": "all"}, 7), ({"since": "7d", "until": "1h"}, 3),
     ({"since": "2025-05-01T09:00:00Z"}, 6), ({"since": "2025-05-01T09:00:00.001+00:00"}, 5),
     ({"since": "2025-05-01T11:00", "until": "2025-05-01T11:45"}, 1), ({"model": "no-such-model"}, 0),
     ({"model": "qwen2.5", "outcome": "error", "client": "s-a", "q": "img"}, 1), ({"key": "alice"}, 2),
     ({"key": "bob"}, 2), ({"key": "alice", "since": "7d"}, 3), ({"key": "nobody"}, 0), ({"instance": "gpu-b"}, 3),
     ({"instance": "gpu-a", "key": "alice", "model": "qwen2.5"}, 1), ({"key": "bob", "instance": "gpu-a"}, 0)],
)  # fmt: skip
def test_every_filter_narrows_stats_and_search(store, args, expected):
    filters = filtered(**args)
    assert stats.stats(store, filters, now=NOW)["cards"]["calls"] == expected
    found = queries.search(store, filters)
    assert found["count"] == len(found["results"]) == expected
    assert sum(len(rows) for rows in queries.iter_chunks(store, filters, chunk=2)) == expected


@pytest.mark.parametrize(
    "args, expected",
    [({"since": "7d"}, (71, 0.6068)), ({"model": "qwen2.5"}, (60, 0.6)), ({"endpoint": "/api/generate"}, (None, None)),
     ({"model": "nomic-embed"}, (None, None)), ({"key": "alice", "since": "7d"}, (11, 0.6471)),
     ({"model": "no-such-model"}, (None, None))],
)  # fmt: skip
def test_stats_cache_hit_ratio_counts_only_calls_that_reported_it(store, args, expected):
    cards = stats.stats(store, filtered(**args), now=NOW)["cards"]
    assert (cards["cached_input_tokens"], cards["cache_hit_ratio"]) == expected


@pytest.mark.parametrize("kind", ["sqlite", "sqlite+rollup", "postgresql"])
def test_stats_cache_hit_ratio_zero_is_a_figure_and_unreported_is_none(kind, tmp_path_factory):
    calls = [sample_call(request_id="miss", timestamp=NOW - timedelta(hours=3), input_tokens=100,
                         cached_input_tokens=0),
             sample_call(request_id="unreported", timestamp=NOW - timedelta(hours=3), input_tokens=50,
                         cached_input_tokens=None, model="qwen2.5")]  # fmt: skip
    with filled_store(kind, calls, tmp_path_factory) as db:
        found = stats.stats(db, filtered(), now=NOW)
    assert (found["cards"]["cached_input_tokens"], found["cards"]["cache_hit_ratio"]) == (0, 0.0)
    rows = {row["model"]: (row["cached_input_tokens"], row["cache_hit_ratio"]) for row in found["models"]}
    assert rows == {"llama3.2": (0, 0.0), "qwen2.5": (None, None)}


def test_stats_empty_store(tmp_path):
    db = open_sqlite(tmp_path / "empty.db", read_model=True)
    found = stats.stats(db, filtered(), now=NOW)
    assert found["empty"] is True and found["cards"]["calls"] == 0 and found["cards"]["total_time_ms_p50"] is None
    assert found["cards"]["cache_hit_ratio"] is None and found["cards"]["cached_input_tokens"] is None
    assert queries.search(db, filtered()) == {"results": [], "count": 0, "count_capped": False, "next": None}


# ---- search -------------------------------------------------------------------------------------------------------


def test_search_pages_by_time_with_keyset_cursor(store):
    pages, cursor = [], ""
    while True:
        found = queries.search(store, filtered(limit="2", cursor=cursor) if cursor else filtered(limit="2"))
        pages.append(ids(found))
        cursor = found["next"]
        if not cursor:
            break
    assert pages == [["r7", "r6"], ["r1", "r2"], ["r3", "r4"]]


@pytest.mark.parametrize(
    "sort, order, expected",
    [("latency", "desc", ["r4", "r2", "r1", "r3", "r6", "r7"]),
     ("latency", "asc", ["r7", "r6", "r3", "r1", "r2", "r4"]),
     ("tokens", "desc", ["r4", "r2", "r1", "r7", "r6", "r3"]),
     ("time", "asc", ["r4", "r3", "r2", "r1", "r6", "r7"])],
)  # fmt: skip
def test_search_sorts_and_pages_each_order(store, sort, order, expected):
    first = queries.search(store, filtered(sort=sort, order=order, limit="4"))
    second = queries.search(store, filtered(sort=sort, order=order, limit="4", cursor=first["next"]))
    assert ids(first) + ids(second) == expected and second["next"] is None


def test_search_row_has_the_list_columns_and_one_call_every_column(store):
    row = queries.search(store, filtered(q="img"))["results"][0]
    assert list(row) == list(queries.LIST_COLUMNS)
    assert row["prompt"] == XSS and row["timestamp"] == "2025-05-01T10:00:00.000Z"
    assert (row["output_tokens"], row["http_status"], row["outcome"]) == (None, 500, "upstream_error")
    whole = queries.get_call(store, row["request_id"])
    assert list(whole) == list(queries.COLUMNS) and {**whole, **row} == whole
    assert (whole["error_message"], whole["stream_mode"]) == ("boom", True)


def test_search_lists_the_start_of_a_long_prompt(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=False)
    whole = TEXT_CHARS["prompt"]  # the longest prompt a Call keeps
    writes.insert_calls(db, [sample_call(request_id="long", timestamp=NOW, prompt="é" * whole)])
    (row,) = queries.search(db, filtered(since="all"))["results"]
    assert row["prompt"] == "é" * queries.LIST_TEXT_CHARS < "é" * whole  # characters, not bytes
    assert queries.get_call(db, "long")["prompt"] == "é" * whole


def test_search_text_is_just_text(store):
    for text in ("%", "_", "' OR 1=1 --", '"', "\\", "x\x00y", "ünï ✓"):
        assert queries.search(store, filtered(q=text))["count"] == 0, text


# Every character that SQL text, a LIKE pattern, a placeholder rewrite or an FTS5 phrase could take as syntax.
ODD = "a?b%c'd\\e_f\"g"
NEAR = ODD.replace("%", "X").replace("_", "X")  # what ODD would also match if % or _ were wildcards


def literal_calls() -> list:
    """Three calls: o1 holds ODD in each text field, o2 holds NEAR, o3 neither. Newest first: o1, o2, o3."""
    rows = [("o1" + ODD, ODD), ("o2", NEAR), ("o3", "plain")]
    return [
        sample_call(request_id=request_id, timestamp=NOW - timedelta(minutes=minutes), model=text,
                    endpoint=f"/api/{text}", session_id=text, ip_source=f"10.1.0.{minutes}", prompt=f"say {text} twice")
        for minutes, (request_id, text) in enumerate(rows, start=1)
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "sqlite+rollup", "postgresql"])
def literal_store(request, tmp_path_factory):
    """A store holding literal_calls(), in each of the three ways the dashboard reads."""
    with filled_store(request.param, literal_calls(), tmp_path_factory) as db:
        yield db


@pytest.mark.parametrize(
    "args, expected",
    [({"model": ODD}, ["o1"]), ({"endpoint": f"/api/{ODD}"}, ["o1"]), ({"client": ODD}, ["o1"]),
     ({"q": ODD}, ["o1"]), ({"q": "%"}, ["o1"]), ({"q": "_"}, ["o1"]), ({"q": "b%c"}, ["o1"]), ({"q": "e_f"}, ["o1"]),
     ({"q": "?"}, ["o1", "o2"]), ({"q": "'"}, ["o1", "o2"]), ({"q": "\\"}, ["o1", "o2"]), ({"q": '"g t'}, ["o1", "o2"]),
     ({"model": NEAR}, ["o2"]), ({"model": ODD, "endpoint": f"/api/{ODD}", "client": ODD, "q": ODD}, ["o1"]),
     ({"model": ODD[:-1]}, [])],
)  # fmt: skip
def test_filter_and_search_text_match_literally(literal_store, args, expected):
    filters = filtered(since="1h", **args)
    found = queries.search(literal_store, filters)
    assert [row_id[:2] for row_id in ids(found)] == expected and found["count"] == len(expected)
    assert stats.stats(literal_store, filters, now=NOW)["cards"]["calls"] == len(expected)
    assert sum(len(rows) for rows in queries.iter_chunks(literal_store, filters, chunk=1)) == len(expected)


def test_odd_text_reads_back_unchanged(literal_store):
    row = queries.get_call(literal_store, "o1" + ODD)
    assert (row["model"], row["endpoint"], row["session_id"]) == (ODD, f"/api/{ODD}", ODD)
    assert stats.choices(literal_store, filtered())["models"] == sorted([ODD, NEAR, "plain"])
    assert [row["model"] for row in stats.stats(literal_store, filtered(), now=NOW)["models"]] == [ODD, NEAR, "plain"]


def test_get_call_by_request_id(store):
    assert queries.get_call(store, "r4")["response_preview"] == "The INVOICE total is 5"
    assert queries.get_call(store, "nope") is None


# ---- parameters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [({"since": "yesterday"}, "since='yesterday' is neither ISO 8601"), ({"until": "2025-13-01"}, "until="),
     ({"since": "1h", "until": "2h"}, "must be before until"), ({"limit": "0"}, "limit='0' must be a whole number"),
     ({"limit": "-5"}, "limit='-5'"), ({"limit": "ten"}, "limit='ten'"), ({"outcome": "oops"}, "outcome='oops'"),
     ({"status": "99"}, "status='99'"), ({"status": "6xx"}, "status='6xx'"), ({"sort": "prompt"}, "sort='prompt'"),
     ({"order": "sideways"}, "order="), ({"cursor": "garbage!"}, "cursor is not"), ({"since": "99999d"}, "more than"),
     ({"model": "m" * 300}, "model is longer than 255"), ({"key": "k" * 300}, "key is longer than 255"),
     ({"since": "9999-12-31T23:59:59-05:00"}, "neither ISO")],
)  # fmt: skip
def test_parse_filters_rejects_bad_values_clearly(args, message):
    with pytest.raises(FilterError, match=None) as caught:
        parse_filters(args, now=NOW)
    assert message in str(caught.value)


def test_parse_filters_relative_iso_and_defaults():
    assert filtered().since == NOW - timedelta(hours=24) and filtered().until is None
    assert filtered(since="15m").since == NOW - timedelta(minutes=15)
    assert filtered(since="2w").since == NOW - timedelta(days=14)
    assert filtered(since="90s").since == NOW - timedelta(seconds=90)
    assert filtered(since="all").since is None
    assert filtered(since="2025-04-30T10:00:00+02:00").since == datetime(2025, 4, 30, 8, tzinfo=UTC)
    assert filtered(since="2025-04-30 10:00").since == datetime(2025, 4, 30, 10, tzinfo=UTC)
    assert filtered(limit="100000").limit == filters.MAX_LIMIT and filtered(status="5XX").status == "5xx"


def test_cursor_must_match_its_sort(store):
    cursor = queries.search(store, filtered(limit="1"))["next"]
    with pytest.raises(FilterError, match="same sort"):
        filtered(cursor=cursor, sort="latency")


def test_cursor_from_a_postgresql_row_names_a_utc_moment():
    token = filters.encode_cursor(filtered(), datetime(2025, 5, 1, 11, 50), 7)  # PostgreSQL gives naive UTC
    assert filters.decode_cursor(token, filtered()) == [datetime(2025, 5, 1, 11, 50, tzinfo=UTC), 7]


def test_filters_params_round_trip():
    filters = filtered(q="x", model="m", key="k", instance="i", since="7d", sort="latency", limit="20")
    assert filters.params() == {"q": "x", "model": "m", "key": "k", "instance": "i", "since": "7d",
                                "sort": "latency", "limit": 20}  # fmt: skip
    assert filtered(**{name: str(value) for name, value in filters.params().items()}) == filters
    assert filters.params(model="", key="", instance="", since="24h") == {"q": "x", "sort": "latency", "limit": 20}


# ---- the read model ----------------------------------------------------------------------------------------------


def test_read_model_counts_rows_above_its_watermark_and_after_retention(tmp_path):
    raw = open_sqlite(tmp_path / "raw.db", read_model=False)
    folded = open_sqlite(tmp_path / "folded.db", read_model=True)
    calls = known_calls()
    for db in (raw, folded):
        writes.insert_calls(db, calls[:4])
    fold(folded)
    for db in (raw, folded):  # after the fold: new rows, then the retention deletes the oldest
        writes.insert_calls(db, calls[4:])
        writes.delete_older_than(db, NOW - timedelta(minutes=150), 100)
    for args in ({"since": "all"}, {}, {"since": "7d", "model": "qwen2.5"}):
        expected = stats.stats(raw, filtered(**args), now=NOW)
        assert stats.stats(folded, filtered(**args), now=NOW) == expected
        fold(folded)
        assert stats.stats(folded, filtered(**args), now=NOW) == expected
    assert stats.stats(folded, filtered(since="all"), now=NOW)["cards"]["calls"] == 5


def test_read_model_rebuilds_when_ids_are_reused(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=True)
    writes.insert_calls(db, known_calls())
    fold(db)
    db.execute_sql("DELETE FROM calls")  # SQLite restarts ids at 1 once the table is empty
    writes.insert_calls(db, [replace(call, request_id=f"new{n}") for n, call in enumerate(known_calls()[:3])])
    fold(db)
    assert stats.stats(db, filtered(), now=NOW)["cards"]["calls"] == 3
    assert db.execute_sql("SELECT sum(calls) FROM calls_rollup").fetchone()[0] == 3
    assert queries.search(db, filtered(q="invoice"))["count"] == 1


def test_read_model_rebuilds_a_rollup_of_an_older_layout(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=False)
    writes.insert_calls(db, known_calls())
    old_layout = """CREATE TABLE calls_rollup (slot TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL,
       outcome TEXT NOT NULL, http_status INTEGER NOT NULL, calls INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
       output_tokens INTEGER NOT NULL, PRIMARY KEY (slot, model, endpoint, outcome, http_status)) WITHOUT ROWID"""
    for statement in (readmodel.SCHEMA[0], old_layout, readmodel.SCHEMA[2], readmodel.SCHEMA[3]):
        db.execute_sql(statement)
    old_fold = """INSERT INTO calls_rollup SELECT substr("timestamp", 1, 15), coalesce("model", ''), "endpoint",
        "outcome", "http_status", count(*), coalesce(sum("input_tokens"), 0), coalesce(sum("output_tokens"), 0)
        FROM calls GROUP BY 1, 2, 3, 4, 5"""
    db.execute_sql(old_fold)  # what an older proxy folded, up to its watermark
    db.execute_sql("INSERT INTO calls_rollup_clients SELECT '2025-05-01 11', 'x', 'y', 99")
    db.execute_sql("UPDATE dashboard_state SET upto = 7, upto_request_id = 'r7' WHERE name = 'rollup'")
    assert readmodel.ensure_read_model(db) and readmodel.watermarks(db)["rollup"] == 0
    columns = tuple(row[1] for row in db.execute_sql("PRAGMA table_info(calls_rollup)").fetchall())
    assert columns == readmodel.ROLLUP_COLUMNS
    expected = {"calls": 7, "input_tokens": 152, "cached_input_tokens": 71, "cache_hit_ratio": 0.6068, "clients": 5}
    for _ in range(2):  # exact before the refold (rows above the watermark) and after it
        cards = stats.stats(db, filtered(since="all"), now=NOW)["cards"]
        assert {name: cards[name] for name in expected} == expected
        fold(db)
    sums = "SELECT sum(cache_calls), sum(cached_input_tokens), sum(cold_starts) FROM calls_rollup"
    assert db.execute_sql(sums).fetchone() == (3, 71, 4)
    index = "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?"
    assert db.execute_sql(index, (readmodel.COLD_INDEX,)).fetchone() == (1,)
    assert readmodel.ensure_read_model(db) and readmodel.watermarks(db)["rollup"] == 7  # current: left as is


def test_text_search_uses_index_and_scans_only_new_rows(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=True)
    writes.insert_calls(db, known_calls()[:2])
    fold(db)
    writes.insert_calls(db, known_calls()[2:])  # above the watermark: found by the scan of new rows
    clause, params = readmodel.text_condition(db, "invoice")
    assert "calls_fts MATCH" in clause and params[1] == 2
    assert ids(queries.search(db, filtered(q="invoice"))) == ["r2", "r4"]
    assert "MATCH" not in readmodel.text_condition(db, "in")[0]  # shorter than a trigram: a scan


def test_read_model_drops_what_retention_deleted(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=True)
    writes.insert_calls(db, sorted(known_calls(), key=lambda call: call.timestamp))  # ids follow time, as stored
    fold(db)
    assert writes.delete_older_than(db, NOW - timedelta(minutes=150), 100) == 2  # the 30 h and 3 h old calls
    fold(db)
    assert db.execute_sql("SELECT min(rowid), count(*) FROM calls_fts").fetchone() == (3, 4)  # r6 has no text
    assert db.execute_sql("SELECT min(slot) FROM calls_rollup").fetchone()[0] == "2025-05-01 10:0"
    assert stats.stats(db, filtered(since="all"), now=NOW)["cards"]["calls"] == 5


@pytest.mark.parametrize("kind", ["sqlite+rollup", "postgresql"])
def test_percentiles_from_a_spread_sample_when_many_rows_match(kind, tmp_path_factory, monkeypatch):
    calls = [replace(sample_call(), request_id=f"s{n}", timestamp=NOW - timedelta(seconds=400 - n),
                     total_time_ms=float(n + 1), ttft_ms=None) for n in range(400)]  # fmt: skip
    monkeypatch.setattr(stats, "SAMPLE_ROWS", 100)
    monkeypatch.setattr(stats, "BLOCK_ROWS", 4)
    with filled_store(kind, calls, tmp_path_factory) as db:
        found = stats.stats(db, filtered(since="1h"), now=NOW)
    method, cards = found["percentiles"], found["cards"]
    assert method["exact"] is False and method["of_rows"] == 400 and 90 <= method["sample_rows"] <= 110
    assert 180 <= cards["total_time_ms_p50"] <= 220 and 360 <= cards["total_time_ms_p95"] <= 400
    assert cards["calls"] == 400 and cards["ttft_ms_p50"] is None


def test_choices_list_models_and_endpoints_in_range(store):
    assert stats.choices(store, filtered()) == {
        "models": ["llama3.2", "nomic-embed", "qwen2.5"],
        "endpoints": ["/api/chat", "/api/embed", "/api/generate", "/api/tags", "/v1/chat/completions"],
        "keys": ["alice", "bob"],  # every key and instance in the store, not only in the range; anonymous is none
        "instances": ["gpu-a", "gpu-b"],
    }


@pytest.mark.parametrize("args", [{"key": "alice"}, {"instance": "gpu-b"}, {"key": "bob", "instance": "gpu-b"}])
def test_key_and_instance_filters_return_only_their_rows(store, args):
    filters = filtered(since="7d", **args)
    wanted = {
        f"r{number}": (key, instance)
        for number, (key, instance) in enumerate(ATTRIBUTION, start=1)
        if args.get("key", key) == key and args.get("instance", instance) == instance
    }
    assert sorted(ids(queries.search(store, filters))) == sorted(wanted)
    exported = [queries.row_dict(row[1:]) for rows in queries.iter_chunks(store, filters) for row in rows]
    assert {row["request_id"]: (row["key_name"], row["instance"]) for row in exported} == wanted
    assert stats.stats(store, filters, now=NOW)["cards"]["calls"] == len(wanted)


# ---- many models -------------------------------------------------------------------------------------------------


def flood_of_models(now: datetime, junk: int) -> list:
    """Thirty models, model-00 with 30 calls down to model-29 with 1 (each call 10 tokens in and 5 out, a latency
    of its model's number), one call without a model, then ``junk`` names with one failed call each (names Ollama
    answers 404)."""
    calls = [sample_call(request_id=f"m{number}-{n}", model=f"model-{number:02d}",
                         timestamp=now - timedelta(seconds=n + 1),
                         input_tokens=10, output_tokens=5, total_time_ms=float(number))
             for number in range(30) for n in range(30 - number)]  # fmt: skip
    calls.append(
        sample_call(
            request_id="none", model=None, timestamp=now - timedelta(seconds=1), input_tokens=None, output_tokens=None
        )
    )
    failed = dict(http_status=404, outcome="upstream_error", input_tokens=None, output_tokens=None, total_time_ms=1.0)
    calls += [sample_call(request_id=f"j{n}", model=f"junk-{n:05d}", timestamp=now - timedelta(seconds=n % 600 + 1),
                          **failed) for n in range(junk)]  # fmt: skip
    return calls


@pytest.mark.parametrize("kind", ["sqlite", "sqlite+rollup", "postgresql"])
def test_stats_many_models_fold_past_the_busiest_into_other(kind, tmp_path_factory):
    with filled_store(kind, flood_of_models(NOW, junk=500), tmp_path_factory) as db:
        found = stats.stats(db, filtered(since="2h"), now=NOW)
    rows, layers = found["models"], found["series"]["tokens"]
    assert [row["model"] for row in rows] == [f"model-{number:02d}" for number in range(20)] + ["other"]
    assert [row["folded"] for row in rows] == [0] * 20 + [10 + 1 + 500]  # model-20..29, the call without, the junk
    assert [row["calls"] for row in rows] == list(range(30, 10, -1)) + [55 + 1 + 500]
    other = rows[-1]
    assert (other["errors"], other["input_tokens"], other["output_tokens"]) == (500, 550, 275)
    assert (other["total_time_ms_p50"], rows[0]["total_time_ms_p50"]) == (1.0, 0.0)  # over the folded calls only
    assert sum(row["calls"] for row in rows) == found["cards"]["calls"] == 465 + 1 + 500
    assert found["cards"]["models"] == 30 + 500  # distinct names, the folded ones too
    assert [(layer["model"], layer["folded"]) for layer in layers] == [(row["model"], row["folded"]) for row in rows]
    assert [sum(layer["values"]) for layer in layers] == [row["input_tokens"] + row["output_tokens"] for row in rows]
