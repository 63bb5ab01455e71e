"""Pure parser tests: every recording to an exact Usage, also split at every byte offset and fed byte by byte."""

import json
import pathlib
import tracemalloc
from dataclasses import replace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy_app.ollama import usage
from proxy_app.ollama.usage import EDGE_BYTES, MAX_EVENT_BYTES, MAX_PARSE_BYTES, Usage, UsageMeter, UsageStripper

RECORDINGS = pathlib.Path(__file__).parent / "recordings"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
NATIVE_JSON = "application/json; charset=utf-8"  # gin c.JSON
V1_JSON = "application/json"  # /v1 json.Encoder replies

CASES = {
    "generate_stream.ndjson": (NDJSON, 200, Usage(
        input_tokens=31, output_tokens=9, total_duration_ns=1456073459, load_duration_ns=21873125,
        prompt_eval_duration_ns=97254000, eval_duration_ns=1336034000, done_reason="stop", is_complete=True,
        response_preview="The sky is blue because of Rayleigh scattering!", model="llama3.2")),
    "chat_stream.ndjson": (NDJSON, 200, Usage(
        input_tokens=26, output_tokens=10, total_duration_ns=4883583458, load_duration_ns=1334875,
        prompt_eval_duration_ns=342546000, eval_duration_ns=4535599000, done_reason="stop", is_complete=True,
        response_preview="Hello! How can I help you today?", model="llama3.2")),
    "chat_thinking_stream.ndjson": (NDJSON, 200, Usage(
        input_tokens=14, output_tokens=12, total_duration_ns=911286417, load_duration_ns=52616375,
        prompt_eval_duration_ns=38012209, eval_duration_ns=812954708, done_reason="stop", is_complete=True,
        response_preview="2 + 2 = 4.", model="qwen3:0.6b")),
    "chat_tool_call_stream.ndjson": (NDJSON, 200, Usage(
        input_tokens=182, output_tokens=22, total_duration_ns=2108463250, load_duration_ns=19560042,
        prompt_eval_duration_ns=361203125, eval_duration_ns=1722315083, done_reason="stop", is_complete=True,
        model="llama3.1")),
    "chat_stream_unicode.ndjson": (NDJSON, 200, Usage(
        input_tokens=18, output_tokens=12, total_duration_ns=1203442125, load_duration_ns=20176542,
        prompt_eval_duration_ns=48211000, eval_duration_ns=1101347000, done_reason="stop", is_complete=True,
        response_preview="Llama \U0001f999 is \u30e9\u30de in \u65e5\u672c\u8a9e.\u2028\u00e9t\u00e9 \u2615",
        model="llama3.2")),
    "generate.json": (NATIVE_JSON, 200, Usage(
        input_tokens=35, output_tokens=14, total_duration_ns=932117208, load_duration_ns=18734167,
        prompt_eval_duration_ns=60471000, eval_duration_ns=851038000, done_reason="stop", is_complete=True,
        response_preview="In HTML, use <b> for bold & <i> for italics.", model="llama3.2")),
    "generate_cache_hit_old.json": (NATIVE_JSON, 200, Usage(
        output_tokens=3, total_duration_ns=214560333, load_duration_ns=1021458, prompt_eval_duration_ns=12043000,
        eval_duration_ns=198722000, done_reason="stop", is_complete=True, response_preview="Paris.", model="llama3")),
    "chat_load.json": (NATIVE_JSON, 200, Usage(done_reason="load", is_complete=True, model="llama3.2")),
    "generate_unload.json": (NATIVE_JSON, 200, Usage(done_reason="unload", is_complete=True, model="llama3.2")),
    "embed.json": (NATIVE_JSON, 200, Usage(
        input_tokens=8, total_duration_ns=14143917, load_duration_ns=1019500, is_complete=True, model="all-minilm")),
    "embeddings_legacy.json": (NATIVE_JSON, 200, Usage(is_complete=True)),
    "pull_stream.ndjson": (NDJSON, 200, Usage(is_complete=True)),
    "pull_unknown_model.ndjson": (NDJSON, 200, Usage(error_message="pull model manifest: file does not exist")),
    "generate_midstream_error.ndjson": (NDJSON, 200, Usage(
        error_message="an error was encountered while running the model", response_preview="I can", model="gemma3")),
    "chat_stream_truncated.ndjson": (NDJSON, 200, Usage(response_preview="Once upon a", model="llama3.2")),
    "generate_404.json": (NATIVE_JSON, 404, Usage(error_message="model 'llama9' not found")),
    "v1_chat_404.json": (V1_JSON, 404, Usage(error_message="model 'llama9' not found")),
    "v1_chat_stream_usage.sse": (SSE, 200, Usage(
        input_tokens=26, output_tokens=5, done_reason="stop", is_complete=True,
        response_preview="Hello there!", model="llama3.2")),
    "v1_chat_stream_old_usage.sse": (SSE, 200, Usage(
        input_tokens=26, output_tokens=5, done_reason="stop", is_complete=True,
        response_preview="Hello there!", model="llama3.2")),
    "v1_chat_stream_no_usage.sse": (SSE, 200, Usage(
        done_reason="stop", is_complete=True, response_preview="Hello there!", model="llama3.2")),
    "v1_chat_stream_midstream_error.sse": (SSE, 200, Usage(response_preview="Hello there", model="llama3.2")),
    "v1_chat.json": (V1_JSON, 200, Usage(
        input_tokens=26, output_tokens=10, done_reason="stop", is_complete=True,
        response_preview="Hello! How can I help you today?", model="llama3.2")),
    "v1_completions_stream_usage.sse": (SSE, 200, Usage(
        input_tokens=28, output_tokens=5, done_reason="stop", is_complete=True,
        response_preview="Once upon a time", model="llama3.2")),
    "v1_embeddings.json": (V1_JSON, 200, Usage(input_tokens=8, is_complete=True, model="all-minilm")),
    "v1_chat_stream_cached_usage.sse": (SSE, 200, Usage(
        input_tokens=1040, output_tokens=3, cached_input_tokens=1024, done_reason="stop", is_complete=True,
        response_preview="Hi again!", model="llama3.2")),
    "chat_stream_cached.ndjson": (NDJSON, 200, Usage(
        input_tokens=1040, output_tokens=3, cached_input_tokens=1024, total_duration_ns=412874125,
        load_duration_ns=10374208, prompt_eval_duration_ns=18842000, eval_duration_ns=61266000, done_reason="stop",
        is_complete=True, response_preview="Hi again!", model="llama3.2")),
    "chat_cloud_stream.ndjson": (NDJSON, 200, Usage(
        input_tokens=72, output_tokens=19, total_duration_ns=1873402515, prompt_eval_duration_ns=91233000,
        eval_duration_ns=702311000, done_reason="stop", is_complete=True, response_preview="Hello from the cloud!",
        model="gpt-oss:120b-cloud", remote_model="gpt-oss:120b", remote_host="https://ollama.com:443")),
    "v1_responses_stream.sse": (SSE, 200, Usage(
        input_tokens=14, output_tokens=12, done_reason="completed", is_complete=True, response_preview="2 + 2 = 4.",
        model="qwen3:0.6b")),
    "v1_responses_function_call_stream.sse": (SSE, 200, Usage(
        input_tokens=182, output_tokens=22, done_reason="completed", is_complete=True, model="llama3.1")),
    "v1_responses_stream_cut.sse": (SSE, 200, Usage(response_preview="Once upon", model="gemma3")),
    "v1_responses_stream_failed.sse": (SSE, 200, Usage(
        input_tokens=128, output_tokens=23, done_reason="failed",
        error_message="ollama cloud is disabled: web search is unavailable", model="gpt-oss:20b")),
    "v1_responses.json": (V1_JSON, 200, Usage(
        input_tokens=26, output_tokens=10, done_reason="completed", is_complete=True,
        response_preview="Hello! How can I help you today?", model="llama3.2")),
    "v1_messages_stream.sse": (SSE, 200, Usage(
        input_tokens=182, output_tokens=40, done_reason="tool_use", is_complete=True, response_preview="Let me check.",
        model="qwen3:8b")),
    "v1_messages_stream_cached.sse": (SSE, 200, Usage(
        input_tokens=1040, output_tokens=3, cached_input_tokens=1024, done_reason="end_turn", is_complete=True,
        response_preview="Hi again!", model="llama3.2")),
    "v1_messages_stream_cut.sse": (SSE, 200, Usage(response_preview="Once upon", model="gemma3")),
    "v1_messages.json": (V1_JSON, 200, Usage(
        input_tokens=26, output_tokens=10, done_reason="end_turn", is_complete=True,
        response_preview="Hello! How can I help you today?", model="llama3.2")),
    "v1_messages_404.json": (V1_JSON, 404, Usage(error_message="model 'llama9' not found")),
}  # fmt: skip


