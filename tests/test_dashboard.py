"""The /analytics blueprint through the Flask test client: HTML with data and empty, JSON shapes, the CSV export as
whole text, 400s with reasons, hostile text escaped, security headers, the admin token and path tricks."""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pytest

from proxy_app import create_app, shutdown
from proxy_app.calls import COLUMNS
from proxy_app.dashboard import charts, queries, timeline
from proxy_app.dashboard.filters import parse_filters
from proxy_app.state import state_of
from proxy_app.store import csvlog, export, models, writes
from tests.fake_ollama import FakeOllama, serve
from tests.test_csvlog import NOW as CSV_NOW
from tests.test_csvlog import sample_call
from tests.test_queries import XSS, flood_of_models, known_calls, open_sqlite

ESCAPED_XSS = "explain &lt;img src=x onerror=alert(1)&gt;"


def store_of(app):
    return state_of(app).dashboard["db"]


def started_app(data_dir, **settings):
    """An app (against a fake Ollama of its own) holding known_calls(), relative to the real clock."""
    upstream = serve(FakeOllama())
    application = create_app({"UPSTREAM": upstream.url, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING",
                              **settings}, environ={})  # fmt: skip
    writes.insert_calls(store_of(application), known_calls(datetime.now(UTC)))
    return application, upstream


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """One app with data for the tests that only read (each test gets its own client)."""
    application, upstream = started_app(tmp_path_factory.mktemp("filled"))
    yield application
    shutdown(application)
    upstream.close()


@pytest.fixture
def filled_client(filled):
    return filled.test_client()


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    """An app with ADMIN_TOKEN set."""
    application, upstream = started_app(tmp_path_factory.mktemp("locked"), ADMIN_TOKEN="s3cret-token")
    yield application
    shutdown(application)
    upstream.close()


# ---- HTML --------------------------------------------------------------------------------------------------------


def test_dashboard_page_with_data(filled_client):
    answer = filled_client.get("/analytics")
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    assert re.search(r'data-card="calls"><div class="label">Calls</div><div class="value ">6</div>', html)
    assert re.search(r'data-card="error_rate">.*?33.33 %', html) and 'data-card="clients"' in html
    for chart in ("chart-calls", "chart-tokens", "chart-latency", "chart-speed"):
        assert f'id="{chart}"' in html
    assert html.count("<svg") == 5 and "<rect" in html and "<path" in html  # the four charts and the timeline
    assert ">llama3.2</a>" in html and html.count('class="detail"') == 6
    assert ESCAPED_XSS in html and "<img" not in html


MODEL_COLUMNS = ["Model", "Calls", "Errors", "Input tokens", "Output tokens", "Cache hits", "Latency p50",
                 "Latency p95", "TTFT p50", "Tokens/s p50", "Cold starts", "Load p50"]  # fmt: skip


