"""Requests the front cannot take as they come: a body too big for the proxy's own routes is refused before it is read
whole, and a request waitress could not read (bad chunk framing, a body too big) is answered in the error shape of the
API its path belongs to and, on a relayed path, recorded as refused. front.py installs both on its channels; parsing
and writing the answer stay waitress's own.
"""

from __future__ import annotations

import io
import logging

from waitress.parser import HTTPRequestParser
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import RequestEntityTooLarge

from proxy_app.dashboard.views import OWN_BODY_BYTES
from proxy_app.ollama.errors import error_body
from proxy_app.relay.middleware import is_reserved
from proxy_app.state import state_of

log = logging.getLogger(__name__)


class OwnRoutesParser(HTTPRequestParser):
    """waitress's request parser, refusing at once a body too big for the proxy's own routes.

    waitress reads a body whole before the app runs, and its own limit must let model blobs through; so a 600 MB form
    posted to /analytics/login would be read to the end before Flask's 64 KiB limit could answer 413.
    """

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.content_length > OWN_BODY_BYTES and is_reserved(self.path):  # announced: refused before it is sent
            self._refuse_body()

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.body_bytes_received > OWN_BODY_BYTES and not self.completed and is_reserved(self.path):  # chunked
            self._refuse_body()
        return consumed

    def _refuse_body(self) -> None:
        self.error = RequestEntityTooLarge(f"a body of at most {OWN_BODY_BYTES} bytes is accepted here")
        self.completed = True


class ShapedErrorTask(ErrorTask):
    """waitress's answer to a request it could not read (bad chunk framing, a body too big), in the error shape of
    the API the path belongs to (Ollama's, OpenAI's or Anthropic's) instead of waitress's plain text; on a relayed
    path the call is recorded as refused, like every call the relay refuses."""

    def execute(self) -> None:
        error = self.request.error
        message = f"{error.reason.lower()}: {error.body}"
        self._record(error.code, message)
        body, content_type = error_body(self.request.path or "/", message, error.code)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", content_type))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)

    def _record(self, status: int, message: str) -> None:
        extensions = getattr(self.channel.server.application, "extensions", None)  # the Flask app, under both servers
        relay = state_of(self.channel.server.application).relay if extensions else None
        if relay is None or is_reserved(self.request.path or "/"):
            return
        environ = WSGITask(self.channel, self.request).get_environment()  # the environ the app would have had
        environ.update({"wsgi.input": io.BytesIO(), "CONTENT_LENGTH": "0"})  # the body is what could not be read
        try:
            relay.refuse_unread(environ, status, message)
        except Exception:  # recording must not cost the client its answer
            log.exception("recording a request the server could not read failed")