def measure(name: str, pieces, preview_chars: int = 200) -> Usage:
    """Feed the pieces to a meter set up for recording `name` and return its result."""
    content_type, status, _ = CASES[name]
    meter = UsageMeter(content_type, status, preview_chars)
    for piece in pieces:
        meter.feed(piece)
    return meter.result()


def read(name: str) -> bytes:
    """Return a recording's raw bytes."""
    return (RECORDINGS / name).read_bytes()


def test_usage_every_recording_has_a_case():
    assert sorted(p.name for p in RECORDINGS.iterdir() if p.suffix != ".md") == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_usage_recording(name):
    assert measure(name, [read(name)]) == CASES[name][2]


@pytest.mark.parametrize("name", CASES)
def test_usage_split_at_every_offset(name):
    data, expected = read(name), CASES[name][2]
    for offset in range(len(data) + 1):
        assert measure(name, [data[:offset], data[offset:]]) == expected, offset


@pytest.mark.parametrize("name", CASES)
def test_usage_one_byte_at_a_time(name):
    data = read(name)
    assert measure(name, [data[i : i + 1] for i in range(len(data))]) == CASES[name][2]


@pytest.mark.parametrize("name", CASES)
def test_usage_skipping_lines_changes_no_count(name):
    # preview_chars=0 lets the meter skip content lines on bytes as soon as content was seen
    expected = CASES[name][2]
    assert measure(name, [read(name)], preview_chars=0) == replace(expected, response_preview="")
    five = replace(expected, response_preview=expected.response_preview[:5])
    assert measure(name, [read(name)], preview_chars=5) == five


