"""A scripted upstream on a raw socket, for faults a well-behaved WSGI server cannot produce.

Each accepted connection has its request read, then is handed to ``script(upstream, conn)``, which writes whatever
bytes it likes (a wrong Content-Length, invalid JSON, nothing at all) and returns. Also usable as an "evil" server
that must never be contacted: ``accepted`` counts every TCP connection, even one that sends no request.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

Script = Callable[["RawUpstream", socket.socket], None]
TLS = Path(__file__).parent / "tls"  # a certificate and key for 127.0.0.1


def read_request(conn: socket.socket) -> bytes:
    """Read one request head and its Content-Length body; b"" if the peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length and (piece := conn.recv(65536)):
        body += piece
    return head + b"\r\n\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    """Frame pieces as HTTP/1.1 chunks, with the terminating zero chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece) + b"0\r\n\r\n"


def response(body: bytes = b"", content_type: str = "application/json; charset=utf-8", length: int | None = None,
             status: str = "200 OK", framing: str = "length") -> bytes:  # fmt: skip
    """An HTTP/1.1 response; ``length`` overrides the declared Content-Length; framing "chunked" chunks ``body``."""
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
    if framing == "chunked":
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body
    declared = len(body) if length is None else length
    return (head + f"Content-Length: {declared}\r\n\r\n").encode() + body


def wait_for_close(upstream: RawUpstream, conn: socket.socket) -> None:
    """Script: answer nothing, like Ollama loading a model; note when the proxy closes the connection."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    upstream.closed_at.append(time.monotonic())


def reply(data: bytes, then_close: bool = True) -> Script:
    """Script: send ``data``; then close, or hold the connection open until the proxy closes it."""

    def script(upstream: RawUpstream, conn: socket.socket) -> None:
        conn.sendall(data)
        if not then_close:
            wait_for_close(upstream, conn)

    return script


class RawUpstream:
    """A TCP server on an ephemeral port running ``script`` for each connection; ``close()`` ends everything."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or wait_for_close
        self.requests: list[bytes] = []
        self.closed_at: list[float] = []
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._changed = threading.Condition()
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._changed:
                self.accepted += 1
                self._connections.append(conn)
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = read_request(conn)
            if request:
                with self._changed:
                    self.requests.append(request)
                    self._changed.notify_all()
                self.script(self, conn)
        except OSError:
            pass
        finally:
            conn.close()

    def wait_for_requests(self, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Return the requests once ``count`` have arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"expected {count} upstream requests, got {len(self.requests)}")
            return list(self.requests)

    def close(self) -> None:
        """Stop accepting, cut every connection and wait for the threads."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        with self._changed:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def tls_upstream(answer: bytes):
    """An https:// upstream (tests/tls: a certificate for 127.0.0.1) answering one request with ``answer``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                read_request(tls)
                tls.sendall(answer)
        except OSError:  # the client refused the certificate
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(5)
        listener.close()
