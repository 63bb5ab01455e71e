"""A full data disk under gunicorn: every relayed call still succeeds, no worker dies, and /health says degraded.

gunicorn's workers keep their Prometheus values in memory-mapped files; on a full disk a new series (a new model
label, say) needs a page the file system cannot give, and the kernel kills the worker with SIGBUS. The data disk here
is a 1 MB tmpfs, filled before the calls that create new series.
"""

from __future__ import annotations

import json
import os
import tempfile

import psutil
import requests

from proxy_app.service import metrics_dir
from tests.conftest import fill
from tests.fake_ollama import CATALOG
from tests.processes import wait_until

NEW_MODELS = 24  # each a new label on every per-model series, so new pages in every worker's metric files


def test_disk_full_gunicorn_workers_keep_relaying_and_health_says_degraded(tiny_disk, gunicorn_proxy, fake):
    for number in range(NEW_MODELS):
        fake.models[f"model{number}:latest"] = dict(CATALOG["llama3.2:latest"])
    proxy = gunicorn_proxy(workers=2, threads=8, OLLAMA_PROXY_DATA_DIR=str(tiny_disk),
                           OLLAMA_PROXY_WRITER_RETRY_SECONDS="1")  # fmt: skip
    arbiter = psutil.Process(proxy.process.pid)
    assert _generate(proxy.url, "llama3.2") == 200
    workers = {child.pid for child in arbiter.children()}
    assert len(workers) == 2 and fill(tiny_disk) > 0

    answers = []
    for number in range(2 * NEW_MODELS):  # each on a new connection, so both workers take some
        answers.append(_generate(proxy.url, f"model{number % NEW_MODELS}"))
        if answers[-1] != 200:
            break  # the rest would wait out their timeouts on workers that die as they boot
    assert answers == [200] * (2 * NEW_MODELS)
    assert {child.pid for child in arbiter.children()} == workers, "a worker died (and was replaced)"

    with requests.Session() as session:  # one kept-alive connection: the /health below comes from the same worker
        session.trust_env = False

        def degraded_writer() -> dict | None:
            assert _generate(proxy.url, "model0", session) == 200
            document = session.get(proxy.url + "/health", timeout=10).json()
            return document if document["status"] == "degraded" and not document["writer"]["ok"] else None

        document = wait_until(degraded_writer, timeout=20, interval=0.2, message="/health reporting the writer")
    assert document["writer"]["error"].startswith("OperationalError"), document["writer"]  # disk full, or I/O error
    assert document["upstream"]["reachable"] is True  # degraded for the disk, not the upstream


def _generate(url: str, model: str, session=requests) -> int | str:
    """One non-streaming /api/generate: its status once a whole done reply has arrived, or the error's name."""
    body = {"model": model, "prompt": "hi", "stream": False}
    try:
        answer = session.post(url + "/api/generate", json=body, timeout=10)
    except requests.RequestException as exc:  # a worker killed mid-call resets the connection
        return type(exc).__name__
    assert answer.status_code != 200 or json.loads(answer.content)["done"] is True
    return answer.status_code


def test_disk_full_metric_files_get_a_run_dir_of_their_own(tmp_path, monkeypatch):
    runtime, data_dir, blocked = tmp_path / "runtime", tmp_path / "data", tmp_path / "a-file"
    blocked.write_text("not a directory")
    dead = runtime / f"{metrics_dir.RUN_PREFIX}{2**22 + 1}-gone"  # above Linux's largest pid: never running
    alive = runtime / f"{metrics_dir.RUN_PREFIX}{os.getpid()}-live"
    dead.mkdir(parents=True)
    alive.mkdir()
    made = metrics_dir.create_run_dir({"RUNTIME_DIRECTORY": str(runtime)}, data_dir)
    assert made.parent == runtime and made.name.startswith(f"{metrics_dir.RUN_PREFIX}{os.getpid()}-")
    assert not dead.exists() and alive.exists()  # a dead run's directory goes, a live one's stays
    # No memory file system and no temporary directory: the data directory is the last resort.
    monkeypatch.setattr(metrics_dir, "MEMORY_DIRS", ())
    monkeypatch.setattr(tempfile, "tempdir", str(blocked / "tmp"))
    fallback = metrics_dir.create_run_dir({"XDG_RUNTIME_DIR": str(blocked / "run")}, data_dir)
    assert fallback.parent == data_dir
    metrics_dir.remove_run_dir(fallback)
    assert not fallback.exists() and data_dir.exists()