def test_usage_split_mid_utf8():
    name = "chat_stream_unicode.ndjson"
    data = read(name)
    start = data.index("\U0001f999".encode())
    for offset in (start + 1, start + 2, start + 3):
        assert measure(name, [data[:offset], data[offset:]]) == CASES[name][2]


@pytest.mark.parametrize("name", ["generate_stream.ndjson", "chat_stream.ndjson", "v1_chat_stream_usage.sse"])
def test_usage_missing_final_newline(name):
    assert measure(name, [read(name).rstrip(b"\n")]) == CASES[name][2]


@pytest.mark.parametrize(
    ("name", "first_line"),
    [
        ("generate_stream.ndjson", 0),
        ("chat_thinking_stream.ndjson", 0),  # a thinking line counts as content
        ("chat_tool_call_stream.ndjson", 0),  # so does a tool call
        ("v1_chat_stream_usage.sse", 0),
        ("v1_completions_stream_usage.sse", 0),
        ("pull_stream.ndjson", None),
        ("pull_unknown_model.ndjson", None),
    ],
)
def test_usage_has_content_set_by_first_content_line(name, first_line):
    meter = UsageMeter(CASES[name][0])
    seen = []
    for line in read(name).splitlines(keepends=True):
        meter.feed(line)
        seen.append(meter.has_content)
    assert (seen.index(True) if True in seen else None) == first_line


