"""The upstream client: keep-alive connections to the one configured Ollama, reused by every call.

Built on http.client as it is, as urllib3 is, without urllib3's layers this proxy does not use (retries, redirects,
proxies, content decoding, per-host pools, header-dict copies). http.client reads each answer's status line and header
section, past any interim (1xx) answer (``_Answer``); ``read_head`` then checks those fields and unfolds them for
relaying, and ``framing.check_framing`` the body framing they announce. The connections wait for the first byte
of an answer in short polls, so a departed client is noticed (client_watch.py). This module does not read bodies
(framing.py) or decide anything about a call (forward.py).
"""

from __future__ import annotations

import email.errors
import http.client
import re
import threading
from collections import deque
from urllib.parse import urlsplit

from urllib3.util.wait import wait_for_read

from proxy_app.relay import framing
from proxy_app.relay.client_watch import current_gone_check, wait_first_byte

_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # no field value holds these (RFC 9110 5.5); HTAB it may
# Why: a body this small costs less to copy beside the head than a second send costs.
COALESCE_BYTES = 64 * 1024
# Why: servers send one or two interim answers (102, 103) before the final one; an endless run is an attack.
MAX_INTERIM_ANSWERS = 10
# How the email parser behind http.client notes a line that is no header field, instead of refusing it.
_BAD_LINE_DEFECTS = (
    email.errors.MissingHeaderBodySeparatorDefect,  # no colon, or a name with a space: the head's rest becomes payload
    email.errors.FirstHeaderLineIsContinuationDefect,
    email.errors.MisplacedEnvelopeHeaderDefect,  # a "From " line among the fields
    email.errors.InvalidHeaderDefect,  # ": value", a field without a name
)


class Unreachable(OSError):
    """The upstream could not be connected to: refused, no such host, or no answer within the connect timeout."""


class Head:
    """An answer's header fields as sent (``items``, in order), looked up in any case (``get``: the first value),
    and the values of its Transfer-Encoding and Content-Length fields as they came (``codings``, ``lengths``: every
    field, a Content-Length that is not relayed too), for ``framing.check_framing``.

    werkzeug's Headers scans its list and raises and catches a KeyError for every name it lacks: three a call here.
    """

    def __init__(self, fields: list[tuple[str, str]], codings: list[str], lengths: list[str]) -> None:
        self.fields, self.codings, self.lengths = fields, codings, lengths
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


def read_head(message: http.client.HTTPMessage) -> Head:
    """Check the header fields http.client parsed and return them as a ``Head``, each value trimmed and a folded one
    (RFC 9112 5.2) joined with a space, and no Content-Length beside a Transfer-Encoding (RFC 9112 6.3); raise
    HTTPException on a line that is no header field or a value with a control character.

    http.client's email parser only notes such a line as a defect and drops the fields after it, which could hide
    the framing (Content-Length, Transfer-Encoding) of the body that follows.
    """
    bad_line = _bad_line(message)
    if bad_line is not None:
        raise http.client.HTTPException(f"invalid header line from the upstream: {bad_line[:60]!r}")
    fields, codings, lengths = [], [], []
    for name, value in message.items():
        if not _FIELD_NAME.fullmatch(name):
            raise http.client.HTTPException(f"invalid header name from the upstream: {name[:60]!r}")
        value = _unfolded(value) if "\n" in value else value.strip(" \t")
        if _CONTROL.search(value):
            raise http.client.HTTPException(f"a control character in the upstream's header {name[:60]!r}")
        fields.append((name, value))
        lowered = name.lower()
        if lowered == "transfer-encoding":
            codings.append(value)
        elif lowered == "content-length":
            lengths.append(value)
    if codings:  # the body is framed by its chunks, and no stale length reaches the client
        fields = [(name, value) for name, value in fields if name.lower() != "content-length"]
    return Head(fields, codings, lengths)


def _bad_line(message: http.client.HTTPMessage) -> str | None:
    """The first line of the header section that is no header field, as far as the email parser kept it; or None."""
    rest = message.get_payload()  # what followed a line that is no field: that line first
    if rest:
        return str(rest).split("\n", 1)[0]
    if message.get_unixfrom():
        return message.get_unixfrom()
    defects = [defect for defect in message.defects if isinstance(defect, _BAD_LINE_DEFECTS)]
    return str(defects[0]) if defects else None


def _unfolded(value: str) -> str:
    first, *more = value.split("\n")
    return " ".join([first.rstrip("\r").strip(" \t"), *(line.strip() for line in more)])


class _Answer(http.client.HTTPResponse):
    """http.client's response, read past every interim (1xx) answer as http.client itself reads past 100 Continue.

    The final answer follows an interim one (102 Processing, 103 Early Hints) on the same connection; left unread, it
    would reach the next call. 101 switches the connection to another protocol, which the proxy does not relay (it
    forwards no Upgrade): it is refused.
    """

    def begin(self) -> None:
        super().begin()
        for _ in range(MAX_INTERIM_ANSWERS):
            if not 100 <= self.status < 200:
                return
            if self.status == 101:
                raise http.client.HTTPException("the upstream switched protocols (101), which the proxy does not relay")
            self.headers = None  # begin() reads a status line and head only while none has been read
            super().begin()
        if 100 <= self.status < 200:
            raise http.client.HTTPException(f"the upstream sent more than {MAX_INTERIM_ANSWERS} interim answers")


class _Timed:
    """Connection mixin: the connect timeout while connecting, then the read timeout; a watched wait for answers;
    a request's head and small body in one send."""

    read_timeout: float | None
    response_class = _Answer
    _held: list | None = None

    def endheaders(self, message_body=None, *, encode_chunked: bool = False) -> None:
        """Send the head, and a body of at most ``COALESCE_BYTES`` with it: http.client sends them apart, and each
        send is a system call that gives up the interpreter lock and waits to take it back."""
        if encode_chunked or not isinstance(message_body, bytes) or len(message_body) > COALESCE_BYTES:
            return super().endheaders(message_body, encode_chunked=encode_chunked)
        self._held = []
        try:
            super().endheaders(message_body)
            data = b"".join(self._held)
        finally:
            self._held = None
        super().send(data)

    def send(self, data) -> None:
        if self._held is None:
            return super().send(data)
        self._held.append(data)

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
        """Send one request and return its response with the head read: its header fields checked in ``head``
        (``read_head``); its ``connection`` goes back by release().

        Raises Unreachable when no connection can be made, TimeoutError when no answer starts within the read
        timeout, ClientLeft (client_watch.py) when the client goes first, and http.client or OS errors on a broken
        answer.
        """
        connection, response = self._take(), None
        try:
            connection.request(method, target, body=body, headers=headers)
            sock = connection.sock  # http.client forgets it once an answer says the connection closes after it
            response = connection.getresponse()
            response.head = read_head(response.msg)  # check_framing reads it
            framing.check_framing(response, method)
        except BaseException:
            if response is not None:
                response.close()
            connection.close()
            raise
        response.connection, response.socket = connection, sock  # socket: for polls while the body is silent
        return response

    def release(self, response: http.client.HTTPResponse, reusable: bool = True) -> None:
        """Take back a response's connection: kept for the next call if its body was read to the end, else closed
        (and always closed after an answer without a body: ``framing.check_framing``)."""
        connection = response.connection
        if reusable and not response.isclosed() and framing.has_no_body(response):
            response.close()  # HEAD, 204, 304: there was no body to read
        if reusable and framing.is_reusable(response):
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