def model_table(html: str) -> tuple[list[str], dict[str, list[str]]]:
    """The per-model table's headers, and each row's cells after the model by the model's shown name."""
    table = html[html.index('id="models-table"') : html.index("</table>", html.index('id="models-table"'))]
    headers = [unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
        cells = [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        rows[cells[0]] = cells[1:]
    return headers, rows


def test_dashboard_page_cache_hits_and_cold_starts_per_model(filled_client):
    html = filled_client.get("/analytics").get_data(as_text=True)
    card = r'data-card="cache_hit_ratio"><div class="label">Cache hits</div><div class="value ">58.18 %</div>'
    assert re.search(card, html)
    headers, rows = model_table(html)
    assert headers == MODEL_COLUMNS
    assert rows["llama3.2"] == ["2", "0", "40", "60", "40.00 %", "100 ms", "300 ms", "10 ms", "30.0", "2", "500 ms"]
    assert rows["qwen2.5"][4] == "60.00 %" and rows["qwen2.5"][-2:] == ["1", "2.5 s"]
    assert rows["(none)"][4] == "n/a" and rows["(none)"][-2:] == ["0", "–"]  # no call reported cached tokens
    unreported = filled_client.get("/analytics?model=nomic-embed").get_data(as_text=True)
    assert re.search(r'data-card="cache_hit_ratio">.*?<div class="value ">n/a</div>', unreported)


def test_dashboard_stats_json_has_cache_and_cold_start_figures(filled_client):
    figures = filled_client.get("/analytics/stats?since=7d").get_json()
    assert (figures["cards"]["cached_input_tokens"], figures["cards"]["cache_hit_ratio"]) == (71, 0.6068)
    llama = next(row for row in figures["models"] if row["model"] == "llama3.2")
    expected = {"cached_input_tokens": 11, "cache_hit_ratio": 0.6471, "cold_starts": 3, "load_duration_ms_p50": 900.0}
    assert {name: llama[name] for name in expected} == expected
    unreported = filled_client.get("/analytics/stats?model=nomic-embed").get_json()["cards"]
    assert unreported["cached_input_tokens"] is None and unreported["cache_hit_ratio"] is None


HOSTILE_MODEL = '<script>alert("m")</script>'


def test_dashboard_timeline_draws_a_lane_per_model_and_escapes_names(app, client):
    now = datetime.now(UTC)
    ago = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    models.ModelEventStore(store_of(app)).record([
        {"timestamp": ago(30 * 60), "event": "load", "model": "qwen3"},  # before the range: loaded at its start
        {"timestamp": ago(180), "event": "load", "model": "llama3.2", "size_bytes": 2019393189, "context_length": 4096},
        {"timestamp": ago(120), "event": "unload", "model": "llama3.2"},
        {"timestamp": ago(60), "event": "load", "model": HOSTILE_MODEL},  # still loaded: up to the range's end
        {"timestamp": ago(30), "event": "unload", "model": "qwen3"},
        {"timestamp": ago(26 * 60), "event": "load", "model": "phi4"},  # before the range and still loaded
    ])  # fmt: skip
    writes.insert_calls(store_of(app), [sample_call(timestamp=ago(5))])  # the panel shows once there are calls
    html = client.get("/analytics").get_data(as_text=True)
    chart = html[html.index('id="chart-residency"') : html.index("</figure>", html.index('id="chart-residency"'))]
    lanes = re.findall(r'<text x="\d+" y="\d+" text-anchor="end"><title>([^<]*)</title>', chart)
    assert [unescape(name) for name in lanes] == [HOSTILE_MODEL, "llama3.2", "phi4", "qwen3"]  # by name
    assert "<script" not in chart and "&lt;script&gt;" in chart
    assert chart.count("<circle") == 4  # the four events in the range; phi4 only spans it
    spans = re.findall(r'<rect class="(c\d)" x="([\d.]+)" y="\d+" width="([\d.]+)"', chart)
    assert len(spans) == 4
    by_lane = {css: (float(x), float(width)) for css, x, width in spans}
    left, right = timeline.LANE_LABEL_WIDTH, timeline.TIMELINE_WIDTH - charts.RIGHT
    assert by_lane["c2"] == (left, right - left) and by_lane["c3"][0] == left  # phi4: whole range; qwen3 from its start
    assert by_lane["c0"][0] + by_lane["c0"][1] == right  # the hostile name's model: still loaded at the end
    assert "llama3.2 loaded " in chart and "size 2.02GB" in chart and "context 4,096" in chart


def test_dashboard_timeline_draws_a_bounded_number_of_lanes_and_events(app, client):
    """Sixteen models: the twelve most recently active get a lane; of their events the newest 400 are drawn."""
    now = datetime.now(UTC)
    quiet = [{"timestamp": now - timedelta(minutes=100 + n), "event": "load", "model": f"m{n:02d}"} for n in range(15)]
    busy = [{"timestamp": now - timedelta(seconds=500 - n), "event": ("load", "unload")[n % 2], "model": "busy"}
            for n in range(440)]  # fmt: skip
    models.ModelEventStore(store_of(app)).record(quiet + busy)
    writes.insert_calls(store_of(app), [sample_call(timestamp=now - timedelta(minutes=5))])
    html = client.get("/analytics").get_data(as_text=True)
    chart = html[html.index('id="chart-residency"') : html.index("</figure>", html.index('id="chart-residency"'))]
    lanes = re.findall(r'text-anchor="end"><title>([^<]*)</title>', chart)
    assert lanes == ["busy"] + [f"m{n:02d}" for n in range(11)]  # m11..m14 are the least recently active
    assert chart.count("<circle") == 400 and "and 4 more model(s) not drawn" in chart
    assert "and 55 more event(s) not drawn" in chart  # 455 read: the four models' and the oldest 51 of the rest
    assert chart.count('fill-opacity="0.35"') == 200 + 11  # busy's spans of the drawn events; m00..m10 still loaded


def test_dashboard_page_empty_store(client):
    answer = client.get("/analytics")
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200 and "No calls recorded yet" in html and "No calls match." in html


def test_dashboard_page_filters_and_paging_links(filled_client):
    html = filled_client.get("/analytics?model=llama3.2&since=7d&limit=2").get_data(as_text=True)
    assert 'value="llama3.2"' in html and '<a href="/analytics?model=llama3.2&amp;since=7d" class="on">' not in html
    assert re.search(r'data-card="calls">.*?<div class="value ">3</div>', html)
    next_link = re.search(r'id="next-page" href="([^"]+)"', html)[1].replace("&amp;", "&")
    assert "cursor=" in next_link and "model=llama3.2" in next_link
    second = filled_client.get(next_link).get_data(as_text=True)
    assert second.count('class="detail"') == 1 and "First page" in second


EVERY_FILTER = {
    "q": "hello",
    "model": "llama3.2",
    "endpoint": "/api/chat",
    "outcome": "completed",
    "status": "200",
    "client": "10.0.0.1",
    "key": "alice",
    "instance": "gpu-a",
    "since": "7d",
    "until": "1m",
    "sort": "latency",
    "order": "asc",
    "limit": "5",
}


def test_dashboard_page_with_every_filter_set(filled_client):
    answer = filled_client.get("/analytics", query_string=EVERY_FILTER)
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200 and html.count('class="detail"') == 1 and 'value="/api/chat"' in html
    links = [unescape(link) for link in re.findall(r'href="(/analytics[^"#]*\?[^"#]*)', html)]
    assert len(links) == 12  # five ranges, export, JSON, the model, the key and the three sort orders
    assert all(parse_qs(urlsplit(link).query)["endpoint"] == ["/api/chat"] for link in links)
    as_json = filled_client.get(next(link for link in links if "format=json" in link)).get_json()
    described = {name.removesuffix("_text"): value for name, value in as_json["filters"].items()
                 if name not in ("since", "until")}  # fmt: skip
    assert described == {**EVERY_FILTER, "limit": 5}
    exported = filled_client.get(next(link for link in links if link.startswith("/analytics/export.csv")))
    assert exported.get_data(as_text=True).count("\r\n") == 2 and ",r1," in exported.get_data(as_text=True)


def test_dashboard_call_detail_html_shows_every_field_as_text(filled_client):
    answer = filled_client.get("/analytics/calls/r3", headers={"Accept": "text/html"})
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert all(f"<dt>{name}</dt>" in html for name in COLUMNS)
    assert f"<pre>{ESCAPED_XSS}</pre>" in html and "<img" not in html and "<pre>boom</pre>" in html


# ---- JSON --------------------------------------------------------------------------------------------------------


def test_dashboard_json_shapes(filled_client):
    figures = filled_client.get("/analytics/stats").get_json()
    assert set(figures) == {"empty", "filters", "range", "cards", "models", "series", "percentiles", "by_key"}
    assert figures["by_key"] == [  # by calls, then name; keys not in the store have no limits to show
        {"key": None, "calls": 2, "errors": 0, "input_tokens": 100, "output_tokens": 200, "limits": None},
        {"key": "alice", "calls": 2, "errors": 1, "input_tokens": 15, "output_tokens": 20, "limits": None},
        {"key": "bob", "calls": 2, "errors": 1, "input_tokens": 30, "output_tokens": 40, "limits": None},
    ]
    assert figures["cards"]["calls"] == 6 and figures["cards"]["input_tokens"] == 145
    assert set(figures["series"]) == {
        "bucket_seconds",
        "buckets",
        "calls",
        "errors",
        "tokens",
        "total_time_ms_p50",
        "total_time_ms_p95",
        "ttft_ms_p50",
        "ttft_ms_p95",
    }
    found = filled_client.get("/analytics/search?q=invoice").get_json()
    assert set(found) == {"results", "count", "count_capped", "next", "filters"}
    assert [row["request_id"] for row in found["results"]] == ["r2", "r4"] and found["count"] == 2
    assert list(found["results"][0]) == list(queries.LIST_COLUMNS)
    row = filled_client.get("/analytics/calls/r3").get_json()
    assert row["call"]["prompt"] == XSS and row["call"]["outcome"] == "upstream_error"
    page = filled_client.get("/analytics?format=json").get_json()
    assert set(page) >= {"stats", "search", "choices", "filters"} and page["stats"]["cards"]["calls"] == 6


def test_dashboard_key_and_instance_filters_in_apis_and_page(filled_client):
    found = filled_client.get("/analytics/search?key=alice&since=7d").get_json()
    assert [row["request_id"] for row in found["results"]] == ["r1", "r3", "r5"] and found["count"] == 3
    assert {(row["key_name"], row["instance"]) for row in found["results"]} == {("alice", "gpu-a")}
    assert (found["filters"]["key"], found["filters"]["instance"]) == ("alice", "")
    found = filled_client.get("/analytics/search?instance=gpu-b").get_json()
    assert [row["request_id"] for row in found["results"]] == ["r7", "r2", "r4"]
    for query, calls in (("instance=gpu-b", 3), ("key=bob&instance=gpu-b", 2), ("key=bob&instance=gpu-a", 0)):
        assert filled_client.get(f"/analytics/stats?{query}").get_json()["cards"]["calls"] == calls, query
    html = filled_client.get("/analytics?key=alice").get_data(as_text=True)
    assert html.count('class="detail"') == 2 and '<input name="key" value="alice"' in html
    assert '<datalist id="keys"><option value="alice"><option value="bob"></datalist>' in html
    assert '<datalist id="instances"><option value="gpu-a"><option value="gpu-b"></datalist>' in html
    assert 'title="instance gpu-a">alice</td>' in html


def test_dashboard_key_and_instance_values_are_escaped(app, client):
    hostile = '"><img src=x onerror=alert(1)>'
    writes.insert_calls(store_of(app), [sample_call(timestamp=datetime.now(UTC), key_name=hostile, instance=hostile)])
    html = client.get("/analytics", query_string={"key": hostile, "instance": hostile}).get_data(as_text=True)
    escaped = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert html.count('class="detail"') == 1 and "<img" not in html
    assert f'<input name="key" value="{escaped}"' in html and f'<input name="instance" value="{escaped}"' in html
    assert f'<datalist id="keys"><option value="{escaped}"></datalist>' in html
    assert f'<td title="instance {escaped}">{escaped}</td>' in html


def test_dashboard_unknown_call_is_404(filled_client):
    answer = filled_client.get("/analytics/calls/nope")
    assert answer.status_code == 404 and answer.get_json() == {"error": "no stored call has request_id 'nope'"}


@pytest.mark.parametrize(
    "url, message",
    [
        ("/analytics/stats?since=yesterday", "since='yesterday' is neither ISO 8601"),
        ("/analytics/search?limit=-1", "limit='-1' must be a whole number"),
        ("/analytics/search?cursor=abc", "cursor is not"),
        ("/analytics/export.csv?status=7", "status='7'"),
        ("/analytics/stats?outcome=nope", "outcome='nope' must be one of"),
    ],
)
def test_dashboard_bad_parameters_get_400_with_reason(filled_client, url, message):
    answer = filled_client.get(url)
    assert answer.status_code == 400 and message in answer.get_json()["error"]


def test_dashboard_bad_parameter_on_page_is_400_html(filled_client):
    answer = filled_client.get("/analytics?until=2025-99-01")
    assert answer.status_code == 400 and "until=&#39;2025-99-01&#39; is neither" in answer.get_data(as_text=True)


# ---- CSV ---------------------------------------------------------------------------------------------------------

EXPECTED_CSV = (
    "timestamp,request_id,ip_source,user_agent,http_method,endpoint,session_id,model,input_tokens,output_tokens,"
    "total_tokens,model_parameters,stream_mode,request_size_bytes,response_size_bytes,queue_time_ms,"
    "processing_time_ms,total_time_ms,http_status,error_message,system_load_cpu,system_load_memory,"
    "concurrent_requests,outcome,ttft_ms,tokens_per_second,load_duration_ms,prompt_eval_duration_ms,"
    "eval_duration_ms,done_reason,api,prompt,response_preview,cached_input_tokens,remote_model,remote_host,"
    "cold_start,key_name,instance,upstream\r\n"
    "2025-05-01T12:30:45.123Z,e1,192.0.2.7,ollama-python/0.6.3,POST,/api/chat,s-1,llama3.2,12,5,17,"
    '"{""temperature"":0.2,""num_ctx"":4096}",true,120,1043,0.0,250.5,251.25,200,,12.5,40.0,3,completed,12.75,'
    '20.0,1.0,12.0,250.0,stop,native,"say ""hi"", then\nstop",The sky is blue.,8,,,false,team-a,gpu-1,'
    "http://127.0.0.1:11435\r\n"
    "2025-05-01T12:30:46.123Z,e2,192.0.2.7,'-x,POST,/api/chat,s-1,,,,,"
    '"{""temperature"":0.2,""num_ctx"":4096}",false,120,1043,0.0,250.5,251.25,200,"bad, ""quoted""",12.5,40.0,3,'
    'completed,12.75,20.0,1.0,12.0,250.0,stop,native,"\'=HYPERLINK(""http://evil"")",The sky is blue.,8,,,false,'
    "team-b,gpu-2,http://127.0.0.1:11435\r\n"
)


def test_dashboard_export_csv_whole_text(app, client):
    formula = sample_call(
        request_id="e2",
        timestamp=CSV_NOW + timedelta(seconds=1),
        prompt='=HYPERLINK("http://evil")',
        user_agent="-x",
        model=None,
        input_tokens=None,
        output_tokens=None,
        total_tokens=None,
        stream_mode=False,
        error_message='bad, "quoted"',
        key_name="team-b",
        instance="gpu-2",
    )
    older = sample_call(request_id="e0", timestamp=CSV_NOW - timedelta(days=2))
    writes.insert_calls(store_of(app), [older, sample_call(request_id="e1"), formula])
    answer = client.get("/analytics/export.csv?since=2025-05-01T00:00:00Z&until=2025-05-02T00:00:00Z")
    assert answer.status_code == 200 and answer.mimetype == "text/csv"
    assert re.fullmatch(
        r'attachment; filename="ollama-proxy-calls-\d{8}T\d{6}Z\.csv"', answer.headers["Content-Disposition"]
    )
    assert answer.get_data(as_text=True) == EXPECTED_CSV
    only_e2 = EXPECTED_CSV[: EXPECTED_CSV.index("\r\n") + 2] + EXPECTED_CSV[EXPECTED_CSV.index("2025-05-01T12:30:46") :]
    for matching in ("q=HYPERLINK", "key=team-b", "instance=gpu-2", "key=team-b&instance=gpu-2"):
        assert client.get(f"/analytics/export.csv?since=all&{matching}").get_data(as_text=True) == only_e2, matching


def test_export_cells_match_the_csv_mirror_byte_for_byte(tmp_path):
    db = open_sqlite(tmp_path / "calls.db", read_model=False)
    tricky = sample_call(
        request_id="t1",
        timestamp=CSV_NOW.replace(microsecond=0),
        user_agent="=1+2",
        session_id="+s",
        model="@m",
        endpoint="-e",
        prompt='\tx\r\ny, "q"',
        response_preview="ünïcode ✓ -",
        done_reason="",
        error_message="-",
        queue_time_ms=-5.0,
        input_tokens=-5,
        system_load_cpu=None,
    )
    calls = [tricky, *known_calls()]
    writes.insert_calls(db, calls)
    ours = "".join(export.iter_csv(queries.iter_chunks(db, parse_filters({"since": "all"}), chunk=3)))
    assert ours == "".join(csvlog.iter_csv(sorted(calls, key=lambda call: call.timestamp)))  # oldest first


def test_dashboard_export_streams_in_chunks(app, client):
    calls = [replace(sample_call(), request_id=f"c{n}", timestamp=CSV_NOW + timedelta(seconds=n)) for n in range(1500)]
    writes.insert_calls(store_of(app), calls)
    answer = client.get("/analytics/export.csv?since=all", buffered=False)
    chunks = list(answer.response)
    answer.close()
    assert len(chunks) == 2  # the header, then one write for the chunk of 1,500 rows (not one per line)
    text = b"".join(chunks).decode()
    assert text.count("\r\n") == 1501 and text.count(",c1499,") == 1


# ---- safety ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/analytics",
        "/analytics/stats",
        "/analytics/search",
        "/analytics/calls/nope",
        "/analytics/export.csv",
        "/analytics/static/dashboard.js",
        "/analytics/stats?limit=x",
    ],
)
def test_dashboard_security_headers(filled_client, url):
    answer = filled_client.get(url)
    answer.close()
    headers = answer.headers
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"


