"""A trivial WSGI app (a fixed 66-byte JSON answer): what gunicorn and waitress cost on their own, without the proxy."""

BODY = b'{"model":"llama3.2","response":"tok tok tok tok tok","done":true}'


def app(environ, start_response):
    """Answer every request with BODY."""
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]
