"""The fake Ollama checked against the official clients and against the exact bytes of the wire-format note."""

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from proxy_app.ollama.usage import UsageMeter
from tests.fake_ollama import FakeOllama, serve

CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
METRICS = ["total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration"]  # fmt: skip
MESSAGES = [{"role": "user", "content": "why is the sky blue"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def served():
    """One fake on one port for the whole module (the `fake` fixture resets it per test)."""
    app = FakeOllama()
    handle = serve(app)
    yield app, handle
    handle.close()


@pytest.fixture
def fake(served):
    """The module's fake with default knobs and models (overrides conftest's fresh-server `fake`)."""
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served):
    return served[1].url


@pytest.fixture
def native(url):
    with ollama.Client(host=url) as client:
        yield client


@pytest.fixture
def oai(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(url):
    with anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as client:
        yield client


def exchange(url, method, path, body=None, headers=()) -> tuple[str, bytes]:
    """Send one HTTP/1.1 request on a raw socket and return (head, raw body) once the server closes."""
    payload = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {dict(headers).get('Host', url[7:])}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers if k != "Host"]
    if body is not None:
        lines.append(f"Content-Length: {len(payload)}")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(), rest


def dechunk(body: bytes) -> tuple[list[bytes], bool]:
    """Split a chunked body into its chunks; the flag says whether the terminating chunk arrived."""
    chunks = []
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks, True
        chunks.append(body[:size])
        body = body[size + 2 :]
    return chunks, False


def header(head: str, name: str):
    found = re.search(rf"^{name}: (.*)$", head, re.M | re.I)
    return found.group(1).strip() if found else None


# -- exact bytes ---------------------------------------------------------------------------------------------
def test_fake_ollama_version_exact_bytes(url, fake):
    head, body = exchange(url, "GET", "/api/version")
    assert head.startswith("HTTP/1.1 200 OK")
    assert header(head, "Content-Type") == "application/json; charset=utf-8"
    assert header(head, "Content-Length") == "20" and header(head, "Transfer-Encoding") is None
    assert body == b'{"version":"0.12.6"}'  # c.JSON: no trailing newline


def test_fake_ollama_root_404_405_redirect(url, fake):
    head, body = exchange(url, "GET", "/")
    assert (header(head, "Content-Type"), body) == ("text/plain; charset=utf-8", b"Ollama is running")
    head, body = exchange(url, "HEAD", "/")
    assert (head.split("\r\n")[0], header(head, "Content-Length"), body) == ("HTTP/1.1 200 OK", "17", b"")
    head, body = exchange(url, "GET", "/api/nothing")
    assert (head.split()[1], header(head, "Content-Type"), body) == ("404", "text/plain", b"404 page not found")
    head, body = exchange(url, "GET", "/api/generate")
    assert (head.split()[1], body) == ("405", b"405 method not allowed")
    head, _ = exchange(url, "GET", "/api/tags/?a=1")
    assert (head.split()[1], header(head, "Location")) == ("301", "/api/tags?a=1")
    head, _ = exchange(url, "POST", "/api/chat/", b"{}")
    assert head.split()[1] == "307"


def test_fake_ollama_host_check(url, fake):
    head, body = exchange(url, "GET", "/api/tags", headers=[("Host", "proxy.example.com")])
    assert (head.split()[1], header(head, "Content-Length"), body) == ("403", "0", b"")
    for allowed in ("localhost:11434", "192.168.1.5", "[::1]:80", "box.internal", "app.localhost"):
        assert exchange(url, "GET", "/api/version", headers=[("Host", allowed)])[0].split()[1] == "200", allowed


def test_fake_ollama_generate_stream_is_one_line_per_chunk(url, fake):
    head, body = exchange(url, "POST", "/api/generate", {"model": "llama3.2", "prompt": "why is the sky blue"})
    assert header(head, "Content-Type") == "application/x-ndjson"
    assert header(head, "Transfer-Encoding") == "chunked" and header(head, "Content-Length") is None
    chunks, complete = dechunk(body)
    assert complete and len(chunks) == len(fake.tokens) + 1
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for chunk in chunks)
    lines = [json.loads(chunk) for chunk in chunks]
    assert [list(line) for line in lines[:-1]] == [["model", "created_at", "response", "done"]] * len(fake.tokens)
    assert list(lines[-1]) == ["model", "created_at", "response", "done", "done_reason", "context", *METRICS]
    assert all(CREATED_AT.match(line["created_at"]) for line in lines)
    assert "".join(line["response"] for line in lines) == "The sky is blue."
    final = lines[-1]
    assert (final["prompt_eval_count"], final["eval_count"]) == (fake.expected_prompt_tokens("why is the sky blue"), 5)
    assert all(isinstance(final[m], int) for m in METRICS)


