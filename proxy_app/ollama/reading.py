"""What one decoded response object says (`Reading`), before the meter folds it into the call's running `Usage`.

The API families' readers (``native``, ``completions``, ``responses``, ``messages``) each turn one object into a
Reading; ``usage.UsageMeter`` frames the bytes, picks the reader and folds the Readings in order. Nothing here
keeps state across objects or decodes bytes.
"""

from dataclasses import dataclass

MAX_COUNT = 2**63  # counts and durations end up in a signed 64-bit column


@dataclass(slots=True)
class Reading:
    """One object's facts; None or False where the object does not say. Values are raw: the meter checks them."""

    text: object = None  # answer text: content for TTFT, and kept for the preview
    extra: object = None  # thinking, reasoning or a tool call: content for TTFT, never previewed
    counts: dict | None = None  # Usage field name -> raw value (counts and durations)
    reason: object = None  # done_reason, finish_reason, stop_reason or a Responses status
    is_complete: bool = False  # the answer ended the way its API ends a finished answer
    is_cut_short: bool = False  # the upstream itself says the answer stopped early (a Responses "incomplete")
    is_failed: bool = False  # the upstream reports a failure; `error` holds its message when it gives one
    error: object = None
    model: object = None  # only where the model sits below the top level (Responses, Anthropic)
    remote_model: object = None  # native answers of cloud models
    remote_host: object = None


def as_count(value: object) -> int | None:
    """The value if it is a plausible token count or duration (a non-negative int64, not a bool), else None."""
    return value if type(value) is int and 0 <= value < MAX_COUNT else None


def read_error(error: object) -> Reading:
    """Read an ``error`` member: a string (native) or an object with a message (OpenAI, Anthropic)."""
    message = error.get("message") if isinstance(error, dict) else error
    return Reading(is_failed=True, error=message)
