"""The upstream client: keep-alive connections to the one configured Ollama, reused by every call.

Built on http.client, as urllib3 is, without urllib3's layers this proxy does not use (retries, redirects, proxies,
content decoding, per-host pools, header-dict copies): those cost about 90 µs per call here. The connections wait for
the first byte of an answer in short polls, so a departed client is noticed (client_watch.py). This module does not read
bodies (framing.py) or decide anything about a call (forward.py).
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import deque
from urllib.parse import urlsplit

from urllib3.util.wait import wait_for_read

from proxy_app.relay.client_watch import current_gone_check, wait_first_byte

MAX_HEAD_LINE = 65536  # http.client's limits: the longest header line, and the most header lines
MAX_HEADERS = 100
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_LINE_ENDS = (b"\r\n", b"\n", b"")  # an empty line ends the head (b"": the upstream closed, as http.client takes it)


class Unreachable(OSError):
    """The upstream could not be connected to: refused, no such host, or no answer within the connect timeout."""


class Response(http.client.HTTPResponse):
    """http.client's response, with the head read by ``read_head`` into a ``Head`` instead of the email package (a
    round trip went from 117 to 85 µs); reading and closing the body are http.client's own."""

    def begin(self) -> None:
        """Read the status line and header section, and decide how the body is framed (as http.client does)."""
        if self.headers is not None:
            return
        version, status, reason = self._read_status()
        while status == http.client.CONTINUE:  # interim answers carry nothing for us
            read_head(self.fp)
            version, status, reason = self._read_status()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.code = self.status = status
        self.reason = reason.strip()
        self.headers = self.msg = read_head(self.fp)
        self.chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None if self.chunked else _content_length(self.headers.get("Content-Length"))
        if status in (204, 304) or status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body ends when the connection does


class Head:
    """An answer's header fields as sent (``items``, in order), looked up in any case (``get``: the first value).

    werkzeug's Headers scans its list and raises and catches a KeyError for every name it lacks: three a call here.
    """

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default=None):
        """The first value of the field ``name`` (any case), else ``default``."""
        return self._first.get(name.lower(), default)

    def items(self) -> list[tuple[str, str]]:
        """Every (name, value) as the upstream sent it."""
        return self.fields

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._first

    def __len__(self) -> int:
        return len(self.fields)


def read_head(reader) -> Head:
    """Read header lines up to the empty one; a folded line (RFC 9112 5.2) joins the one before with a space."""
    fields: list[tuple[str, str]] = []
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_HEAD_LINE + 1)
        if len(line) > MAX_HEAD_LINE:
            raise http.client.LineTooLong("header line")
        if line in _LINE_ENDS:
            return Head(fields)
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text.startswith((" ", "\t")) and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name) or "\r" in value:
            raise http.client.HTTPException(f"invalid header line from the upstream: {text[:60]!r}")
        fields.append((name, value.strip(" \t")))
    raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


def _content_length(value: str | None) -> int | None:
    """Digits only: int() would also take "+5", " 5" and "5_0", which no Content-Length may be."""
    return int(value) if value and value.isascii() and value.isdigit() else None


class _Timed:
    """Connection mixin: the connect timeout while connecting, then the read timeout; a watched wait for answers."""

    read_timeout: float | None
    response_class = Response

    def connect(self) -> None:
        try:
            super().connect()
        except OSError as exc:
            raise Unreachable(str(exc) or type(exc).__name__) from exc
        self.sock.settimeout(self.read_timeout)

    def getresponse(self) -> http.client.HTTPResponse:
        is_gone = current_gone_check()
        if is_gone is not None and self.sock is not None:
            wait_first_byte(self.sock, self.read_timeout, is_gone)
        return super().getresponse()


class HTTPConnection(_Timed, http.client.HTTPConnection):
    pass


class HTTPSConnection(_Timed, http.client.HTTPSConnection):
    pass


class Pool:
    """Idle connections to the upstream, most recently used first; as many are kept as there are threads."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float | None, keep: int) -> None:
        parts = urlsplit(url)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.connect_timeout, self.read_timeout, self.keep = connect_timeout, read_timeout, keep
        self._idle: deque = deque()
        self._closed = False
        self._lock = threading.Lock()  # a release racing close() must not park a connection nobody will close

    def request(self, method: str, target: str, body, headers: dict) -> http.client.HTTPResponse:
        """Send one request and return its response with the head read; its ``connection`` goes back by release().

        Raises Unreachable when no connection can be made, TimeoutError when no answer starts within the read
        timeout, ClientLeft (client_watch.py) when the client goes first, and http.client or OS errors on a broken
        answer.
        """
        connection = self._take()
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        response.connection = connection
        return response

    def release(self, response: http.client.HTTPResponse, reusable: bool = True) -> None:
        """Take back a response's connection: kept for the next call if its body was read to the end, else closed."""
        connection = response.connection
        if reusable and not response.isclosed() and response.length == 0 and not response.chunked:
            response.close()  # HEAD, 204, 304: there was no body to read
        if reusable and response.isclosed() and not response.will_close:
            with self._lock:
                if not self._closed and len(self._idle) < self.keep:
                    self._idle.append(connection)
                    return
        response.close()
        connection.close()  # the upstream sees the close: Ollama stops generating for a departed client

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, deque()
        for connection in idle:
            connection.close()

    def _take(self):
        while True:
            try:
                connection = self._idle.pop()
            except IndexError:
                return self._new()
            if connection.sock is not None and not wait_for_read(connection.sock, timeout=0):
                return connection
            connection.close()  # the upstream closed it while idle (or sent bytes nobody asked for)

    def _new(self):
        if self.scheme == "https":
            connection = HTTPSConnection(self.host, self.port, timeout=self.connect_timeout)
        else:
            connection = HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        connection.read_timeout = self.read_timeout
        return connection
