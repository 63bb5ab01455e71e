"""Every API Ollama serves, end to end with its official client (openai, anthropic, ollama) through a live proxy.

For each call the client gets what it gets from the fake Ollama directly (the same objects, ids and times aside),
and the Call, its stored row, its CSV mirror line and the /metrics lines carry the upstream's exact figures.
"""

from __future__ import annotations

import csv
import io

import anthropic
import ollama
import openai
import pytest
import requests

from proxy_app.calls import COLUMNS
from proxy_app.state import state_of
from proxy_app.store.csvlog import iter_csv
from proxy_app.store.models import CallRow, open_database

# What differs between two identical calls: the fake's random ids and its clock.
VOLATILE = frozenset({"id", "item_id", "call_id", "created", "created_at", "completed_at"})
QUESTION = "why is the sky blue"  # 5 words: the fake counts 15 prompt tokens for it alone
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FIGURES = ("endpoint", "api", "stream_mode", "model", "input_tokens", "output_tokens", "total_tokens",
           "cached_input_tokens", "done_reason", "outcome", "response_preview", "remote_model",
           "remote_host")  # fmt: skip
CALL_METRICS = ("ollama_requests_total", "ollama_prompt_tokens_total", "ollama_completion_tokens_total",
                "ollama_cached_prompt_tokens_total", "ollama_time_to_first_token_seconds_count")  # fmt: skip


def seen_by_client(value):
    """A client's object (or a list of them) as plain data, with the values that differ from call to call blanked."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {key: "<varies>" if key in VOLATILE else seen_by_client(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [seen_by_client(item) for item in value]
    return value


@pytest.fixture
def both(upstream, live_proxy, closing):
    """``both(kind, ask, **headers)``: ask the fake directly, then through the proxy, with a fresh client of ``kind``
    (openai, anthropic, ollama) each time; assert the client saw the same; return what it got through the proxy."""
    makers = {
        "openai": lambda url, headers: openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0,
                                                     default_headers=headers),
        "anthropic": lambda url, headers: anthropic.Anthropic(base_url=url, api_key="sk-ant-test", max_retries=0,
                                                              default_headers=headers),
        "ollama": lambda url, headers: ollama.Client(host=url, headers={"Authorization": "Bearer ok-test", **headers}),
    }  # fmt: skip

    def ask_both(kind: str, ask, **headers):
        direct, proxied = (closing(makers[kind](url, headers)) for url in (upstream.url, live_proxy.url))
        expected = seen_by_client(ask(direct))
        got = ask(proxied)
        assert seen_by_client(got) == expected
        return got

    return ask_both


def accounted(app, recorder):
    """The one Call the proxy finished, once its stored row and CSV mirror line are checked to hold it whole."""
    [call] = recorder.wait_for(1)
    writer = state_of(app).writer
    assert writer.flush(10)
    row = CallRow.select().where(CallRow.request_id == call.request_id).dicts().execute(writer.database)[0]
    assert {name: row[name] for name in COLUMNS} == call.as_dict()
    with open(app.config["CSV_FILE"], newline="", encoding="utf-8") as handle:
        lines = [line for line in csv.reader(handle) if line[1] == call.request_id]
    assert lines == list(csv.reader(io.StringIO("".join(iter_csv([call])), newline="")))[1:]
    assert call.ttft_ms is None or 0 < call.ttft_ms <= call.total_time_ms
    return call


def figures(call) -> dict:
    """The fields that say what the call was and what the upstream reported about it."""
    return {name: getattr(call, name) for name in FIGURES}


def metric_lines(url: str, endpoint: str) -> str:
    """The per-call counters' samples for one endpoint label, sorted (multiprocess mode has an order of its own)."""
    text = requests.get(url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.split("{")[0] in CALL_METRICS and f'"{endpoint}"' in line]
    return "".join(line + "\n" for line in sorted(lines))


def expected(endpoint: str, model: str, calls: int, tokens_in: int, tokens_out: int, cached: int | None) -> str:
    """What ``metric_lines`` gives after ``calls`` completed calls with these token totals, each with content."""
    labels = f'endpoint="{endpoint}",model="{model}"'
    keyed = f'endpoint="{endpoint}",key="none",model="{model}"'  # the counters also say whose key (none: anonymous)
    lines = [f"ollama_completion_tokens_total{{{keyed}}} {tokens_out}.0",
             f"ollama_prompt_tokens_total{{{keyed}}} {tokens_in}.0",
             f'ollama_requests_total{{{keyed},outcome="completed",status="200"}} {calls}.0',
             f"ollama_time_to_first_token_seconds_count{{{labels}}} {calls}.0"]  # fmt: skip
    if cached is not None:
        lines.insert(0, f"ollama_cached_prompt_tokens_total{{{keyed}}} {cached}.0")
    return "".join(line + "\n" for line in lines)


