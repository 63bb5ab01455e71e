"""Request bodies that are not plain JSON: zstd-compressed JSON and multipart forms, read as Ollama reads them.

Ollama decompresses ``Content-Encoding: zstd`` on its /v1 POST routes (Codex sends it to /v1/responses) and reads
the model of an audio transcription from a multipart form. The proxy decodes its own copy only, within the same
memory bound as a plain body, and relays the client's bytes.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest
import zstandard

from proxy_app.ollama.intake import Intake, read_intake
from tests.conftest import ROOT

CHAT = {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "gpt-oss:20b", "input": "write a haiku", "stream": True}


def zstd(document) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(document).encode())


def test_intake_zstd_body_read_where_ollama_decompresses():
    intake = read_intake("/v1/responses", zstd(RESPONSES), "zstd")
    assert (intake.model, intake.prompt, intake.stream_mode) == ("gpt-oss:20b", "write a haiku", True)
    chat = read_intake("/v1/chat/completions", zstd(CHAT), " zstd ")  # Go trims the header value
    assert (chat.model, chat.prompt, chat.wants_usage_injected) == ("llama3.2", "hi", False)  # relayed as sent


@pytest.mark.parametrize(
    ("path", "body", "encoding"),
    [
        ("/api/chat", zstd(CHAT), "zstd"),  # Ollama decompresses only on its /v1 routes
        ("/v1/chat/completions", zstd(CHAT), "ZSTD"),  # and only for exactly "zstd"
        ("/v1/chat/completions", b"\x28\xb5\x2f\xfd garbage", "zstd"),
        ("/v1/chat/completions", zstd(CHAT)[:-5], "zstd"),  # cut short
        ("/v1/chat/completions", json.dumps(CHAT).encode(), "zstd"),  # not compressed at all
    ],
)
def test_intake_zstd_body_ollama_cannot_read_is_recorded_without_fields(path, body, encoding):
    intake = read_intake(path, body, encoding)
    assert (intake.model, intake.prompt, intake.model_parameters, intake.wants_usage_injected) == (None,) * 3 + (False,)


def test_intake_other_encodings_are_read_as_the_bytes_they_are():
    # Go compares Content-Encoding with "zstd" only; any other value leaves the body as it is.
    assert read_intake("/v1/chat/completions", json.dumps(CHAT).encode(), "identity").wants_usage_injected is True


BOMB = """
import resource, sys, zstandard
from proxy_app.ollama.intake import read_intake
compressor = zstandard.ZstdCompressor().compressobj()
head = b'{"model":"bomb","messages":[{"role":"user","content":"'
body = compressor.compress(head) + b"".join(compressor.compress(b"a" * (1 << 20)) for _ in range(1024))
body += compressor.compress(b'"}]}') + compressor.flush()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
intake = read_intake("/v1/chat/completions", body, "zstd")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(body), (after - before) * 1024, intake.model)
"""


def test_intake_zstd_bomb_stops_at_the_limit():
    result = subprocess.run([sys.executable, "-c", BOMB], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    compressed, grown, model = result.stdout.split()
    assert int(compressed) < 1 << 20  # a 1 GiB document in well under 1 MiB
    assert int(grown) < 100 * 1024 * 1024 and model == "None"  # Ollama refuses past 20 MiB, and so does the reading


def _post(port: int, path: str, body: bytes, headers: dict) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("POST", path, body, headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


@pytest.mark.parametrize("body", [zstd(CHAT), b"\x28\xb5\x2f\xfd not zstd"], ids=["zstd", "broken"])
def test_intake_zstd_body_relayed_as_sent_and_recorded(live_proxy, fake, recorder, body):
    headers = {"Content-Type": "application/json", "Content-Encoding": "zstd"}
    status = _post(live_proxy.port, "/v1/chat/completions", body, headers)
    assert fake.seen[-1]["body"] == body and fake.seen[-1]["headers"]["Content-Encoding"] == "zstd"
    call = recorder.wait_for(1)[0]
    assert call.http_status == status and call.request_size_bytes == len(body)
    assert (call.model, call.prompt) == (("llama3.2", "hi") if body.startswith(zstd(CHAT)[:8]) else (None, None))


# ---- multipart forms (/v1/audio/transcriptions) ---------------------------------------------------------------

BOUNDARY = "----form7f3a"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart body of (name, value, filename) parts, as clients send it."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


AUDIO = b"RIFF" + bytes(range(256)) * 400  # about 100 kB, past the part of the body that is read


@pytest.mark.parametrize(
    ("body", "query", "model"),
    [
        (form(("model", b"whisper", None), ("file", AUDIO, "a.wav")), b"", "whisper"),
        (form(("file", b"x", "model"), ("response_format", b"json", None), ("model", b"w2", None)), b"", "w2"),
        (form(("file", AUDIO, "a.wav"), ("model", b"whisper", None)), b"", None),  # after 100 kB: not looked for
        (form(("model", b"whisper", None)), b"model=from-query&x=1", "from-query"),  # Go's FormValue: query first
        (b'--other\r\nContent-Disposition: form-data; name="model"\r\n\r\nw\r\n--other--\r\n', b"", None),
    ],
)
def test_intake_multipart_model_from_the_start_of_the_form(body, query, model):
    assert read_intake("/v1/audio/transcriptions", body, None, FORM_TYPE, query) == Intake(api="openai", model=model)


def test_intake_multipart_body_never_parsed_whole(live_proxy, fake, recorder):
    body = form(("model", b"whisper", None), ("file", AUDIO * 500, "a.wav"))  # 50 MB
    _post(live_proxy.port, "/v1/audio/transcriptions?language=en", body, {"Content-Type": FORM_TYPE})
    call = recorder.wait_for(1)[0]
    assert (call.model, call.request_size_bytes, fake.seen[-1]["body_len"]) == ("whisper", len(body), len(body))
