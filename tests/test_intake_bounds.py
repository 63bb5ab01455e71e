"""Finding 6: reading a request body costs bounded memory and lets other calls run, whatever the body holds.

Each hostile body is 50 MB. Its memory cost is measured in a fresh interpreter (the peak RSS after building the body,
then after reading it); the effect on other calls is measured against the proxy under gunicorn.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from proxy_app.ollama.intake import read_intake
from tests.conftest import ROOT

SIZE = 50_000_000
PEAK_BUDGET_BYTES = 300 * 1024 * 1024
# Each builds a 50 MB /api/chat body whose model comes first and whose stream flag comes last.
HOSTILE = {
    "empty-arrays": "b'[' + b'[],' * ({n} // 3) + b'[]]'",
    "nested-arrays": "b'[' + (b'[' * 9000 + b']' * 9000 + b',') * ({n} // 18001) + b'0]'",
    "empty-objects-in-messages": None,  # messages: [{}, {}, ...]
    "one-huge-string": "b'\"' + b'x' * {n} + b'\"'",
    "escaped-string": "b'\"' + b'\\\\u00e9\\\\\"' * ({n} // 8) + b'\"'",
}
MEASURE = """
import resource, sys, time
sys.setrecursionlimit(1000)
from proxy_app.ollama.intake import read_intake
case, n = sys.argv[1], int(sys.argv[2])
if case == "empty-objects-in-messages":
    body = b'{"model":"big","messages":[' + b'{},' * (n // 3) + b'{"role":"user","content":"last"}],"stream":false}'
else:
    body = b'{"model":"big","junk":' + eval(sys.argv[3].format(n=n)) + b',"stream":false}'
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
intake = read_intake("/api/chat", body)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, intake.model, intake.stream_mode, intake.prompt)
"""


@pytest.mark.parametrize("case", HOSTILE)
def test_intake_hostile_body_memory_is_bounded(case):
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, case, str(SIZE), HOSTILE[case] or ""],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    grown, model, stream, prompt = result.stdout.split()
    assert int(grown) < PEAK_BUDGET_BYTES
    assert (model, stream) == ("big", "False")  # top-level keys before and after the 50 MB value are still read
    if case == "empty-objects-in-messages":
        assert prompt == "None"  # past 100,000 messages the prompt is not looked for


def test_intake_big_body_reads_fields_around_large_values():
    image = "A" * 3_000_000
    body = {
        "model": "llava",
        "messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x" * 200_000},
                     {"role": "user", "content": "describe " + "é" * 2000, "images": [image, image]}],
        "options": {"temperature": 0.1},
        "STREAM": False,
    }  # fmt: skip
    intake = read_intake("/api/chat", json.dumps(body).encode())
    assert (intake.model, intake.stream_mode, intake.model_parameters) == ("llava", False, '{"temperature":0.1}')
    assert intake.prompt == "describe " + "é" * 991


def _post_hostile(url: str, body: bytes, answers: list) -> None:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/api/ps", body, {"Content-Type": "application/json"})
        answers.append(connection.getresponse().status)
    finally:
        connection.close()


def test_intake_hostile_body_leaves_other_calls_answered(gunicorn_proxy, fake):
    proxy = gunicorn_proxy(threads=8)
    body = b'{"model":"big","junk":[' + b"[]," * (SIZE // 3) + b'[]],"stream":false}'
    answers: list = []
    sender = threading.Thread(target=_post_hostile, args=(proxy.url, body, answers))
    sender.start()
    slowest = 0.0
    with requests.Session() as session:
        while sender.is_alive():
            started = time.perf_counter()
            assert session.get(proxy.url + "/api/tags", timeout=10).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
    sender.join()
    assert answers == [405]  # the fake's answer to POST /api/ps, relayed
    assert slowest < 1.0


def test_intake_large_parameters_recorded_cut_but_valid():
    schema = {"type": "object", "description": "d" * 3_000_000}
    body = {"model": "m", "format": schema, "options": {"stop": ["x"] * 10**6}}
    parameters = read_intake("/api/generate", json.dumps(body).encode()).model_parameters
    recorded = json.loads(parameters)  # still JSON: strings are cut and items dropped, never the syntax
    assert recorded["format"]["type"] == "object" and recorded["format"]["description"].startswith("ddd")
    assert len(parameters) < 4200 and recorded["stop"] == []  # the room ran out before the options


def test_intake_bodies_in_memory_stay_within_the_process_budget(proxy_for):
    """However many threads the server runs, the bodies read into memory at once stay under BODY_MEMORY_BYTES: a call
    whose body does not fit gets 503 in the API's shape at once, and is recorded. The upstream here never reads, so
    the first call holds its 30 MB body while the second arrives."""
    import socket

    from proxy_app.state import state_of

    listener = socket.create_server(("127.0.0.1", 0))  # accepts in the kernel's backlog only: nothing is ever read
    port = listener.getsockname()[1]
    handle, app, recorder = proxy_for(f"http://127.0.0.1:{port}", MAX_BODY_BYTES=32 << 20, BODY_MEMORY_BYTES=48 << 20)
    body = b'{"model":"m","prompt":"' + b"x" * (30 << 20) + b'"}'
    budget = state_of(app).body_budget
    first = threading.Thread(target=lambda: requests.post(f"{handle.url}/api/generate", data=body, timeout=60))
    first.start()
    deadline = time.monotonic() + 30
    while budget.held < len(body):
        assert time.monotonic() < deadline, "the first body was never held"
        time.sleep(0.05)
    second = requests.post(f"{handle.url}/v1/completions", data=body, timeout=60)
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert "server busy" in second.json()["error"]["message"]
    listener.close()  # the first call's upstream goes away: it ends, and gives its bytes back
    first.join(60)
    assert budget.held == 0
    calls = recorder.wait_for(2)
    refused = [call for call in calls if call.http_status == 503]
    assert [(call.outcome, call.endpoint) for call in refused] == [("rejected", "/v1/completions")]