def test_fake_ollama_escapes_like_go_and_omits_zero_metrics(url, fake):
    fake.tokens = ["<b>", " &", "\u2028", " é"]
    _, body = exchange(url, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False})
    assert rb'"response":"\u003cb\u003e \u0026\u2028 \u00e9"' in body
    assert "\u2028".encode() not in body and not body.endswith(b"\n")
    fake.tokens = []
    _, body = exchange(url, "POST", "/api/chat", {"model": "llama3.2", "messages": MESSAGES, "stream": False})
    assert b"eval_count" not in body.replace(b"prompt_eval_count", b"") and b'"prompt_eval_count":' in body


def test_fake_ollama_small_replies_keep_the_connection(served, fake):
    connection = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=5)
    for path in ("/api/version", "/api/tags", "/"):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") and response.read()
    assert connection.sock is not None  # still the first connection
    connection.close()


# -- the official Python client ------------------------------------------------------------------------------
def test_fake_ollama_client_generate_and_chat(native, fake):
    parts = list(native.generate(model="llama3.2", prompt="why is the sky blue", stream=True))
    assert "".join(part.response for part in parts) == "The sky is blue." and parts[-1].done
    assert all(part.eval_count is None and not part.done for part in parts[:-1])
    assert parts[-1].prompt_eval_count == fake.expected_prompt_tokens("why is the sky blue")
    whole = native.generate(model="llama3.2:latest", prompt="why is the sky blue", system="be brief")
    assert whole.response == "The sky is blue." and whole.done_reason == "stop"
    assert whole.prompt_eval_count == fake.expected_prompt_tokens("be brief why is the sky blue")
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count
    chunks = list(native.chat(model="llama3.2", messages=MESSAGES, stream=True))
    assert "".join(c.message.content for c in chunks) == "The sky is blue." and chunks[-1].done_reason == "stop"
    reply = native.chat(model="llama3.2", messages=MESSAGES, options={"num_predict": 2})
    assert (reply.message.role, reply.message.content, reply.done_reason) == ("assistant", "The sky", "length")
    assert (reply.prompt_eval_count, reply.eval_count) == (fake.expected_chat_prompt_tokens(MESSAGES), 2)


def test_fake_ollama_client_thinking_and_tools(native, fake):
    chunks = list(native.chat(model="qwen3", messages=MESSAGES, think=True, stream=True))
    assert "".join(c.message.thinking or "" for c in chunks[:4]) == "Let me think."
    assert chunks[-1].eval_count == fake.expected_eval_tokens(think=True)
    with pytest.raises(ollama.ResponseError, match="does not support thinking") as caught:
        native.chat(model="llama3.2", messages=MESSAGES, think=True)
    assert caught.value.status_code == 400
    reply = native.chat(model="llama3.2", messages=MESSAGES, tools=[WEATHER_TOOL])
    call = reply.message.tool_calls[0].function
    assert (call.name, call.arguments, reply.eval_count) == ("get_weather", {"city": "Paris"}, 1)
    answered = MESSAGES + [reply.message.model_dump(exclude_none=True), {"role": "tool", "content": "sunny"}]
    assert native.chat(model="llama3.2", messages=answered, tools=[WEATHER_TOOL]).message.content == "The sky is blue."


