"""The logic of the fake `ollama` executable (tests/bin/ollama), for the serve, run and supervisor tests.

``ollama serve`` runs the fake Ollama (tests/fake_ollama.py) on OLLAMA_HOST in the foreground. It crashes with exit
code 3 as soon as the file named by FAKE_OLLAMA_CRASH_FILE appears, deleting the file first so that the restarted
one keeps running. Any other subcommand makes one request through OLLAMA_HOST (``run MODEL PROMPT`` generates, the
others list the models), prints the answer and appends ``{"argv", "ollama_host", "status", "answer"}`` as a JSON
line to FAKE_OLLAMA_RECORD.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRASH_EXIT_CODE = 3


def serve() -> None:
    """Serve the fake Ollama on OLLAMA_HOST until killed (or crashed on purpose)."""
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    if os.environ.get("FAKE_OLLAMA_CRASH_FILE"):
        flag = Path(os.environ["FAKE_OLLAMA_CRASH_FILE"])
        threading.Thread(target=_crash_when_present, args=(flag,), daemon=True).start()
    sys.path.insert(0, str(ROOT))
    from tests.fake_ollama import main

    main(["--host", host, "--port", port])


def _crash_when_present(flag: Path) -> None:
    while not flag.exists():
        time.sleep(0.02)  # a test flag, polled; nothing to synchronise with
    flag.unlink()
    os._exit(CRASH_EXIT_CODE)


def client(argv: list[str]) -> int:
    """Make the one request this subcommand stands for, through OLLAMA_HOST, and record it."""
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    if argv[0] == "run":
        prompt = " ".join(argv[2:]) or "hello"
        body = json.dumps({"model": argv[1], "prompt": prompt, "stream": False}).encode()
        request = urllib.request.Request(f"http://{host}/api/generate", data=body, method="POST")
    else:
        request = urllib.request.Request(f"http://{host}/api/tags")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an HTTP_PROXY from the env
    try:
        with opener.open(request, timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    print(text)
    record = {"argv": argv, "ollama_host": host, "status": status, "answer": json.loads(text)}
    with open(os.environ["FAKE_OLLAMA_RECORD"], "a") as out:
        out.write(json.dumps(record) + "\n")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["serve"]:
        serve()
    else:
        sys.exit(client(arguments))