def test_usage_has_content_waits_for_text():
    lines = [
        b'{"model":"llama3.2","created_at":"2025-10-26T17:21:20.1Z","message":{"role":"assistant","content":""},"done":false}\n',
        b'{"model":"llama3.2","created_at":"2025-10-26T17:21:20.2Z","message":{"role":"assistant","content":"Hi"},"done":false}\n',
    ]
    meter = UsageMeter(NDJSON)
    meter.feed(lines[0][:50])
    meter.feed(lines[0][50:])
    assert meter.has_content is False
    meter.feed(lines[1])
    assert meter.has_content is True


def test_usage_json_body_has_content_after_result():
    meter = UsageMeter(NATIVE_JSON)
    meter.feed(read("generate.json"))
    assert meter.has_content is False  # nothing is decoded before the body ends
    meter.result()
    assert meter.has_content is True


@pytest.mark.parametrize(
    ("content_type", "status", "body"),
    [
        ("text/plain", 404, b"404 page not found"),
        ("text/plain", 405, b"405 method not allowed"),
        ("", 403, b""),  # Host or Origin rejected: empty body
        (NATIVE_JSON, 403, b""),
        ("text/plain; charset=utf-8", 200, b"Ollama is running"),
        ("application/octet-stream", 200, b'{"eval_count":5}\n'),
    ],
)
def test_usage_nothing_to_count(content_type, status, body):
    meter = UsageMeter(content_type, status)
    meter.feed(body)
    assert meter.result() == Usage()


def test_usage_sse_error_event():
    body = read("v1_chat_stream_no_usage.sse").split(b"\n\n")[0] + b"\n\n"
    body += b'data: {"error":{"message":"boom","type":"api_error","param":null,"code":null}}\n\n'
    meter = UsageMeter(SSE)
    meter.feed(body)
    assert meter.result() == Usage(error_message="boom", response_preview="Hel", model="llama3.2")


def test_usage_sse_event_lines_are_tolerated_and_the_messages_estimate_is_no_count():
    # /v1/messages: message_start's input count is Ollama's estimate from the request (anthropic/anthropic.go),
    # so a stream that never reaches message_delta has no counts; event:, comment, id: and retry: lines are skipped
    body = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"llama3.2",'
        b'"usage":{"input_tokens":26,"output_tokens":0}}}\n\n'
        b"event: ping\ndata: {}\n\n: a comment\nid: 7\nretry: 10\n\n"
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    meter = UsageMeter(SSE)
    meter.feed(body)
    assert meter.result() == Usage(is_complete=True, model="llama3.2")


def responses_event(kind: str, fields: str) -> bytes:
    """One /v1/responses SSE event as Ollama frames it (event: line, data: line, blank line)."""
    return b'event: %s\ndata: {%s,"type":"%s"}\n\n' % (kind.encode(), fields.encode(), kind.encode())


def test_usage_responses_incomplete_is_cut_short_not_failed():
    # The OpenAI API's response.incomplete (Ollama's own server never sends it; a relayed cloud answer may)
    body = (
        responses_event("response.created", '"response":{"model":"gpt-oss:120b","status":"in_progress"}')
        + responses_event("response.output_text.delta", '"delta":"Hi"')
        + responses_event("response.incomplete", '"response":{"model":"gpt-oss:120b","status":"incomplete",'
                          '"incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":9,'
                          '"output_tokens":16,"input_tokens_details":{"cached_tokens":8}}}')
    )  # fmt: skip
    expected = Usage(input_tokens=9, output_tokens=16, cached_input_tokens=8, done_reason="max_output_tokens",
                     response_preview="Hi", model="gpt-oss:120b")  # fmt: skip
    for preview_chars in (200, 0):  # with preview_chars=0 the meter skips plain events on bytes
        meter = UsageMeter(SSE, preview_chars=preview_chars)
        meter.feed(body)
        assert meter.result() == replace(expected, response_preview=expected.response_preview[:preview_chars])


