"""The dashboard's sign-in under gunicorn, as a real client and real workers see it: a body too big for the proxy's
own routes is refused before it is read, and relayed bodies keep their own, far larger limit."""

from __future__ import annotations

import socket

import requests

TOKEN = "s3cret-token"
ANNOUNCED_BYTES = 600 * 1024 * 1024


def test_dashboard_login_refuses_a_huge_form_before_reading_it(gunicorn_proxy):
    proxy = gunicorn_proxy(OLLAMA_PROXY_ADMIN_TOKEN=TOKEN)
    head = (
        "POST /analytics/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {ANNOUNCED_BYTES}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"token=guess&next=")  # a few bytes of the 600 MB announced, then silence
        answer = sock.recv(65536)  # a proxy that reads the whole body first never answers: the timeout fails this
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_dashboard_body_limit_leaves_relayed_bodies_alone(gunicorn_proxy, fake):
    proxy = gunicorn_proxy(OLLAMA_PROXY_ADMIN_TOKEN=TOKEN)
    prompt = "x" * (2 * 1024 * 1024)  # far above the proxy's own routes' limit, far below MAX_BODY_BYTES
    answer = requests.post(proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": prompt, "stream": False})
    assert answer.status_code == 200 and answer.json()["done"] is True
    assert fake.seen[-1]["body_len"] > len(prompt)
