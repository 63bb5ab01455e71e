"""The front's event loop waits for events: it does not spin while a call's thread holds the output it is writing,
and it sends what that thread left unsent once the thread lets go (service/front.py, ``GuardedChannel.writable``)."""

from __future__ import annotations

import socket
import threading
import time

from proxy_app.service.front import Front
from proxy_app.service.guard import Limits
from tests.conftest import stop_front
from tests.processes import wait_until

POLL_SECONDS = 0.05  # the loop's longest wait: about 10 turns in HOLD_SECONDS when it only waits
HOLD_SECONDS = 0.5


def test_front_loop_waits_while_a_call_thread_holds_its_output_and_sends_it_after():
    answer = threading.Event()

    def app(environ, start_response):
        answer.wait(5)  # the call is in progress until the test lets it answer
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    served = Front(app, Limits(), host="127.0.0.1", port=0, threads=2)
    turns, running = [0], threading.Event()
    running.set()

    def loop() -> None:
        while running.is_set():
            turns[0] += 1
            served.poll(POLL_SECONDS)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", int(served.server.effective_port)), timeout=5)
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        channel = wait_until(lambda: next((item for item in served.channels() if item.requests), None), timeout=5)
        with channel.outbuf_lock:  # as a call's thread holds it while it adds to the output and sends it
            channel.outbufs[-1].append(b"x")  # what write_soon does before it sends
            channel.total_outbufs_len += 1
            before = turns[0]
            time.sleep(HOLD_SECONDS)
            held_turns = turns[0] - before
        assert held_turns < 3 * HOLD_SECONDS / POLL_SECONDS  # it spun thousands of times when poll watched for room
        client.settimeout(2)
        assert client.recv(1) == b"x"  # the loop sent what the thread left, before the call answered
        answer.set()
        received = b""
        while not received.endswith(b"ok"):
            received += client.recv(4096)
        assert received.startswith(b"HTTP/1.1 200 OK")
    finally:
        answer.set()
        client.close()
        running.clear()
        thread.join(5)
        stop_front(served)