def test_usage_responses_error_event_is_an_upstream_error():
    body = responses_event("response.output_text.delta", '"delta":"Hi"') + responses_event(
        "error", '"code":"server_error","message":"The model failed","param":null,"sequence_number":3'
    )
    meter = UsageMeter(SSE)
    meter.feed(body)
    assert meter.result() == Usage(error_message="The model failed", response_preview="Hi")


def test_usage_messages_error_event_is_an_upstream_error():
    # Anthropic's stream error (the StreamErrorEvent shape in anthropic/anthropic.go), as a relayed cloud answer sends
    body = read("v1_messages_stream.sse").split(b"event: content_block_stop")[0]
    body += b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    meter = UsageMeter(SSE)
    meter.feed(body)
    assert meter.result() == Usage(error_message="Overloaded", model="qwen3:8b")


@pytest.mark.parametrize(("cached", "expected"), [(b"0", None), (b"1024", 1024)])
def test_usage_responses_cached_tokens_zero_is_unknown(cached, expected):
    # Ollama's Responses layer writes cached_tokens 0 whatever the cache did (openai/responses.go): 0 says nothing
    body = read("v1_responses.json").replace(b'"cached_tokens":0', b'"cached_tokens":' + cached)
    meter = UsageMeter(V1_JSON)
    meter.feed(body)
    assert meter.result() == replace(CASES["v1_responses.json"][2], cached_input_tokens=expected)


@pytest.mark.parametrize(
    ("name", "marker"),
    [
        ("v1_responses_stream.sse", b'"type":"response.reasoning_summary_text.delta"'),
        ("v1_responses_function_call_stream.sse", b'"type":"response.function_call_arguments.delta"'),
        ("v1_responses_stream_cut.sse", b'"type":"response.output_text.delta"'),
        ("v1_messages_stream.sse", b'"type":"thinking_delta"'),
        ("v1_messages_stream_cut.sse", b'"type":"text_delta"'),
        ("chat_cloud_stream.ndjson", b'"thinking":"'),
    ],
)
def test_usage_has_content_at_the_first_delta(name, marker):
    meter = UsageMeter(CASES[name][0])
    lines = read(name).splitlines(keepends=True)
    seen = []
    for line in lines:
        meter.feed(line)
        seen.append(meter.has_content)
    assert seen.index(True) == next(i for i, line in enumerate(lines) if marker in line)


def test_usage_takes_last_usage_and_ignores_zero_placeholder():
    chunk = b'data: {"choices":[{"text":"a","index":0,"finish_reason":null}],"usage":%s}\n\n'
    meter = UsageMeter(SSE)
    meter.feed(chunk % b'{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}')
    meter.feed(chunk % b'{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}')
    meter.feed(chunk % b'{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}')
    assert meter.result() == Usage(input_tokens=5, output_tokens=2, response_preview="aaa")


def test_usage_bad_counts_are_ignored():
    line = (
        b'{"model":"m","response":"","done":true,"prompt_eval_count":1.5,"eval_count":-1,"total_duration":true,'
        b'"load_duration":"12","prompt_eval_duration":9223372036854775808,"eval_duration":null,"done_reason":7}\n'
    )
    meter = UsageMeter(NDJSON)
    meter.feed(line)
    assert meter.result() == Usage(is_complete=True, model="m")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"eval_count":' + b"9" * 5000 + b"}",
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'\xff\xfe\x00garbage\n\n\n{}\n[]\nnull\n"x"\n',
    ],
)
@pytest.mark.parametrize("content_type", [NDJSON, SSE, NATIVE_JSON])
def test_usage_garbage_does_not_raise(content_type, body):
    meter = UsageMeter(content_type)
    meter.feed(b"data: " + body.replace(b"\n", b"\ndata: ") if content_type == SSE else body)
    assert meter.result().input_tokens is None


