"""The dashboard's sign-in under gunicorn, as a real client and real workers see it: a body too big for the proxy's
own routes is refused before it is read (relayed bodies keep their own, far larger limit), and the failed sign-ins
and sessions of one worker hold in every other."""

from __future__ import annotations

import socket

import requests

TOKEN = "s3cret-token"
ANNOUNCED_BYTES = 600 * 1024 * 1024


HEAD = "POST /analytics/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"


def first_answer(port: int, request: bytes) -> bytes:
    """Send ``request`` (a body that never ends) and return the first bytes of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536)  # a proxy that waits for the whole body never answers: the timeout fails the test


def test_dashboard_login_refuses_a_huge_form_before_reading_it(gunicorn_proxy):
    proxy = gunicorn_proxy(OLLAMA_PROXY_ADMIN_TOKEN=TOKEN)
    announced = f"{HEAD}Content-Length: {ANNOUNCED_BYTES}\r\n\r\ntoken=guess&next="  # a few bytes of 600 MB
    answer = first_answer(proxy.port, announced.encode())
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_dashboard_login_reads_no_more_than_the_limit_of_an_endless_chunked_form(gunicorn_proxy):
    """Without a length there is nothing to refuse up front: the form is read up to the limit and answered (werkzeug
    ends an url-encoded form at the limit), while the client is still sending."""
    proxy = gunicorn_proxy(OLLAMA_PROXY_ADMIN_TOKEN=TOKEN)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (8192, (b"token=" if n == 0 else b"") + b"x" * (8192 - 6 * (n == 0))) for n in range(10)
    )  # 80 kB of an endless form
    answer = first_answer(proxy.port, f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
    assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 413 ")), answer[:200]


def test_dashboard_body_limit_leaves_relayed_bodies_alone(gunicorn_proxy, fake):
    proxy = gunicorn_proxy(OLLAMA_PROXY_ADMIN_TOKEN=TOKEN)
    prompt = "x" * (2 * 1024 * 1024)  # far above the proxy's own routes' limit, far below MAX_BODY_BYTES
    answer = requests.post(proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": prompt, "stream": False})
    assert answer.status_code == 200 and answer.json()["done"] is True
    assert fake.seen[-1]["body_len"] > len(prompt)


def test_dashboard_sign_in_state_holds_across_gunicorn_workers(gunicorn_proxy):
    """Four workers, a new connection per request: whichever worker answers, the counts and the session agree."""
    proxy = gunicorn_proxy(
        workers=4, threads=4, OLLAMA_PROXY_ADMIN_TOKEN=TOKEN, OLLAMA_PROXY_TRUSTED_PROXIES="127.0.0.1"
    )

    def call(method: str, path: str, client: str, **options) -> requests.Response:
        headers = {"X-Forwarded-For": client, **options.pop("headers", {})}
        return requests.request(method, proxy.url + path, headers=headers, allow_redirects=False, timeout=10, **options)

    guesses = [call("POST", "/analytics/login", "203.0.113.9", data={"token": f"guess-{n}"}) for n in range(12)]
    assert [answer.status_code for answer in guesses] == [401] * 5 + [429] * 7
    assert int(guesses[-1].headers["Retry-After"]) in range(1, 61)
    signed_in = call("POST", "/analytics/login", "198.51.100.7", data={"token": TOKEN})
    assert signed_in.status_code == 302
    cookie = {"ollama_proxy_admin": signed_in.cookies["ollama_proxy_admin"]}
    assert {call("GET", "/analytics/stats", "198.51.100.7", cookies=cookie).status_code for _ in range(12)} == {200}
    assert call("POST", "/analytics/logout-everywhere", "198.51.100.7", cookies=cookie).status_code == 302
    assert {call("GET", "/analytics/stats", "198.51.100.7", cookies=cookie).status_code for _ in range(12)} == {401}