def test_fake_ollama_load_and_unload_are_plain_json(url, native, fake):
    assert native.generate(model="llama3.2", prompt="").done_reason == "load"
    assert native.chat(model="llama3.2", messages=[]).done_reason == "load"
    assert native.generate(model="llama3.2", prompt="", keep_alive=0).done_reason == "unload"
    head, body = exchange(url, "POST", "/api/chat", {"model": "llama3.2"})  # stream unset: still not NDJSON
    assert header(head, "Content-Type") == "application/json; charset=utf-8" and header(head, "Content-Length")
    assert list(json.loads(body)) == ["model", "created_at", "message", "done", "done_reason"]


def test_fake_ollama_client_embed_show_list_ps(url, native, fake):
    assert native.ps().models == []
    inputs = ["one two", "three"]
    embedded = native.embed(model="all-minilm", input=inputs)
    assert [len(v) for v in embedded.embeddings] == [384, 384]
    assert abs(sum(x * x for x in embedded.embeddings[0]) - 1) < 1e-5
    expected = fake.expected_embed_tokens(inputs)
    assert embedded.prompt_eval_count == expected == sum(map(fake.expected_prompt_tokens, inputs))
    assert native.embed(model="all-minilm", input="one", dimensions=8).embeddings[0].__len__() == 8
    legacy = native.embeddings(model="all-minilm", prompt="one")
    assert len(legacy.embedding) == 384 and list(legacy.model_dump(exclude_none=True)) == ["embedding"]
    shown = native.show("llama3.2")
    assert shown.modelinfo["general.architecture"] == "llama" and "tools" in shown.capabilities
    head, body = exchange(url, "POST", "/api/show", {"model": "llama3.2"})
    assert header(head, "Transfer-Encoding") == "chunked" and b"\\u003c|eot_id|\\u003e" in body  # > 2 KiB
    names = [m.model for m in native.list().models]
    assert {"llama3.2:latest", "all-minilm:latest"} <= set(names)
    native.generate(model="llama3.2", prompt="hi", keep_alive="10m")
    loaded = {m.model: m for m in native.ps().models}
    assert set(loaded) == {"all-minilm:latest", "llama3.2:latest"} and loaded["llama3.2:latest"].size_vram
    assert 590 < (loaded["llama3.2:latest"].expires_at - datetime.now(UTC)).total_seconds() <= 600
    with pytest.raises(ollama.ResponseError, match='model "nope" not found, try pulling it first'):
        native.embed(model="nope", input="x")


