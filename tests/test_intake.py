"""What the client asked for, read from request bodies exactly as Ollama and its clients send them."""

from __future__ import annotations

import json

import pytest

from proxy_app.ollama.intake import Intake, read_intake, with_usage_requested


@pytest.mark.parametrize(
    ("path", "body", "stream"),
    [
        ("/api/generate", {"model": "m", "prompt": "p"}, True),  # absent means streaming (curl, the Go CLI)
        ("/api/generate", {"model": "m", "stream": None}, True),
        ("/api/generate", {"model": "m", "stream": False}, False),  # ollama-python and ollama-js always send this
        ("/api/chat", {"model": "m", "messages": []}, True),
        ("/api/pull", {"model": "m"}, True),
        ("/api/embed", {"model": "m", "input": "x"}, False),
        ("/v1/chat/completions", {"model": "m", "messages": []}, False),  # OpenAI semantics
        ("/v1/chat/completions", {"model": "m", "messages": [], "stream": True}, True),
    ],
)
def test_intake_stream_mode_follows_ollama_rules(path, body, stream):
    assert read_intake(path, json.dumps(body).encode()).stream_mode is stream


def test_intake_chat_last_user_message_and_parameters():
    body = {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second ✓"},
        ],
        "options": {"temperature": 0.2, "num_ctx": 4096},
        "keep_alive": "5m",
        "format": "json",
    }
    assert read_intake("/api/chat", json.dumps(body).encode()) == Intake(
        api="native",
        model="llama3.2",
        stream_mode=True,
        model_parameters='{"format":"json","keep_alive":"5m","temperature":0.2,"num_ctx":4096}',
        prompt="second ✓",
    )


def test_intake_openai_content_parts_and_usage_injection():
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    intake = read_intake("/v1/chat/completions", json.dumps(body).encode())
    assert (intake.api, intake.prompt, intake.wants_usage_injected) == ("openai", "hi", True)
    body["stream_options"] = {"include_usage": True}
    assert read_intake("/v1/chat/completions", json.dumps(body).encode()).wants_usage_injected is False


def test_intake_prompt_cut_to_1000_characters_not_bytes():
    intake = read_intake("/api/generate", json.dumps({"model": "m", "prompt": "é" * 1500}).encode())
    assert intake.prompt == "é" * 1000


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b"{" * 100000, b"\xff\xfe", b'{"model": 5}'])
def test_intake_garbage_never_raises(body):
    intake = read_intake("/api/generate", body)
    assert intake.model is None and intake.stream_mode is True


def test_intake_with_usage_requested_appends_last_key():
    spliced = with_usage_requested(b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}\n')
    original, added = b'{"model":"m","stream":true,"stream_options":{"include_usage":false}', b'"include_usage":true}}'
    assert spliced == original + b',"stream_options":{' + added + b"\n"
    assert json.loads(spliced)["stream_options"] == {"include_usage": True}  # the last duplicate wins, as in Go
    assert with_usage_requested(b"{ }") == b'{ "stream_options":{"include_usage":true}}'


def test_intake_model_from_v1_models_path():
    assert read_intake("/v1/models/llama3.2:latest", None).model == "llama3.2:latest"


# Go's encoding/json turns an escape that is no valid UTF-16 (a lone surrogate) and a byte that is no valid UTF-8 into
# U+FFFD; Python's json keeps the surrogate, which no UTF-8 database, file or socket accepts.
LONE_SURROGATES = b'{"model":"m\\ud800","prompt":"a\\udc00b\\ud83d","options":{"stop":["\\udfff"],"k\\ud800":1}}'


def test_intake_lone_surrogates_become_replacement_characters_as_in_go():
    intake = read_intake("/api/generate", LONE_SURROGATES)
    assert (intake.model, intake.prompt) == ("m\ufffd", "a\ufffdb\ufffd")
    assert intake.model_parameters == '{"stop":["\ufffd"],"k\ufffd":1}'
    assert read_intake("/api/generate", b'{"prompt":"\\ud83d\\ude00"}').prompt == "\U0001f600"  # a valid pair stays


def test_intake_chat_and_invalid_utf8_read_as_in_go():
    body = b'{"model":"m\xff","messages":[{"role":"user","content":[{"type":"text","text":"\\ud800 \xed\xa0\x80"}]}]}'
    intake = read_intake("/v1/chat/completions", body)
    assert (intake.model, intake.prompt) == ("m\ufffd", "\ufffd \ufffd\ufffd\ufffd")
    # Go replaces each byte of a cut-off sequence (Python's "replace" would give one U+FFFD for the two bytes).
    assert (
        read_intake("/api/generate", b'{"prompt":"a\xe2\x82b\xf0\x9f\x98"}').prompt
        == "a\ufffd\ufffdb\ufffd\ufffd\ufffd"
    )