def test_dashboard_page_has_no_inline_script_and_a_nonced_style(filled_client):
    answer = filled_client.get("/analytics")
    html = answer.get_data(as_text=True)
    nonce = re.search(r"style-src 'nonce-([^']+)'", answer.headers["Content-Security-Policy"])[1]
    assert f'<style nonce="{nonce}">' in html and " style=" not in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/analytics/static/dashboard.js" defer>']
    assert attributes_named(html, "on") == [] and attributes_named(html, "style") == []


def attributes_named(html: str, prefix: str) -> list[str]:
    """Every attribute of every tag whose name starts with ``prefix``, as a real HTML parser sees them."""
    found = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(f"{tag} {name}" for name, _ in attrs if name.startswith(prefix))

    Collector().feed(html)
    return found


def test_dashboard_unknown_paths_are_ours_not_ollamas(filled_client):
    for method in ("GET", "POST", "DELETE"):
        answer = filled_client.open("/analytics/api/tags", method=method)
        assert answer.status_code == 404 and "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
        assert answer.get_json() == {"error": "there is no such page under /analytics"}


def test_dashboard_static_script_served_as_javascript(filled_client):
    answer = filled_client.get("/analytics/static/dashboard.js")
    assert answer.status_code == 200 and answer.mimetype in ("text/javascript", "application/javascript")
    answer.close()