def test_fake_ollama_client_pull_push_create_copy_delete(native, fake):
    statuses = [part.status for part in native.pull("llama3.2", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success" and "verifying sha256 digest" in statuses
    assert native.pull("all-minilm").status == "success"
    with pytest.raises(ollama.ResponseError, match="pull model manifest: file does not exist") as caught:
        list(native.pull("no-such-model", stream=True))
    assert caught.value.status_code == -1  # an error line inside a 200 stream
    with pytest.raises(ollama.ResponseError) as caught:
        native.pull("no-such-model")
    assert caught.value.status_code == 500
    assert [p.status for p in native.push("llama3.2", stream=True)][-1] == "success"
    assert [p.status for p in native.create(model="mine", from_="llama3.2", stream=True)][-1] == "success"
    assert native.copy("llama3.2", "llama3.2-copy").status == "success"
    assert {"mine:latest", "llama3.2-copy:latest"} <= {m.model for m in native.list().models}
    assert native.delete("llama3.2-copy").status == "success"
    with pytest.raises(ollama.ResponseError, match="model 'llama3.2-copy' not found") as caught:
        native.delete("llama3.2-copy")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match='model "ghost" not found'):
        native.copy("ghost", "x")


def test_fake_ollama_blobs(url, native, fake, tmp_path):
    blob = bytes(range(256)) * (12 * 1024)  # 3 MiB
    (tmp_path / "blob").write_bytes(blob)
    digest = native.create_blob(tmp_path / "blob")
    assert digest in fake.blobs
    assert (fake.seen[-1]["body_len"], fake.seen[-1]["body"]) == (len(blob), None)
    assert exchange(url, "HEAD", f"/api/blobs/{digest}")[0].split()[1] == "200"
    assert exchange(url, "HEAD", "/api/blobs/sha256:" + "0" * 64)[0].split()[1] == "404"
    assert exchange(url, "POST", f"/api/blobs/{digest}", blob[:10])[0].split()[1] == "200"  # already present
    head, body = exchange(url, "POST", "/api/blobs/sha256:" + "0" * 64, b"abc")
    assert head.split()[1] == "400"
    assert json.loads(body)["error"].startswith('digest mismatch, expected "sha256:000')


# -- the official OpenAI client ------------------------------------------------------------------------------
def test_fake_ollama_openai_chat(oai, fake):
    reply = oai.chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert reply.choices[0].message.content == "The sky is blue." and reply.choices[0].finish_reason == "stop"
    assert reply.system_fingerprint == "fp_ollama" and reply.id.startswith("chatcmpl-")
    prompt = fake.expected_chat_prompt_tokens(MESSAGES)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 5, prompt + 5)
    chunks = list(oai.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.role is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The sky is blue."
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content is None
    assert all(c.usage is None for c in chunks)
    opts = {"include_usage": True}
    with_usage = list(oai.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True,
                                                  stream_options=opts))  # fmt: skip
    assert len(with_usage) == len(chunks) + 1 and with_usage[-1].choices == []
    assert with_usage[-1].usage.total_tokens == prompt + 5
    tool = oai.chat.completions.create(model="llama3.2", messages=MESSAGES, tools=[WEATHER_TOOL])
    assert tool.choices[0].finish_reason == "tool_calls"
    assert json.loads(tool.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_fake_ollama_openai_completions_embeddings_models(oai, fake):
    assert oai.completions.create(model="llama3.2", prompt="once upon").choices[0].text == "The sky is blue."
    chunks = list(oai.completions.create(model="llama3.2", prompt="once upon", stream=True,
                                         stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.usage.total_tokens == 0 for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == fake.expected_prompt_tokens("once upon")
    embedded = oai.embeddings.create(model="all-minilm", input=["one two", "three"])  # base64 on the wire
    assert [len(d.embedding) for d in embedded.data] == [384, 384]
    expected = fake.expected_embed_tokens(["one two", "three"])
    assert embedded.usage.prompt_tokens == embedded.usage.total_tokens == expected
    assert "llama3.2:latest" in [m.id for m in oai.models.list()]
    model = oai.models.retrieve("llama3.2")
    assert (model.id, model.owned_by, model.object) == ("llama3.2", "library", "model")
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_fake_ollama_openai_stream_bytes_and_legacy_layout(url, fake):
    request = {"model": "llama3.2", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    head, body = exchange(url, "POST", "/v1/chat/completions", request)
    chunks, complete = dechunk(body)
    assert header(head, "Content-Type") == "text/event-stream" and complete
    assert all(c.startswith(b"data: {") and c.endswith(b"}\n\n") for c in chunks[:-1])
    finish, usage, done = chunks[-1].split(b"\n\n")[:3]
    assert b'"delta":{},"finish_reason":"stop"' in finish and b'"choices":[],"usage"' in usage
    assert done == b"data: [DONE]"
    fake.v1_legacy_layout = True
    _, body = exchange(url, "POST", "/v1/chat/completions", {**request, "stream_options": None})
    events = [json.loads(e[6:]) for e in b"".join(dechunk(body)[0]).split(b"\n\n") if e.startswith(b"data: {")]
    assert all(e["choices"][0]["delta"]["role"] == "assistant" for e in events)
    last = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
    assert events[-1]["choices"][0] == last
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_fake_ollama_error_shapes(url, fake):
    chat = {"model": "nope", "messages": MESSAGES}
    head, body = exchange(url, "POST", "/v1/chat/completions", chat)
    assert (head.split()[1], header(head, "Content-Type")) == ("404", "application/json")
    error = {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}
    assert body == json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n"
    head, body = exchange(url, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": []})
    assert (head.split()[1], header(head, "Content-Type")) == ("400", "application/json; charset=utf-8")
    assert json.loads(body)["error"]["type"] == "invalid_request_error" and not body.endswith(b"\n")
    assert exchange(url, "POST", "/api/generate", b"")[1] == b'{"error":"missing request body"}'
    head, body = exchange(url, "POST", "/api/chat", b"{nope")
    assert head.split()[1] == "400" and b"invalid character" in body
    head, body = exchange(url, "POST", "/api/generate", {"model": "nope", "prompt": "x"})
    assert (head.split()[1], body) == ("404", b'{"error":"model \'nope\' not found"}')


def test_fake_ollama_openai_responses(oai, fake):
    reply = oai.responses.create(model="llama3.2", input="why is the sky blue")
    prompt = fake.expected_prompt_tokens("why is the sky blue")
    assert (reply.output_text, reply.status, reply.usage.input_tokens, reply.usage.output_tokens) == (
        "The sky is blue.", "completed", prompt, 5
    )  # fmt: skip
    events = list(oai.responses.create(model="qwen3", input="why is the sky blue", stream=True,
                                       reasoning={"effort": "low"}))  # fmt: skip
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The sky is blue."
    assert kinds.count("response.reasoning_summary_text.delta") == 4
    assert events[-1].response.usage.output_tokens == fake.expected_eval_tokens(think=True)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    called = oai.responses.create(model="llama3.2", input="weather in Paris?", tools=[tool])
    assert (called.output[0].type, json.loads(called.output[0].arguments)) == ("function_call", {"city": "Paris"})


def test_fake_ollama_responses_stream_bytes(url, fake):
    request = {"model": "llama3.2", "input": "hi", "stream": True}
    head, body = exchange(url, "POST", "/v1/responses", request)
    chunks, complete = dechunk(body)
    assert (header(head, "Content-Type"), header(head, "Cache-Control"), complete) == (
        "text/event-stream", "no-cache", True
    )  # fmt: skip
    events = b"".join(chunks).split(b"\n\n")
    assert events[-1] == b"" and all(e.startswith(b"event: response.") for e in events[:-1])
    name, data = events[-2].split(b"\n")
    assert name == b"event: response.completed" and b"[DONE]" not in body
    keys = list(json.loads(data[6:])["response"])
    assert keys == sorted(keys)  # a Go map: sorted keys
    fake.error_after = 2
    _, body = exchange(url, "POST", "/v1/responses", request)
    assert b"response.completed" not in body and body.count(b"event: response.output_text.delta") == 2


def test_fake_ollama_anthropic_messages(claude, fake):
    messages = [{"role": "user", "content": "why is the sky blue"}]
    reply = claude.messages.create(model="llama3.2", max_tokens=64, messages=messages)
    assert (reply.content[0].text, reply.stop_reason) == ("The sky is blue.", "end_turn")
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (fake.expected_chat_prompt_tokens(messages), 5)
    with claude.messages.stream(model="qwen3", max_tokens=64, messages=messages,
                                thinking={"type": "enabled", "budget_tokens": 32}) as stream:  # fmt: skip
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == ("Let me think.", "The sky is blue.")
    assert final.usage.output_tokens == fake.expected_eval_tokens(think=True)
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    called = claude.messages.create(model="llama3.2", max_tokens=64, messages=messages, tools=[tool])
    assert (called.stop_reason, called.content[0].type, called.content[0].input) == ("tool_use", "tool_use",
                                                                                     {"city": "Paris"})  # fmt: skip
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="nope", max_tokens=64, messages=messages)
    assert caught.value.body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    with pytest.raises(anthropic.BadRequestError, match="max_tokens is required"):
        claude.messages.create(model="llama3.2", max_tokens=0, messages=messages)


def test_fake_ollama_messages_stream_estimate_and_failure(url, fake):
    request = {"model": "llama3.2", "max_tokens": 64, "messages": MESSAGES, "stream": True}
    _, body = exchange(url, "POST", "/v1/messages", request)
    events = [json.loads(line[6:]) for line in b"".join(dechunk(body)[0]).split(b"\n") if line.startswith(b"data:")]
    start, delta = events[0]["message"]["usage"], events[-2]["usage"]
    assert start["input_tokens"] != delta["input_tokens"] == fake.expected_chat_prompt_tokens(MESSAGES)
    assert events[-1] == {"type": "message_stop"}
    fake.error_after = 1
    _, body = exchange(url, "POST", "/v1/messages", request)
    assert b"message_delta" not in body and b"message_stop" not in body and body.count(b"text_delta") == 1


def test_fake_ollama_cached_tokens_and_cloud_model(url, oai, claude, fake):
    fake.cached_tokens = 8
    _, body = exchange(url, "POST", "/api/chat", {"model": "llama3.2", "messages": MESSAGES, "stream": False})
    assert list(json.loads(body))[-5:-2] == ["prompt_eval_count", "prompt_eval_cached_count", "prompt_eval_duration"]
    usage = oai.chat.completions.create(model="llama3.2", messages=MESSAGES).usage
    assert usage.prompt_tokens_details.cached_tokens == 8
    assert oai.responses.create(model="llama3.2", input="hi").usage.input_tokens_details.cached_tokens == 8
    messages = [{"role": "user", "content": "why is the sky blue"}]
    claude_usage = claude.messages.create(model="llama3.2", max_tokens=64, messages=messages).usage
    prompt = fake.expected_chat_prompt_tokens(messages)
    assert (claude_usage.input_tokens, claude_usage.cache_read_input_tokens) == (prompt - 8, 8)
    fake.cached_tokens = None
    assert oai.chat.completions.create(model="llama3.2", messages=MESSAGES).usage.prompt_tokens_details is None
    cloud = {"model": "gpt-oss:120b-cloud", "messages": MESSAGES}
    _, body = exchange(url, "POST", "/api/chat", cloud)
    lines = [json.loads(line) for line in b"".join(dechunk(body)[0]).splitlines()]
    assert all(list(line)[:4] == ["model", "remote_model", "remote_host", "created_at"] for line in lines)
    head, body = exchange(url, "POST", "/api/chat", {**cloud, "stream": False})
    assert header(head, "Content-Type") == "application/json; charset=utf-8" and body.endswith(b"}\n")
    tags = json.loads(exchange(url, "GET", "/api/tags")[1])["models"]
    assert [list(t)[:4] for t in tags if t["name"] == "gpt-oss:120b-cloud"] == [
        ["name", "model", "remote_model", "remote_host"]
    ]


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/v1/responses", {"model": "qwen3", "input": "why", "stream": True, "reasoning": {"effort": "low"}}),
        ("/v1/responses", {"model": "llama3.2", "input": "why"}),
        ("/v1/messages", {"model": "llama3.2", "max_tokens": 9, "messages": MESSAGES, "stream": True}),
        ("/v1/messages", {"model": "llama3.2", "max_tokens": 9, "messages": MESSAGES}),
        ("/api/chat", {"model": "gpt-oss:120b-cloud", "messages": MESSAGES, "think": True}),
    ],
)
def test_fake_ollama_answers_meter_like_ollama(url, fake, path, request_body):
    # The fake's new formats, fed to the proxy's meter: every count the fake sent is read back
    fake.cached_tokens = 4
    head, body = exchange(url, "POST", path, request_body)
    meter = UsageMeter(header(head, "Content-Type"))
    meter.feed(b"".join(dechunk(body)[0]) if header(head, "Transfer-Encoding") else body)
    usage = meter.result()
    think = request_body.get("think") or "reasoning" in request_body
    prompt = (
        fake.expected_prompt_tokens("why") if path == "/v1/responses" else fake.expected_chat_prompt_tokens(MESSAGES)
    )
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) == (
        prompt, fake.expected_eval_tokens(think=bool(think)), 4
    )  # fmt: skip
    assert usage.is_complete and usage.response_preview == "The sky is blue." and meter.has_content
    assert (usage.remote_model is not None) == (path == "/api/chat")


# -- knobs and observability ---------------------------------------------------------------------------------
def test_fake_ollama_error_after(url, native, fake):
    fake.error_after = 2
    parts = []
    with pytest.raises(ollama.ResponseError, match="an error was encountered while running the model"):
        parts.extend(native.generate(model="llama3.2", prompt="x", stream=True))
    assert len(parts) == 2
    with pytest.raises(ollama.ResponseError) as caught:
        native.chat(model="llama3.2", messages=MESSAGES)
    assert caught.value.status_code == 500
    _, body = exchange(url, "POST", "/v1/chat/completions", {"model": "llama3.2", "messages": MESSAGES, "stream": True})
    chunks, complete = dechunk(body)
    assert complete and len(chunks) == 3 and b"[DONE]" not in body  # the error became an empty chunk
    assert json.loads(chunks[-1][6:])["model"] == ""


def test_fake_ollama_cut_after_drops_the_connection(served, fake):
    _, body = exchange(served[1].url, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x"},
                       headers=[("X-Fake-Cut-After", "2")])  # fmt: skip
    chunks, complete = dechunk(body)
    assert (len(chunks), complete) == (2, False)
    connection = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=5)
    connection.request("POST", "/api/chat", json.dumps({"model": "llama3.2", "messages": MESSAGES}),
                       headers={"X-Fake-Cut-After": "9"})  # fmt: skip
    with pytest.raises(http.client.IncompleteRead):
        connection.getresponse().read()  # every line arrived, the terminating chunk did not
    connection.close()
    fake.wait_for(lambda: fake.aborted == 2)