# ---- finding 15: keys read as Go's encoding/json reads them ---------------------------------------------------
# Go matches a key to a field exactly, else case-insensitively (ASCII letters, long s with s, the Kelvin sign with k),
# and decodes every key that reaches a field in order: the last wins, null leaves a string or a bool as it is, an
# object merges into a map or a struct pointer, and an openai message merges into the element an earlier array left.


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/api/generate", b'{"model":"a","MODEL":"b","prompt":"x","PROMPT":"y"}', ("b", "y", True)),
        ("/api/generate", b'{"Model":"a","model":"b","\\u017ftream":false}', ("b", None, False)),  # long s
        ("/api/generate", b'{"model":"a","model":null,"Stream":null}', ("a", None, True)),  # null: string kept
        ("/api/chat", b'{"model":"m","Messages":[{"ROLE":"USER","Content":"hi"}]}', ("m", "hi", True)),
        ("/v1/chat/completions", b'{"model":"m","stream":true,"STREAM":null,"messages":[]}', ("m", None, True)),
        (
            "/v1/chat/completions",
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"MESSAGES":[{"content":"b"}]}',
            ("m", "b", False),
        ),  # fmt: skip
        (
            "/api/chat",
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"MESSAGES":[{"content":"b"}]}',
            ("m", None, True),
        ),  # fmt: skip
        (
            "/v1/messages",  # Anthropic's MessageParam has its own UnmarshalJSON: each element is built afresh
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"MESSAGES":[{"content":"b"}]}',
            ("m", None, False),
        ),
        (
            "/v1/chat/completions",
            b'{"messages":[{"role":"user","content":"a"}],"messages":[],"messages":[{}]}',
            (None, None, False),
        ),  # fmt: skip
        ("/api/generate", b'{"model":"a","prompt":"x"} {"model":"b"}', ("a", "x", True)),  # Go reads the first value
    ],
)
def test_intake_keys_read_as_go_reads_them(path, body, expected):
    intake = read_intake(path, body)
    assert (intake.model, intake.prompt, intake.stream_mode) == expected


@pytest.mark.parametrize(
    ("body", "injected"),
    [
        (b'{"model":"m","Stream":true,"messages":[]}', True),
        (b'{"model":"m","stream":true,"Stream_Options":{"Include_Usage":true}}', False),
        (b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"stream_options":{}}', False),  # merged
        (b'{"model":"m","stream":true,"stream_options":{"include_usage":true},"stream_options":null}', True),
        (b'{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_usage":null}}', False),
    ],
)
def test_intake_usage_injection_follows_go_keys(body, injected):
    intake = read_intake("/v1/chat/completions", body)
    assert intake.wants_usage_injected is injected
    if injected:  # the spliced key is the last one folding to stream_options: Go sets include_usage from it
        assert with_usage_requested(body).endswith(b',"stream_options":{"include_usage":true}}')


@pytest.mark.parametrize(
    ("path", "prompt"),
    [("/api/generate", "run this"), ("/api/chat", "recorded"), ("/api/embed", "embed this"), ("/x", "recorded")],
)
def test_intake_prompt_from_the_field_the_route_reads(path, prompt):
    # GenerateRequest has no messages and ChatRequest no prompt: Go ignores what the route's struct lacks.
    body = {"prompt": "run this", "input": "embed this", "messages": [{"role": "user", "content": "recorded"}]}
    assert read_intake(path, json.dumps(body).encode()).prompt == prompt


def test_intake_options_merge_with_exact_keys_and_parameters_fold():
    body = b'{"options":{"temperature":1},"OPTIONS":{"seed":2},"options":{"Temperature":3},"\\u212aeep_alive":"5m"}'
    intake = read_intake("/api/generate", body)
    assert intake.model_parameters == '{"keep_alive":"5m","temperature":1,"seed":2,"Temperature":3}'


def test_intake_with_usage_requested_keeps_bytes_after_the_object():
    body = b'{"model":"m","stream":true} trailing {"stream_options":{}}'
    assert read_intake("/v1/chat/completions", body).wants_usage_injected is True
    spliced = with_usage_requested(body)
    assert (
        spliced == b'{"model":"m","stream":true,"stream_options":{"include_usage":true}} trailing {"stream_options":{}}'
    )