# ---- OpenAI Responses (/v1/responses) ---------------------------------------------------------------------------


def test_apis_openai_responses_not_streamed(both, app, recorder, live_proxy):
    reply = both("openai", lambda client: client.responses.create(model="qwen3", input=QUESTION,
                                                                   reasoning={"effort": "low"}))  # fmt: skip
    call = accounted(app, recorder)
    assert (reply.status, reply.output_text, reply.usage.input_tokens, reply.usage.output_tokens) == (
        "completed", "The sky is blue.", 15, 9)  # fmt: skip
    assert reply.usage.input_tokens_details.cached_tokens == 0  # Ollama's placeholder: no cached figure recorded
    assert figures(call) == {
        "endpoint": "/v1/responses", "api": "openai", "stream_mode": False, "model": "qwen3", "input_tokens": 15,
        "output_tokens": 9, "total_tokens": 24, "cached_input_tokens": None, "done_reason": "completed",
        "outcome": "completed", "response_preview": "The sky is blue.", "remote_model": None, "remote_host": None,
    }  # fmt: skip
    assert metric_lines(live_proxy.url, "/v1/responses") == expected("/v1/responses", "qwen3", 1, 15, 9, None)


def test_apis_openai_responses_streamed_with_reasoning_and_cached_tokens(both, app, recorder, live_proxy):
    def ask(client):
        return list(client.responses.create(model="qwen3", input=QUESTION, reasoning={"effort": "low"}, stream=True))

    events = both("openai", ask, **{"X-Fake-Cached-Tokens": "12"})
    call = accounted(app, recorder)
    assert [event.type for event in events][-1] == "response.completed"
    usage = events[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens) == (15, 9, 12)
    assert figures(call) == {
        "endpoint": "/v1/responses", "api": "openai", "stream_mode": True, "model": "qwen3", "input_tokens": 15,
        "output_tokens": 9, "total_tokens": 24, "cached_input_tokens": 12, "done_reason": "completed",
        "outcome": "completed", "response_preview": "The sky is blue.", "remote_model": None, "remote_host": None,
    }  # fmt: skip
    assert metric_lines(live_proxy.url, "/v1/responses") == expected("/v1/responses", "qwen3", 1, 15, 9, 12)


def test_apis_openai_responses_streamed_function_call(both, app, recorder, live_proxy):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]

    def ask(client):
        return list(client.responses.create(model="llama3.2", input="weather in Paris?", tools=tools, stream=True))

    events = both("openai", ask)
    call = accounted(app, recorder)
    [item] = events[-1].response.output
    assert (item.type, item.name, item.arguments) == ("function_call", "get_weather", '{"city":"Paris"}')
    assert (call.input_tokens, call.output_tokens, call.outcome, call.response_preview) == (13, 1, "completed", None)
    assert call.ttft_ms is not None  # the arguments delta is the first content
    assert metric_lines(live_proxy.url, "/v1/responses") == expected("/v1/responses", "llama3.2", 1, 13, 1, None)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_apis_stream_that_stops_short_is_incomplete_not_an_error(both, app, recorder, live_proxy, kind):
    def ask(client):  # Ollama's converters turn a failed generation into no event at all: the stream just stops
        if kind == "openai":
            return list(client.responses.create(model="llama3.2", input=QUESTION, stream=True))
        with client.messages.stream(model="llama3.2", max_tokens=64, messages=[{"role": "user", "content": QUESTION}]
                                    ) as stream:  # fmt: skip
            return list(stream)

    both(kind, ask, **{"X-Fake-Error-After": "2"})
    call = accounted(app, recorder)
    assert (call.outcome, call.error_message, call.http_status) == ("incomplete", None, 200)
    assert (call.input_tokens, call.output_tokens, call.response_preview) == (None, None, "The sky")
    requests_total = metric_lines(live_proxy.url, call.endpoint).splitlines()[0]
    assert requests_total == (f'ollama_requests_total{{endpoint="{call.endpoint}",key="none",model="llama3.2",'
                              'outcome="incomplete",status="200"} 1.0')  # fmt: skip


# ---- OpenAI chat (/v1/chat/completions): the current stream layout and the one before it ------------------------

