"""Pure: turn the stats document's series into chart geometry (rectangles, polylines, ticks) that the templates
draw as inline SVG. No library, no JavaScript, no I/O; every label is plain text that Jinja escapes.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

WIDTH, HEIGHT = 640, 200  # the SVG viewBox; CSS scales it to the column
LEFT, RIGHT, TOP, BOTTOM = 52, 8, 10, 22  # room for the y labels and the x labels
PALETTE_SIZE = 8  # CSS classes c0..c7
DAY = timedelta(days=1)


def nice_ceiling(value: float) -> float:
    """Return the smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value`` (1 for nothing)."""
    if not value or value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def short_number(value: float) -> str:
    """Return 1234567 as 1.2M, 12500 as 12.5k, 0.5 as 0.5."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def short_ms(value: float) -> str:
    """Return a duration in milliseconds as 850 ms, 4.2 s or 3.5 min."""
    if value >= 60_000:
        return f"{value / 60_000:.3g} min"
    if value >= 1000:
        return f"{value / 1000:.3g} s"
    return f"{value:.3g} ms"


def _frame(buckets: list[str], top: float, unit: str) -> dict:
    """The plot area, y ticks (0, half, top) and about six x labels."""
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    label = short_ms if unit == "ms" else short_number
    y_ticks = [{"y": round(TOP + plot_height * (1 - share), 1), "label": label(top * share)} for share in (0, 0.5, 1)]
    every = max(1, math.ceil(len(buckets) / 6))
    x_ticks = [
        {"x": round(LEFT + plot_width * (index + 0.5) / len(buckets), 1), "label": _time_label(buckets, index, every)}
        for index in range(0, len(buckets), every)
    ]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": TOP,
        "bottom": HEIGHT - BOTTOM,
        "y_ticks": y_ticks,
        "x_ticks": x_ticks,
    }


def _time_label(buckets: list[str], index: int, every: int) -> str:
    """HH:MM, with the date (MM-DD) on the first label and whenever the day changed since the previous label."""
    moment = datetime.fromisoformat(buckets[index])
    if len(buckets) > 1 and datetime.fromisoformat(buckets[1]) - datetime.fromisoformat(buckets[0]) >= DAY:
        return moment.strftime("%m-%d")
    if index == 0 or buckets[index][:10] != buckets[index - every][:10]:
        return moment.strftime("%m-%d %H:%M")
    return moment.strftime("%H:%M")


def when(bucket: str) -> str:
    """A bucket's start as 2025-05-01 12:30 UTC, for tooltips."""
    return bucket[:16].replace("T", " ") + " UTC"


def stacked_bars(title: str, buckets: list[str], layers: list[dict]) -> dict:
    """Bars per bucket, one stacked segment per layer ({"name", "values"}), each layer its own colour."""
    totals = [sum(layer["values"][i] or 0 for layer in layers) for i in range(len(buckets))]
    top = nice_ceiling(max(totals, default=0))
    chart = {"title": title, **_frame(buckets, top, "count"), "bars": [], "legend": []}
    slot = (WIDTH - LEFT - RIGHT) / max(len(buckets), 1)
    scale = (HEIGHT - TOP - BOTTOM) / top
    base = [float(HEIGHT - BOTTOM)] * len(buckets)
    for number, layer in enumerate(layers):
        css = layer.get("css") or f"c{number % PALETTE_SIZE}"
        chart["legend"].append({"name": layer["name"], "css": css})
        for index, value in enumerate(layer["values"]):
            if not value:
                continue
            height = value * scale
            base[index] -= height
            chart["bars"].append(
                {
                    "x": round(LEFT + index * slot + slot * 0.1, 2),
                    "y": round(base[index], 2),
                    "w": round(max(slot * 0.8, 0.5), 2),
                    "h": round(height, 2),
                    "css": css,
                    "tip": f"{when(buckets[index])}: {layer['name']} {value:,}",
                }
            )
    return chart


def overlaid_bars(title: str, buckets: list[str], layers: list[dict]) -> dict:
    """Bars per bucket drawn over each other (e.g. errors over calls), each from zero."""
    chart = stacked_bars(title, buckets, layers[:1])
    scale = (HEIGHT - TOP - BOTTOM) / nice_ceiling(max((v or 0 for v in layers[0]["values"]), default=0))
    slot = (WIDTH - LEFT - RIGHT) / max(len(buckets), 1)
    for number, layer in enumerate(layers[1:], start=1):
        css = layer.get("css") or f"c{number}"
        chart["legend"].append({"name": layer["name"], "css": css})
        for index, value in enumerate(layer["values"]):
            if value:
                chart["bars"].append(
                    {
                        "x": round(LEFT + index * slot + slot * 0.1, 2),
                        "w": round(max(slot * 0.8, 0.5), 2),
                        "y": round(HEIGHT - BOTTOM - value * scale, 2),
                        "h": round(value * scale, 2),
                        "css": css,
                        "tip": f"{when(buckets[index])}: {layer['name']} {value:,}",
                    }
                )
    return chart


