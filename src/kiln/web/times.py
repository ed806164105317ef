"""How the UI writes times: one absolute format (24-hour, with its zone: UTC) and relative
times that stay true ("in 40 seconds", never "just now" for a moment still to come).

``static/kiln.js`` re-renders every ``<time data-relative>`` on an open page with the same
rules (``relativeText``), so "in 40 seconds" does not stay on screen after it has passed.
"""

from __future__ import annotations

from datetime import UTC, datetime

ABSOLUTE_FORMAT = "%Y-%m-%d %H:%M UTC"
# Relative units, largest first; under a minute the count is in seconds.
_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
JUST_NOW_SECONDS = 10


def timestamp(value: datetime | None) -> str:
    """``2026-12-03 09:24 UTC``: the one absolute format of the UI."""
    return value.astimezone(UTC).strftime(ABSOLUTE_FORMAT) if value else ""


def relative(value: datetime | None, now: datetime | None = None) -> str:
    """``3 minutes ago``, ``in 40 seconds``, ``just now`` (only for the last few seconds)."""
    if value is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if not future and seconds < JUST_NOW_SECONDS:
        return "just now"
    if future and seconds < 1:
        return "now"
    for unit, size in _UNITS:
        if seconds >= size:
            n = int(seconds // size)
            text = f"{n} {unit}{'s' if n != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    raise AssertionError("unreachable: seconds >= 1 here")