LAYOUTS = {"current": {}, "legacy": {"X-Fake-V1-Legacy-Layout": "1"}}  # finish and usage in chunks of their own, or not


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage-asked", "usage-injected"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apis_openai_chat_streamed_in_both_layouts(both, app, recorder, live_proxy, fake, layout, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}

    def ask(client):
        messages = [{"role": "user", "content": QUESTION}]
        return list(client.chat.completions.create(model="llama3.2", messages=messages, stream=True, **options))

    chunks = both("openai", ask, **LAYOUTS[layout], **{"X-Fake-Cached-Tokens": "6"})
    call = accounted(app, recorder)
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert (text, chunks[-1].choices == [] and chunks[-1].usage is not None) == ("The sky is blue.", include_usage)
    if include_usage:
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (15, 5, 6)
    else:  # the proxy asked for the usage the client did not, and took it out again
        assert all(chunk.usage is None for chunk in chunks)
        direct, proxied = (entry["body"].decode() for entry in fake.seen[-2:])
        assert "include_usage" not in direct and "include_usage" in proxied
    assert figures(call) == {
        "endpoint": "/v1/chat/completions", "api": "openai", "stream_mode": True, "model": "llama3.2",
        "input_tokens": 15, "output_tokens": 5, "total_tokens": 20, "cached_input_tokens": 6, "done_reason": "stop",
        "outcome": "completed", "response_preview": "The sky is blue.", "remote_model": None, "remote_host": None,
    }  # fmt: skip
    lines = expected("/v1/chat/completions", "llama3.2", 1, 15, 5, 6)
    assert metric_lines(live_proxy.url, "/v1/chat/completions") == lines


# ---- Anthropic Messages (/v1/messages) --------------------------------------------------------------------------

TOOLS = [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER}]
THINKING = {"type": "enabled", "budget_tokens": 1024}


def test_apis_anthropic_messages_not_streamed_with_thinking_and_tool_use(both, app, recorder, live_proxy, fake):
    def ask(client):
        return client.messages.create(model="qwen3", max_tokens=2048, thinking=THINKING, tools=TOOLS,
                                      messages=[{"role": "user", "content": "weather in Paris?"}])  # fmt: skip

    message = both("anthropic", ask, **{"X-Api-Key": "sk-ant-key"})  # the header Anthropic clients send the key in
    call = accounted(app, recorder)
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    assert (message.content[1].input, message.stop_reason) == ({"city": "Paris"}, "tool_use")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (13, 5)  # 4 thinking tokens, 1 tool call
    assert figures(call) == {
        "endpoint": "/v1/messages", "api": "anthropic", "stream_mode": False, "model": "qwen3", "input_tokens": 13,
        "output_tokens": 5, "total_tokens": 18, "cached_input_tokens": None, "done_reason": "tool_use",
        "outcome": "completed", "response_preview": None, "remote_model": None, "remote_host": None,
    }  # fmt: skip
    relayed = fake.seen[-1]["headers"]  # keys pass through untouched, in either header
    assert (relayed["X-Api-Key"], relayed["Authorization"]) == ("sk-ant-key", "Bearer sk-ant-test")
    assert metric_lines(live_proxy.url, "/v1/messages") == expected("/v1/messages", "qwen3", 1, 13, 5, None)


def test_apis_anthropic_messages_streamed_with_thinking_tool_use_and_cached_tokens(both, app, recorder, live_proxy):
    def ask(client):
        with client.messages.stream(model="qwen3", max_tokens=2048, thinking=THINKING, tools=TOOLS,
                                    messages=[{"role": "user", "content": QUESTION}]) as stream:  # fmt: skip
            return [*stream, stream.get_final_message()]

    *events, message = both("anthropic", ask, **{"X-Fake-Cached-Tokens": "9"})
    call = accounted(app, recorder)
    assert events[0].message.usage.input_tokens == len(QUESTION) // 4  # message_start holds Ollama's estimate only
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (6, 9, 5)  # 6 + 9 = 15 in all
    assert figures(call) == {
        "endpoint": "/v1/messages", "api": "anthropic", "stream_mode": True, "model": "qwen3", "input_tokens": 15,
        "output_tokens": 5, "total_tokens": 20, "cached_input_tokens": 9, "done_reason": "tool_use",
        "outcome": "completed", "response_preview": None, "remote_model": None, "remote_host": None,
    }  # fmt: skip
    assert metric_lines(live_proxy.url, "/v1/messages") == expected("/v1/messages", "qwen3", 1, 15, 5, 9)