def test_usage_invalid_utf8_keeps_counts():
    line = b'{"model":"m","response":"a\xffb","done":true,"eval_count":4,"eval_duration":2000000000}\n'
    meter = UsageMeter(NDJSON)
    meter.feed(line)
    assert meter.result() == Usage(
        output_tokens=4, eval_duration_ns=2000000000, is_complete=True, response_preview="a\ufffdb", model="m"
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "byte by byte"])
def test_usage_lone_surrogates_become_replacement_characters_as_in_go(chunked):
    body = (
        b'{"model":"m\\ud800","created_at":"2025-05-01T00:00:00Z","response":"a\\ud83d","done":false}\n'
        b'{"model":"m\\ud800","created_at":"2025-05-01T00:00:00Z","response":"\\ude00b","done":false}\n'
        b'{"model":"m","error":"bad \\udc00"}\n'
        b'{"model":"m","done":true,"done_reason":"stop\\ud800"}\n'
    )
    meter = UsageMeter("application/x-ndjson")
    for piece in [body[n : n + 1] for n in range(len(body))] if chunked else [body]:
        meter.feed(piece)
    found = meter.result()
    assert (found.model, found.response_preview) == ("m\ufffd", "a\ufffd\ufffdb")  # each half of the split pair
    assert (found.error_message, found.done_reason) == ("bad \ufffd", "stop\ufffd")


def test_usage_sse_and_json_lone_surrogates_as_in_go():
    sse = UsageMeter("text/event-stream")
    sse.feed(b'data: {"model":"m","choices":[{"delta":{"content":"x\\udbff"},"finish_reason":null}]}\n\n')
    body = UsageMeter("application/json")
    body.feed(b'{"model":"m\\udfff","message":{"role":"assistant","content":"\\ud800y"},"done":true}')
    assert sse.result().response_preview == "x\ufffd"
    assert (body.result().model, body.result().response_preview) == ("m\ufffd", "\ufffdy")


def final_line() -> tuple[bytes, bytes, bytes]:
    """Head, a middle piece to repeat, and tail of a generate final line with a long context."""
    head = b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24Z","response":"","done":true,"done_reason":"length",'
    middle = b"128006," * 1024
    tail = b'0],"total_duration":5,"load_duration":1,"prompt_eval_count":70000,"prompt_eval_duration":2,'
    return head + b'"context":[', middle, tail + b'"eval_count":9,"eval_duration":3}\n'


