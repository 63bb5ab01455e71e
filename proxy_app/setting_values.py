"""The kinds of value a setting takes: each function reads the text of one environment variable and returns the
value (a port, seconds, a URL, a list of networks…), or raises ValueError saying what the text must be. settings.py
names one for each setting, and config.py names the setting in the error it raises from it.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote, urlsplit


def url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:11435")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must not carry a path or query, only scheme://host:port")
    return f"{parts.scheme}://{parts.netloc}"


def port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be 0 or more seconds")
    return number


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def networks(value: str) -> tuple:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in value.split(",") if item.strip())


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")


def hosts(value: str) -> tuple[str, ...]:
    entries = tuple(item.strip().lower() for item in value.split(",") if item.strip())
    for entry in entries:
        if entry != "*" and not _HOST_NAME.fullmatch(entry) and not _is_address(entry.strip("[]")):
            raise ValueError(f"{entry[:60]!r} is not a host name, *.domain, IP address or * (give no scheme or port)")
    return entries


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def text(value: str) -> str:
    return value.strip()


def endpoint(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:4318")
    return value.strip().rstrip("/")


def headers(value: str) -> dict[str, str]:
    """``key=value,key2=value2`` with URL-encoded values, the form OpenTelemetry's exporters read."""
    headers = {}
    for item in filter(None, (item.strip() for item in value.split(","))):
        name, equals, text = item.partition("=")
        if not equals or not name.strip():
            raise ValueError("must be key=value pairs separated by commas, e.g. Authorization=Basic%20abc")
        headers[name.strip()] = unquote(text.strip())
    return headers


def capture(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("span_only", "span_and_event"):  # the newer values; this proxy sends no events
        return True
    return False if lowered in ("no_content", "event_only") else boolean(value)


def metrics_exporter(value: str) -> str:
    value = value.strip().lower()
    if value not in ("otlp", "none"):
        raise ValueError("must be otlp or none")
    return value


def queue_size(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def server(value: str) -> str:
    value = value.strip().lower()
    if value not in ("auto", "gunicorn", "waitress"):
        raise ValueError("must be auto, gunicorn or waitress")
    return value
