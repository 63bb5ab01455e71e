"""The settings the proxy takes: one table of (name, default, parser, help), and the README's table made from it.

Each ``Setting`` names its environment variable (``PREFIX`` plus its name, or a standard OTEL_* name read as is),
its default as text, the parser from setting_values.py that turns text into a value, and one line of help.
``SETTINGS`` is the one source of truth for what can be set, and ``OTEL_STANDARD`` the standard OpenTelemetry
variables the OTEL setting uses; ``settings_table`` renders ``SETTINGS`` as the Markdown table the README carries
(a test fails when the README's copy is out of date). Nothing here reads the environment: config.py does, with these
declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy_app.setting_values import (  # the kinds of value, named in the table below
    boolean,
    capture,
    endpoint,
    headers,
    hosts,
    metrics_exporter,
    networks,
    port,
    positive_int,
    queue_size,
    seconds,
    server,
    text,
    url,
)

PREFIX = "OLLAMA_PROXY_"


@dataclass(frozen=True)
class Setting:
    """One setting: its name without the prefix, the default as text, a parser and a one-line help."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    prefixed: bool = True  # False: a standard variable read under its own name (OTEL_STANDARD)

    @property
    def variable(self) -> str:
        """The environment variable that sets it."""
        return PREFIX + self.name if self.prefixed else self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("UPSTREAM", "http://127.0.0.1:11435", url, "Ollama server the proxy forwards to (scheme://host:port)"),
    Setting("HOST", "127.0.0.1", text, "Address the proxy listens on; keep loopback unless an admin token is set"),
    Setting("PORT", "11434", port, "Port the proxy listens on (Ollama's usual port)"),
    Setting("DATA_DIR", "./ollama_analytics", text, "Directory for the SQLite store, the CSV mirror and logs"),
    Setting("CONNECT_TIMEOUT", "5", seconds, "Seconds to wait for the upstream to accept a connection"),
    Setting(
        "READ_TIMEOUT",
        "3600",
        seconds,
        "Longest silence (s) between two bytes from the upstream; 0 waits for ever. Never a limit on a whole stream",
    ),
    Setting(
        "THREADS",
        "1024",
        positive_int,
        "Server threads per process: the calls served at once (a client still sending its request holds none)",
    ),
    Setting("WORKERS", "2", positive_int, "gunicorn worker processes (Linux); waitress always runs one"),
    # Each call in flight holds its whole body in memory (THREADS of them per process); 64 MiB still carries a
    # dozen multi-megabyte images in one chat. Blob uploads stream past it.
    Setting(
        "MAX_BODY_BYTES",
        str(64 * 1024 * 1024),
        positive_int,
        "Largest request body relayed (blob uploads exempt)",
    ),
    Setting(
        "BODY_MEMORY_BYTES",
        str(1024**3),
        positive_int,
        "Request bodies held in memory at once per process; a call past it gets 503 at once; 0 means no limit",
    ),  # fmt: skip
    Setting("MAX_CONCURRENT", "0", positive_int, "Calls relayed at once per process; 0 means no limit"),
    Setting("QUEUE_TIMEOUT", "300", seconds, "Seconds a call may wait for a slot before it gets 503"),
    Setting(
        "ALLOWED_HOSTS",
        "",
        hosts,
        "Comma-separated Host names (or *.domain, IPs, *) accepted besides local ones; on a loopback HOST only local "
        "names and addresses are served (as Ollama does, against DNS rebinding); on another HOST an empty list "
        "accepts any Host, as Ollama does",
    ),
    Setting(
        "MAX_CONNECTIONS_PER_CLIENT",
        "256",
        positive_int,
        "Open connections one client address may hold per server process; more get 429 and are closed. 0 means no "
        "limit; TRUSTED_PROXIES are exempt",
    ),
    Setting(
        "HEADER_TIMEOUT",
        "10",
        seconds,
        "Seconds a client has to send a request's headers, from connecting or from the next request's first byte; "
        "then the connection is closed. 0 waits for ever",
    ),
    Setting(
        "BODY_TIMEOUT",
        "60",
        seconds,
        "Longest silence (s) while a client sends a request body; then the connection is closed. 0 waits for ever",
    ),
    Setting("TRUSTED_PROXIES", "", networks, "Comma-separated addresses/networks whose X-Forwarded-For is believed"),
    Setting("CAPTURE_CONTENT", "true", boolean, "Store the prompt and a response preview with each call"),
    Setting(
        "OTEL",
        "false",
        boolean,
        "Send each model call as an OpenTelemetry GenAI span, with GenAI metrics, over OTLP/HTTP (OTEL_* variables)",
    ),
    Setting("DATABASE_URL", "", text, "Peewee database URL; empty means SQLite in DATA_DIR", secret=True),
    Setting("INSTANCE", "", text, "This proxy's name in each call's instance column; empty means the host name"),
    Setting("CSV_PATH", "", text, "CSV mirror file; empty means DATA_DIR/ollama-proxy.csv"),
    Setting("CSV_MAX_BYTES", str(100 * 1024 * 1024), positive_int, "Rotate the CSV mirror past this size (and daily)"),
    Setting("RETENTION_DAYS", "7", positive_int, "Days of rows and CSV files kept; 0 keeps everything"),
    Setting("MAX_ROWS", "5000000", positive_int, "Most rows kept; beyond it the oldest are deleted; 0 means no limit"),
    Setting(
        "WRITER_QUEUE_SIZE",
        "10000",
        positive_int,
        "Finished calls waiting to be stored before new ones are dropped",
    ),
    Setting(
        "WRITER_RETRY_SECONDS",
        "60",
        seconds,
        "Seconds a batch the database refuses is retried before it is dropped",
    ),
    Setting(
        "MAX_MODELS",
        "100",
        positive_int,
        "Distinct model names, and as many key names, used as metric labels; more become 'other'",
    ),
    Setting("METRICS_TOKEN", "", text, "When set, /metrics needs it as a bearer token", secret=True),
    Setting("ADMIN_TOKEN", "", text, "When set, /analytics needs it (bearer token or login form)", secret=True),
    Setting("REQUIRE_KEY", "false", boolean, "Refuse relayed calls without a valid API key (`ollama-proxy keys`)"),
    Setting("PROBE_INTERVAL", "15", seconds, "Seconds between background upstream health probes"),
    Setting("SAMPLE_INTERVAL", "5", seconds, "Seconds between CPU/memory samples"),
    Setting("PS_INTERVAL", "10", seconds, "Seconds between reads of the upstream's /api/ps (loaded models); 0: off"),
    Setting(
        "SERVER",
        "auto",
        server,
        "serve command: auto (gunicorn on Linux, waitress on Windows), gunicorn or waitress",
    ),
    Setting("WITH_OLLAMA", "false", boolean, "serve command: start and supervise `ollama serve` on the upstream port"),
    Setting("OLLAMA_BIN", "", text, "Path to the ollama executable; empty searches PATH and the usual install places"),
    Setting("GRACE_SECONDS", "30", seconds, "On shutdown, how long in-flight streams may run before they are cut"),
    Setting("LOG_LEVEL", "INFO", text, "Python logging level"),
)