def test_usage_huge_line_costs_linear_time():
    piece = b"lorem ipsum " * 85  # 1020 bytes
    meter = UsageMeter(NDJSON, preview_chars=11)
    meter.feed(b'{"model":"llama3.2","created_at":"2025-10-26T17:15:24Z","response":"')
    for _ in range(10_000_000 // len(piece)):  # 1 KiB pieces of one 10 MB line: a quadratic carry would take minutes
        meter.feed(piece)
    meter.feed(b'","done":true,"done_reason":"length","eval_count":9}\n')
    assert meter.result() == Usage(
        output_tokens=9, done_reason="length", is_complete=True, response_preview="lorem ipsum", model="llama3.2"
    )


def test_usage_oversized_line_is_salvaged_from_its_edges():
    head, middle, tail = final_line()
    meter = UsageMeter(NDJSON)
    meter.feed(head)
    for _ in range(MAX_PARSE_BYTES // len(middle) + 1):
        meter.feed(middle)
    meter.feed(tail)
    assert meter.result() == Usage(
        input_tokens=70000, output_tokens=9, total_duration_ns=5, load_duration_ns=1, prompt_eval_duration_ns=2,
        eval_duration_ns=3, done_reason="length", is_complete=True, model="llama3.2",
    )  # fmt: skip


def test_usage_big_json_body_keeps_memory_bounded():
    piece = b"0.010071029," * 5000
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    try:
        meter = UsageMeter(NATIVE_JSON)
        meter.feed(b'{"model":"all-minilm","embeddings":[[')
        for _ in range(3 * MAX_PARSE_BYTES // len(piece)):
            meter.feed(piece[1:] + b"0")  # a new object each time, as from the network
        meter.feed(b'0.5]],"total_duration":14143917,"load_duration":1019500,"prompt_eval_count":8}')
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        if not tracing:
            tracemalloc.stop()
    assert held < 1024 * 1024 + 4 * EDGE_BYTES  # 48 MiB went through
    assert meter.result() == Usage(
        input_tokens=8, total_duration_ns=14143917, load_duration_ns=1019500, is_complete=True, model="all-minilm"
    )


def test_usage_properties():
    assert Usage(output_tokens=9, eval_duration_ns=1_500_000_000).tokens_per_second == 6.0
    assert Usage(output_tokens=9).tokens_per_second is None
    assert Usage(output_tokens=0, eval_duration_ns=5).tokens_per_second is None
    assert Usage(output_tokens=9, eval_duration_ns=0).tokens_per_second is None
    assert Usage(input_tokens=3, output_tokens=4).total_tokens == 7
    assert Usage(input_tokens=8).total_tokens == 8
    assert Usage(output_tokens=3).total_tokens == 3
    assert Usage().total_tokens is None


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given positions (taken modulo its length)."""
    edges = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def strip(pieces) -> bytes:
    """Run pieces through a fresh UsageStripper and return everything it forwarded."""
    stripper = UsageStripper()
    return b"".join(stripper.feed(piece) for piece in pieces) + stripper.flush()


@pytest.mark.parametrize(
    "name", ["v1_chat_stream_usage.sse", "v1_chat_stream_old_usage.sse", "v1_chat_stream_cached_usage.sse"]
)
def test_stripper_removes_usage_event_at_every_offset(name):
    data = read(name)
    usage_event = [event + b"\n\n" for event in data.split(b"\n\n") if b'"choices":[],"usage"' in event]
    assert len(usage_event) == 1
    expected = data.replace(usage_event[0], b"")
    for offset in range(len(data) + 1):
        assert strip([data[:offset], data[offset:]]) == expected, offset
    assert strip([data[i : i + 1] for i in range(len(data))]) == expected
    if name == "v1_chat_stream_usage.sse":
        assert expected == read("v1_chat_stream_no_usage.sse")


@pytest.mark.parametrize(
    "name",
    ["v1_chat_stream_no_usage.sse", "v1_chat_stream_midstream_error.sse", "v1_responses_stream.sse",
     "v1_messages_stream.sse"],
)  # fmt: skip
def test_stripper_leaves_other_streams_byte_identical(name):
    data = read(name)
    for offset in range(len(data) + 1):
        assert strip([data[:offset], data[offset:]]) == data, offset


def test_stripper_forwards_whole_events_only():
    event = b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    stripper = UsageStripper()
    assert stripper.feed(event[:30]) == b""
    assert stripper.feed(event[30:-1]) == b""
    assert stripper.feed(event[-1:] + event[:10]) == event
    assert stripper.flush() == event[:10]


def test_stripper_forwards_oversized_event_early():
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * (2 * MAX_EVENT_BYTES) + b'"}}]}\n\n'
    stripper = UsageStripper()
    first = stripper.feed(event[:-1])
    assert len(first) == len(event) - 2  # all but the byte that may start "\n\n"
    assert first + stripper.feed(event[-1:]) + stripper.flush() == event


USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
SSE_PARTS = [b"data: ", b"[DONE]", b"\n", b"\n\n", b"\n\n\n", b"event: x", b'"usage"', b"{}", b"\r", USAGE_EVENT]


@settings(max_examples=50, deadline=None, database=None)
@given(parts=st.lists(st.sampled_from(SSE_PARTS)), noise=st.binary(max_size=64), cuts=st.lists(st.integers(0, 400)))
def test_stripper_output_does_not_depend_on_chunking(parts, noise, cuts):
    data = b"".join(parts) + noise
    assert strip(cut(data, cuts)) == strip([data])
    if USAGE_EVENT not in data:
        assert strip([data]) == data


KEYS = ["model", "response", "message", "content", "thinking", "tool_calls", "done", "done_reason", "error", "message",
        "choices", "delta", "text", "finish_reason", "usage", "prompt_tokens", "completion_tokens", "prompt_eval_count",
        "eval_count", "eval_duration", "status", "type", "object", "output", "input_tokens", "output_tokens",
        "cache_read_input_tokens", "prompt_tokens_details", "cached_tokens", "incomplete_details", "reason",
        "stop_reason", "remote_model", "prompt_eval_cached_count"]  # fmt: skip
TYPES = ["message", "message_start", "content_block_delta", "message_delta", "message_stop", "text_delta", "error",
         "response.completed", "response.incomplete", "response.failed", "response.output_text.delta", "completed",
         "incomplete", "failed", "output_text", "text"]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(KEYS + TYPES + ["", "success"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None, database=None)
@given(
    content_type=st.sampled_from([NDJSON, SSE, NATIVE_JSON, "text/plain"]),
    status=st.sampled_from([200, 404, 500]),
    objects=st.lists(JSON_VALUES, max_size=6),
    noise=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
)
def test_usage_random_input_never_raises(content_type, status, objects, noise, cuts):
    prefix = b"data: " if content_type == SSE else b""
    body = b"".join(prefix + json.dumps(obj).encode() + b"\n" for obj in objects) + noise
    meter, whole = UsageMeter(content_type, status, preview_chars=7), UsageMeter(content_type, status, preview_chars=7)
    for piece in cut(body, cuts):
        meter.feed(piece)
    whole.feed(body)
    usage = meter.result()
    assert usage == whole.result()
    counts = [usage.input_tokens, usage.output_tokens, usage.eval_duration_ns, usage.total_duration_ns]
    assert all(value is None or (type(value) is int and value >= 0) for value in counts)
    assert len(usage.response_preview) <= 7


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=30), chat=st.booleans(), ascii_only=st.booleans())
def test_usage_intermediate_lines_read_on_bytes_give_the_decoded_text(texts, chat, ascii_only):
    lines = []
    for text in texts:
        part = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        line = {"model": "llama3.2", "created_at": "2025-10-26T17:15:24.097767Z", **part, "done": False}
        lines.append(json.dumps(line, separators=(",", ":"), ensure_ascii=ascii_only).encode() + b"\n")
    final = b'{"model":"llama3.2","done":true,"eval_count":3}\n'
    together, apart = UsageMeter(NDJSON), UsageMeter(NDJSON)
    with mock.patch("proxy_app.ollama.usage._decode", wraps=usage._decode) as decode:
        together.feed(b"".join(lines) + final)  # line by line, once the first line has named the model
        assert decode.call_count <= 2  # the first line (for the model) and the last; the rest were read on bytes
        for piece in (lines[0], b"".join(lines[1:]), final):  # the middle in one regex pass over the whole read
            apart.feed(piece)
        assert decode.call_count <= 4
    assert together.result().response_preview == apart.result().response_preview == "".join(texts)[:200]


def test_usage_a_read_of_plain_lines_and_one_other_reads_each_line():
    plain = b'{"model":"m","created_at":"t","response":"hi","done":false}\n'
    meter = UsageMeter(NDJSON)
    meter.feed(plain)
    meter.feed(plain + b'{"error":"model runner crashed"}\n' + plain)
    usage = meter.result()
    assert (usage.response_preview, usage.error_message, usage.is_complete) == ("hihihi", "model runner crashed", False)