def test_apis_anthropic_messages_streamed_text(both, app, recorder, live_proxy):
    def ask(client):
        with client.messages.stream(model="llama3.2", max_tokens=64,
                                    messages=[{"role": "user", "content": QUESTION}]) as stream:  # fmt: skip
            return [*stream, stream.get_final_message()]

    *_, message = both("anthropic", ask)
    call = accounted(app, recorder)
    assert (message.content[0].text, message.stop_reason) == ("The sky is blue.", "end_turn")
    assert (call.input_tokens, call.output_tokens, call.response_preview) == (15, 5, "The sky is blue.")
    assert (call.done_reason, call.outcome, call.cached_input_tokens) == ("end_turn", "completed", None)
    assert metric_lines(live_proxy.url, "/v1/messages") == expected("/v1/messages", "llama3.2", 1, 15, 5, None)


# ---- Ollama's own client: a cloud model, with cached prompt tokens ------------------------------------------------

CLOUD = {"remote_model": "gpt-oss:120b", "remote_host": "https://ollama.com:443"}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_apis_ollama_cloud_model_chat_with_cached_tokens(both, app, recorder, live_proxy, fake, stream):
    def ask(client):
        answer = client.chat(model="gpt-oss:120b-cloud", messages=[{"role": "user", "content": QUESTION}],
                             think=True, stream=stream)  # fmt: skip
        return list(answer) if stream else answer

    answer = both("ollama", ask, **{"X-Fake-Cached-Tokens": "8"})
    final = answer[-1] if stream else answer
    call = accounted(app, recorder)
    assert (final.prompt_eval_count, final.eval_count, final.done_reason) == (15, 9, "stop")
    assert figures(call) == {
        "endpoint": "/api/chat", "api": "native", "stream_mode": stream, "model": "gpt-oss:120b-cloud",
        "input_tokens": 15, "output_tokens": 9, "total_tokens": 24, "cached_input_tokens": 8, "done_reason": "stop",
        "outcome": "completed", "response_preview": "The sky is blue.", **CLOUD,
    }  # fmt: skip
    assert fake.seen[-1]["headers"]["Authorization"] == "Bearer ok-test"  # a cloud model's key passes untouched
    assert metric_lines(live_proxy.url, "/api/chat") == expected("/api/chat", "gpt-oss:120b-cloud", 1, 15, 9, 8)


# ---- the same under gunicorn --------------------------------------------------------------------------------------


def test_apis_under_gunicorn_each_api_stored_mirrored_and_counted(gunicorn_proxy, tmp_path, closing):
    proxy, cached = gunicorn_proxy(workers=2, threads=8), {"X-Fake-Cached-Tokens": "6"}
    messages = [{"role": "user", "content": QUESTION}]
    chat = closing(openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, default_headers=cached))
    list(chat.responses.create(model="qwen3", input=QUESTION, reasoning={"effort": "low"}, stream=True))
    chat.responses.create(model="qwen3", input=QUESTION)
    list(chat.chat.completions.create(model="llama3.2", messages=messages, stream=True))
    claude = closing(anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0, default_headers=cached))
    with claude.messages.stream(model="qwen3", max_tokens=99, thinking=THINKING, messages=messages) as stream:
        stream.get_final_message()
    closing(ollama.Client(host=proxy.url, headers=cached)).chat(model="gpt-oss:120b-cloud", messages=messages)
    lines = metric_lines(proxy.url, "/v1/responses") + metric_lines(proxy.url, "/v1/messages")
    assert proxy.stop() == 0
    db_url = f"sqlite:///{tmp_path / 'data' / 'ollama-proxy.db'}"
    db = open_database(db_url)
    rows = list(CallRow.select().order_by(CallRow.timestamp).dicts().execute(db))
    db.close()
    names = ("endpoint", "api", "stream_mode", "input_tokens", "output_tokens", "cached_input_tokens", "outcome",
             "remote_model")  # fmt: skip
    assert [tuple(row[name] for name in names) for row in rows] == [
        ("/v1/responses", "openai", True, 15, 9, 6, "completed", None),
        ("/v1/responses", "openai", False, 15, 5, 6, "completed", None),
        ("/v1/chat/completions", "openai", True, 15, 5, 6, "completed", None),
        ("/v1/messages", "anthropic", True, 15, 9, 6, "completed", None),
        ("/api/chat", "native", False, 15, 5, 6, "completed", "gpt-oss:120b"),
    ]
    assert all(row["ttft_ms"] is not None and row["system_load_cpu"] is not None for row in rows)
    with open(tmp_path / "data" / "ollama-proxy.csv", newline="", encoding="utf-8") as handle:
        mirrored = list(csv.reader(handle))
    assert mirrored == list(csv.reader(io.StringIO("".join(iter_csv(rows)), newline="")))
    assert lines == expected("/v1/responses", "qwen3", 2, 30, 14, 12) + expected("/v1/messages", "qwen3", 1, 15, 9, 6)
