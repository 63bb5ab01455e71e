"""How the templates show numbers and times: the Jinja filters every page uses, each "–" for an unknown value."""

from __future__ import annotations

from proxy_app.dashboard import charts


def number(value) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def rate(value) -> str:
    return "–" if value is None else f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def compact(value) -> str:
    return "–" if value is None else charts.short_number(value)


def milliseconds(value) -> str:
    return "–" if value is None else charts.short_ms(value)


def percent(value) -> str:
    return "–" if value is None else f"{value * 100:.2f} %"


def when(value) -> str:
    """ISO 8601 UTC text as 2025-05-01 12:30:45."""
    return "" if not value else value[:19].replace("T", " ")


FILTERS = {"num": number, "rate": rate, "compact": compact, "ms": milliseconds, "pct": percent, "when": when}