@pytest.mark.parametrize(
    "path",
    [
        "/analytics/../../etc/passwd",
        "/analytics/static/../../config.py",
        "/analytics/static/..%2f..%2fconfig.py",
        "/analytics/static/%2e%2e/queries.py",
        "/analytics/static/..\\queries.py",
        "/analytics/static//etc/passwd",
        "/analytics/static/../__init__.py",
        "/analytics/calls/..%2f..%2f..%2fetc%2fpasswd",
        "/analytics/whatever/../../../etc/passwd",
        "/analytics/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_dashboard_path_tricks_read_no_files(filled_client, path):
    answer = filled_client.get(path)
    body = answer.get_data(as_text=True)
    answer.close()
    assert answer.status_code in (400, 404) or answer.status_code >= 500
    assert "root:" not in body and "SETTINGS" not in body and "def " not in body


# ---- the admin token ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["/analytics/stats", "/analytics/search", "/analytics/calls/r1", "/analytics/export.csv"]
)
def test_dashboard_token_required_for_apis(locked_app, url):
    client = locked_app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        answer = client.get(url, headers=headers)
        assert answer.status_code == 401 and answer.get_json() == {"error": "unauthorized"}
    answer = client.get(url, headers={"Authorization": "Bearer s3cret-token"})
    assert answer.status_code == 200
    answer.close()


def test_dashboard_login_form_sets_cookie(locked_app):
    client = locked_app.test_client()
    page = client.get("/analytics")
    assert page.status_code == 401 and 'name="token"' in page.get_data(as_text=True)
    script = client.get("/analytics/static/dashboard.js")
    script.close()
    assert "s3cret" not in page.get_data(as_text=True) and script.status_code == 200
    wrong = client.post("/analytics/login", data={"token": "guess", "next": "/analytics?since=7d"})
    assert wrong.status_code == 401 and client.get_cookie("ollama_proxy_admin", path="/analytics") is None
    right = client.post("/analytics/login", data={"token": "s3cret-token", "next": "/analytics?since=7d"})
    assert right.status_code == 302 and right.headers["Location"] == "/analytics?since=7d"
    cookie = client.get_cookie("ollama_proxy_admin", path="/analytics")
    assert cookie.http_only and cookie.same_site == "Strict" and "s3cret" not in cookie.value
    assert client.get("/analytics").status_code == 200 and client.get("/analytics/stats").status_code == 200
    client.post("/analytics/logout")
    assert client.get("/analytics/stats").status_code == 401


def test_dashboard_login_never_redirects_elsewhere(locked_app):
    client = locked_app.test_client()
    for target in ("https://evil.example/", "//evil.example/analytics", "/analytics/\\\\evil", "/metrics"):
        answer = client.post("/analytics/login", data={"token": "s3cret-token", "next": target})
        assert answer.headers["Location"] == "/analytics", target


# ---- bounded answers ---------------------------------------------------------------------------------------------

BIG_CHARS = 256 * 1024  # each row of the 20 then outweighs the 150 KB a list view may send
LONG_TEXT = ("model_parameters", "prompt", "response_preview", "error_message", "user_agent")


def test_dashboard_lists_read_no_long_text(app, client, caplog):
    """Twenty rows each holding 1 MB in every long text column: the page, its JSON twin and the search API stay
    small, and no list query reads those columns; one call's view and the export still give them whole."""
    db = store_of(app)
    calls = [replace(sample_call(), request_id=f"big{n}", timestamp=datetime.now(UTC) - timedelta(minutes=n))
             for n in range(20)]  # fmt: skip
    writes.insert_calls(db, calls)
    with db.connection_context():  # rows as large as any writer may have left them
        models.CallRow.update({name: name[0].upper() * BIG_CHARS for name in LONG_TEXT}).execute(db)
    caplog.set_level(logging.DEBUG, logger="peewee")
    answers = {url: client.get(url).get_data() for url in ("/analytics", "/analytics?format=json", "/analytics/search")}
    reads = [record.getMessage() for record in caplog.records  # this thread's: the read model folds in its own
             if record.name == "peewee" and record.thread == threading.get_ident()]  # fmt: skip
    caplog.set_level(logging.WARNING, logger="peewee")
    for url, body in answers.items():
        assert len(body) < 150_000, url
        assert all(name[0].upper().encode() * 1000 not in body for name in LONG_TEXT), url
    assert len(json.loads(answers["/analytics/search"])["results"]) == 20
    assert reads and not [read for read in reads if any(f'"{name}"' in read for name in LONG_TEXT if name != "prompt")]
    one = client.get("/analytics/calls/big3").get_json()["call"]
    assert all(one[name] == name[0].upper() * BIG_CHARS for name in LONG_TEXT)
    exported = client.get("/analytics/export.csv").get_data()
    assert exported.count(b"M" * BIG_CHARS) == 20 and exported.count(b"R" * BIG_CHARS) == 20


def test_dashboard_a_flood_of_model_names_keeps_the_page_small(app, client):
    """22,000 distinct model names (a client inventing one per call): the busiest 20 and one "other" row."""
    writes.insert_calls(store_of(app), flood_of_models(datetime.now(UTC), junk=22_000))
    page = client.get("/analytics").get_data(as_text=True)
    twin = client.get("/analytics?format=json").get_data()
    assert len(page) < 250_000 and len(twin) < 100_000
    rows = json.loads(twin)["stats"]["models"]
    assert [row["model"] for row in rows] == [f"model-{number:02d}" for number in range(20)] + ["other"]
    assert (rows[-1]["calls"], rows[-1]["folded"]) == (55 + 1 + 22_000, 10 + 1 + 22_000)
    assert sum(row["calls"] for row in rows) == json.loads(twin)["stats"]["cards"]["calls"] == 465 + 1 + 22_000
    assert (
        "other (22,011 models)" in page
        and "junk-" not in page.split('<datalist id="models">')[1].split("</datalist>")[1]
    )
