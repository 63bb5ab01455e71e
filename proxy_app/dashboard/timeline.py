"""Pure: the chart of model loads and unloads over a time range, as geometry the page draws as inline SVG: one lane
per model (the most recently active MAX_LANES), a bar while it was loaded, a mark at each event with its details in a
tooltip. Its axes and colours are charts.py's; every label is plain text that Jinja escapes.
"""

from __future__ import annotations

from datetime import datetime

from proxy_app.dashboard.charts import BOTTOM, DAY, PALETTE_SIZE, RIGHT, TOP, short_number

# Drawn at its own size, not scaled to the column like the charts above: a full-width panel would enlarge its text.
TIMELINE_WIDTH = 960
LANE_HEIGHT = 22  # one lane per model
LANE_LABEL_WIDTH = 180  # room for the model names left of the lanes
MAX_LANES = 12  # the most recently active models get a lane; the rest are counted under the chart
MAX_EVENTS = 400  # the newest events of those models are drawn; older ones are counted under the chart


def _moment(text: str) -> datetime:
    """An event's time from its ISO 8601 text (as /analytics/models gives it)."""
    return datetime.fromisoformat(text)


def short_duration(seconds: float) -> str:
    """Return a duration as 45 s, 12 min, 5.5 h or 3.2 d."""
    for longer_than, size, unit in ((2 * 86400, 86400, "d"), (3600, 3600, "h"), (60, 60, "min")):
        if seconds >= longer_than:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _span_tip(model: str, low: datetime, high: datetime, early: bool, late: bool) -> str:
    """A loaded span's tooltip; ``early``/``late``: it began before the range or lasts past it (times unknown)."""
    text = f"{model} loaded {'before ' if early else ''}{low:%Y-%m-%d %H:%M:%S} until {'after ' if late else ''}"
    text += f"{high:%Y-%m-%d %H:%M:%S} UTC"
    return text if early or late else f"{text} ({short_duration((high - low).total_seconds())})"


def _event_tip(event: dict) -> str:
    """A load or unload marker's tooltip: what happened when, and the model's footprint from /api/ps."""
    verb = "loaded" if event["event"] == "load" else "unloaded"
    parts = [f"{event['model']} {verb} {_moment(event['timestamp']):%Y-%m-%d %H:%M:%S} UTC"]
    for name, label in (("size_bytes", "size"), ("vram_bytes", "VRAM")):
        if event.get(name) is not None:
            parts.append(f"{label} {short_number(event[name])}B")
    if event.get("context_length") is not None:
        parts.append(f"context {event['context_length']:,}")
    return ", ".join(parts)


def _time_ticks(start: datetime, end: datetime, x_of) -> list[dict]:
    """Five labelled moments from ``start`` to ``end``: dates for a range of days, times within one."""
    span = end - start
    form = "%m-%d" if span >= 3 * DAY else "%m-%d %H:%M" if span >= DAY / 2 else "%H:%M"
    moments = [start + span * share for share in (0, 0.25, 0.5, 0.75, 1)]
    return [{"x": x_of(moment), "label": moment.strftime(form)} for moment in moments]


def _lane_spans(events: list[dict], loaded_before: bool, start: datetime, end: datetime) -> list[tuple]:
    """Return (from, to, early, late) of the times a model was loaded: from its load, or from ``start`` (early) when
    it was loaded already, which an unload without a load before it shows too; to its unload, or to ``end`` (late)."""
    spans, since, early = [], start if loaded_before else None, loaded_before
    for event in events:
        moment = _moment(event["timestamp"])
        if event["event"] == "load" and since is None:
            since, early = moment, False
        elif event["event"] == "unload":
            spans.append((since or start, moment, early or since is None, False))
            since, early = None, False
    if since is not None:
        spans.append((since, end, early, True))
    return spans


def _lanes(events: list[dict], before: set[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """Return {model: its events} for every model, and the MAX_LANES most recently active ones in name order."""
    lanes: dict[str, list[dict]] = {model: [] for model in before}
    for event in events:
        lanes.setdefault(event["model"], []).append(event)
    recent = sorted(lanes, key=lambda model: lanes[model][-1]["timestamp"] if lanes[model] else "", reverse=True)
    return lanes, sorted(recent[:MAX_LANES])


def model_timeline(title: str, events: list[dict], loaded: list[dict], since: str, end: str) -> dict:
    """A lane per model with its loaded spans and load/unload markers, from ``since`` (or the first event) to ``end``
    (ISO 8601): the MAX_LANES most recently active models and their newest MAX_EVENTS events; the chart counts what
    it leaves out.

    ``events`` are load/unload events oldest first and ``loaded`` the models loaded now with their load event (as
    /analytics/models gives them); a model loaded before the range and still loaded spans the whole range.
    """
    start, finish = _moment(since), _moment(end)
    if events:
        start = min(start, _moment(events[0]["timestamp"]))
    before = {row["model"] for row in loaded if _moment(row["timestamp"]) < start}
    lanes, kept = _lanes(events, before)
    newest = sorted((event for model in kept for event in lanes[model]), key=lambda event: event["timestamp"])
    drawn = newest[-MAX_EVENTS:]
    cutoff = _moment(drawn[0]["timestamp"]) if len(drawn) < len(newest) else start  # older events: not drawn
    left, right, seconds = LANE_LABEL_WIDTH, TIMELINE_WIDTH - RIGHT, max((finish - start).total_seconds(), 1.0)

    def x_of(moment: datetime) -> float:
        share = min(max((moment - start).total_seconds() / seconds, 0.0), 1.0)
        return round(left + (right - left) * share, 1)

    height = TOP + LANE_HEIGHT * max(len(kept), 1) + BOTTOM
    chart = {"title": title, "width": TIMELINE_WIDTH, "height": height, "left": left, "right": right, "top": TOP,
             "bottom": height - BOTTOM, "lane_height": LANE_HEIGHT, "x_ticks": _time_ticks(start, finish, x_of),
             "lanes": [], "more_models": len(lanes) - len(kept), "more_events": len(events) - len(drawn)}  # fmt: skip
    for number, model in enumerate(kept):
        spans = [span for span in _lane_spans(lanes[model], model in before, start, finish) if span[1] >= cutoff]
        marks = [event for event in drawn if event["model"] == model]
        chart["lanes"].append(_lane(model, number, spans, marks, x_of))
    return chart


def _lane(model: str, number: int, spans: list[tuple], marks: list[dict], x_of) -> dict:
    """One lane's geometry: its row, colour, loaded spans and event markers."""
    return {
        "model": model, "y": TOP + number * LANE_HEIGHT, "css": f"c{number % PALETTE_SIZE}",
        "spans": [{"x": x_of(low), "w": round(max(x_of(high) - x_of(low), 1.0), 1),
                   "tip": _span_tip(model, low, high, early, late)} for low, high, early, late in spans],
        "marks": [{"x": x_of(_moment(event["timestamp"])), "load": event["event"] == "load", "tip": _event_tip(event)}
                  for event in marks],
    }  # fmt: skip