# The standard OpenTelemetry variables the OTEL setting uses, read under their own names (no prefix), parsed only
# when OTEL is on. They pass through config.py rather than being left to the SDK so that .env and a test's settings
# reach them too; the SDK still reads the other OTEL_* variables (timeout, compression, certificates, resource
# attributes, sampler) from the process environment itself.
OTEL_STANDARD: tuple[Setting, ...] = (
    Setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://localhost:4318",
        endpoint,
        "OTLP/HTTP base URL; /v1/traces and /v1/metrics are added to it",
        prefixed=False,
    ),
    Setting(
        "OTEL_EXPORTER_OTLP_HEADERS",
        "",
        headers,
        "Headers sent with each export: key=value pairs, comma-separated, values URL-encoded",
        secret=True,
        prefixed=False,
    ),
    Setting("OTEL_SERVICE_NAME", "ollama-proxy", text, "The service.name of spans and metrics", prefixed=False),
    Setting(
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        "false",
        capture,
        "Export the prompt and the response preview in spans (only where CAPTURE_CONTENT keeps them)",
        prefixed=False,
    ),
    Setting(
        "OTEL_METRICS_EXPORTER",
        "otlp",
        metrics_exporter,
        "otlp, or none to send spans only (Langfuse takes no metrics)",
        prefixed=False,
    ),
    Setting(
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "2048",
        queue_size,
        "Spans waiting for export in each process before new ones are dropped (and counted)",
        prefixed=False,
    ),
)


def settings_table() -> str:
    """Return SETTINGS as the Markdown table the README carries between its settings markers (one source of truth)."""
    lines = ["| Setting | Default | What it does |", "|---|---|---|"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default else "(empty)"
        help_text = setting.help.replace("|", r"\|")  # a bare pipe would end the cell
        lines.append(f"| `{PREFIX}{setting.name}` | {default} | {help_text} |")
    return "\n".join(lines) + "\n"
