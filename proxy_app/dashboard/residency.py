"""The models the upstream has loaded, as the stored load and unload events tell, in the form the dashboard's page
and ``/analytics/models`` show them (ISO 8601 UTC times, no database ids)."""

from __future__ import annotations

from proxy_app.calls import format_timestamp
from proxy_app.store import models


def loaded_and_events(db, filters) -> dict:
    """The loaded models and the load/unload events in the range, from the store."""
    loaded = list(models.loaded_models(db).values())
    events = models.model_events(db, since=filters.since, until=filters.until)
    return {"loaded": [event_json(row) for row in loaded], "events": [event_json(row) for row in events]}


def event_json(row: dict) -> dict:
    """One model event as JSON: its time in ISO 8601 UTC, no database id."""
    document = {key: value for key, value in row.items() if key != "id"}
    document["timestamp"] = format_timestamp(models.to_datetime(row["timestamp"]))
    return document