def test_fake_ollama_fail_status_and_omit_done(native, oai, fake):
    for status, message in [(503, "server busy"), (500, "llama runner"), (404, "model 'llama3.2' not found")]:
        fake.fail_status = status
        with pytest.raises(ollama.ResponseError, match=message) as caught:
            list(native.generate(model="llama3.2", prompt="x", stream=True))
        assert caught.value.status_code == status
    fake.fail_status = 500
    with pytest.raises(openai.InternalServerError) as caught:
        oai.chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert caught.value.body["type"] == "api_error"
    fake.fail_status, fake.omit_done = None, True
    parts = list(native.chat(model="llama3.2", messages=MESSAGES, stream=True))
    assert len(parts) == len(fake.tokens) and not parts[-1].done


def test_fake_ollama_delays_and_token_header(served, fake):
    connection = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=5)
    headers = {"X-Fake-Load-Delay": "0.1", "X-Fake-Token-Delay": "0.02", "X-Fake-Tokens": "8"}
    started = time.monotonic()
    connection.request("POST", "/api/generate", json.dumps({"model": "llama3.2", "prompt": "x"}), headers=headers)
    response = connection.getresponse()
    first_byte = time.monotonic() - started
    lines = [json.loads(line) for line in response.read().splitlines()]
    total = time.monotonic() - started
    connection.close()
    assert 0.1 <= first_byte < 3.0 and total >= 0.1 + 8 * 0.02 and len(lines) == 9
    final = lines[-1]
    assert (final["eval_count"], final["load_duration"], final["eval_duration"]) == (8, 100_000_000, 160_000_000)
    assert fake.tokens == ["The", " sky", " is", " blue", "."]  # the header changed only that request


def test_fake_ollama_seen_completed_and_cancelled(served, fake):
    fake.tokens, fake.token_delay = ["tok"] * 100, 0.02
    with socket.create_connection(("127.0.0.1", served[1].port)) as sock:
        body = b'{"model":"llama3.2","prompt":"hi"}'
        sock.sendall(b"POST /api/generate?x=1 HTTP/1.1\r\nHost: localhost\r\nX-Custom: kept\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        received = b""
        while received.count(b"\n") < 12:
            received += sock.recv(4096)
    fake.wait_for(lambda: fake.cancelled == 1)
    seen = fake.seen[-1]
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == ("POST", "/api/generate", "x=1", body)
    assert seen["headers"]["X-Custom"] == "kept" and seen["body_len"] == len(body)
    exchange(served[1].url, "GET", "/api/version")
    fake.wait_for(lambda: fake.completed == 1)


def test_fake_ollama_main_runs_in_foreground():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).with_name("fake_ollama.py")
    process = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--tokens", "3"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.02)  # retry back-off while the interpreter starts
        with ollama.Client(host=f"http://127.0.0.1:{port}") as client:
            assert client.generate(model="llama3.2", prompt="x").eval_count == 3
    finally:
        process.terminate()
        process.wait(5)
