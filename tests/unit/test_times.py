"""The UI's one time format and its relative times, which must be true: a moment still to
come is never "just now"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kiln.web.times import relative, timestamp

NOW = datetime(2026, 12, 3, 9, 24, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset", "text"),
    [
        (timedelta(seconds=-3), "just now"),
        (timedelta(seconds=-30), "30 seconds ago"),
        (timedelta(minutes=-1), "1 minute ago"),
        (timedelta(minutes=-22, seconds=-5), "22 minutes ago"),
        (timedelta(hours=-5), "5 hours ago"),
        (timedelta(days=-2, hours=-3), "2 days ago"),
        (timedelta(seconds=0.4), "now"),
        (timedelta(seconds=1), "in 1 second"),
        (timedelta(seconds=30), "in 30 seconds"),  # `* * * * *`: the next minute
        (timedelta(minutes=3), "in 3 minutes"),
        (timedelta(days=1), "in 1 day"),
    ],
)
def test_relative_times_say_what_is_true(offset: timedelta, text: str) -> None:
    assert relative(NOW + offset, NOW) == text


def test_one_absolute_format_24_hour_with_the_zone() -> None:
    assert timestamp(NOW) == "2026-12-03 09:24 UTC"
    evening = datetime(2026, 12, 3, 20, 5, tzinfo=timezone(timedelta(hours=1)))
    assert timestamp(evening) == "2026-12-03 19:05 UTC"
    assert relative(None) == "never" and timestamp(None) == ""