def lines(title: str, buckets: list[str], layers: list[dict], unit: str = "ms") -> dict:
    """One polyline per layer; a missing value (no data in that bucket) breaks the line, a lone point is a dot."""
    top = nice_ceiling(max((v for layer in layers for v in layer["values"] if v is not None), default=0))
    chart = {"title": title, **_frame(buckets, top, unit), "paths": [], "dots": [], "legend": []}
    slot = (WIDTH - LEFT - RIGHT) / max(len(buckets), 1)
    scale = (HEIGHT - TOP - BOTTOM) / top
    for number, layer in enumerate(layers):
        css = layer.get("css") or f"c{number % PALETTE_SIZE}"
        values = layer["values"]
        commands = []
        for index, value in enumerate(values):
            if value is None:
                continue
            x, y = round(LEFT + (index + 0.5) * slot, 1), round(HEIGHT - BOTTOM - value * scale, 1)
            joined = index > 0 and values[index - 1] is not None
            commands.append(f"{'L' if joined else 'M'}{x},{y}")
            if not joined and (index + 1 == len(values) or values[index + 1] is None):
                chart["dots"].append(
                    {
                        "x": x,
                        "y": y,
                        "css": css,
                        "tip": f"{when(buckets[index])}: {layer['name']} "
                        f"{short_ms(value) if unit == 'ms' else short_number(value)}",
                    }
                )
        chart["paths"].append({"d": " ".join(commands), "css": css, "name": layer["name"]})
        chart["legend"].append({"name": layer["name"], "css": css})
    return chart


def horizontal_bars(title: str, items: list[tuple[str, float | None]], unit: str = "") -> dict:
    """One labelled bar per item (e.g. median tokens/s per model), longest first as given."""
    known = [(label, value) for label, value in items if value is not None]
    top = nice_ceiling(max((value for _, value in known), default=0))
    row_height, label_width = 24, 170
    height = TOP + row_height * max(len(known), 1) + 4
    bars = [
        {
            "y": TOP + row * row_height,
            "w": round((WIDTH - label_width - 100) * value / top, 2),
            "label": label,
            "value": f"{value:,.1f}{unit}",
            "css": f"c{row % PALETTE_SIZE}",
        }
        for row, (label, value) in enumerate(known)
    ]
    return {
        "title": title,
        "width": WIDTH,
        "height": height,
        "label_width": label_width,
        "bars": bars,
        "row_height": row_height,
    }


def model_name(row: dict) -> str:
    """A per-model row's or token layer's label: the model, "(none)", or "other (N models)" for the folded row."""
    if row["folded"]:
        return f"other ({row['folded']:,} models)"
    return row["model"] or "(none)"


def make_charts(stats: dict) -> dict:
    """Return every chart of the page from a stats document."""
    series = stats["series"]
    buckets = series["buckets"]
    if not buckets:
        return {}
    calls = overlaid_bars(
        "Calls and errors",
        buckets,
        [
            {"name": "calls", "values": series["calls"], "css": "c0"},
            {"name": "errors", "values": series["errors"], "css": "err"},
        ],
    )
    tokens = stacked_bars(
        "Tokens (input + output) by model",
        buckets,
        [{"name": model_name(layer), "values": layer["values"]} for layer in series["tokens"]],
    )
    latency = lines(
        "Latency and TTFT percentiles",
        buckets,
        [
            {"name": "latency p50", "values": series["total_time_ms_p50"]},
            {"name": "latency p95", "values": series["total_time_ms_p95"]},
            {"name": "TTFT p50", "values": series["ttft_ms_p50"]},
            {"name": "TTFT p95", "values": series["ttft_ms_p95"]},
        ],
    )
    rates = [(model_name(row), row["tokens_per_second_p50"]) for row in stats["models"]]
    speed = horizontal_bars("Median tokens/s by model", sorted(rates, key=lambda item: -(item[1] or 0)), " tok/s")
    return {"calls": calls, "tokens": tokens, "latency": latency, "speed": speed}
