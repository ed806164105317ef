"""The catch-up policy after downtime, and the determinism that makes one run per slot."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.domain.errors import InvalidInput
from kiln.scheduling.cron import DEFAULT_MAX_CATCH_UP, due_slots, parse_schedule
from tests.unit.test_cron_parse import EXPRESSIONS

EVERY_MINUTE = parse_schedule("* * * * *", "UTC")
HOURLY = parse_schedule("0 * * * *", "Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_on_time_tick_returns_the_slot_that_just_came_due() -> None:
    # The runner ticked a few seconds after 12:00; the 12:00 slot is due under every policy.
    for policy in ("once", "all", "skip"):
        assert due_slots(HOURLY, utc(2024, 5, 1, 11), utc(2024, 5, 1, 12, 0, 4), policy) == [
            utc(2024, 5, 1, 12)
        ], policy


def test_nothing_is_due_between_slots() -> None:
    assert due_slots(HOURLY, utc(2024, 5, 1, 12), utc(2024, 5, 1, 12, 59, 59)) == []


def test_the_slot_at_the_anchor_is_not_due_again_and_the_slot_at_now_is() -> None:
    anchor = utc(2024, 5, 1, 12)
    assert due_slots(HOURLY, anchor, anchor) == []
    assert due_slots(HOURLY, anchor, utc(2024, 5, 1, 13)) == [utc(2024, 5, 1, 13)]


def test_default_policy_runs_once_for_a_long_downtime_not_once_per_slot() -> None:
    # Down from 03:00 to 15:20: twelve hourly slots were missed; one run, for 15:00.
    due = due_slots(HOURLY, utc(2024, 5, 1, 3), utc(2024, 5, 1, 15, 20))
    assert due == [utc(2024, 5, 1, 15)]


def test_all_policy_runs_each_missed_slot_up_to_the_cap_newest_kept() -> None:
    anchor, now = utc(2024, 5, 1, 3), utc(2024, 5, 1, 15, 20)
    every = due_slots(HOURLY, anchor, now, "all", max_catch_up=100)
    assert every == [utc(2024, 5, 1, h) for h in range(4, 16)]
    capped = due_slots(HOURLY, anchor, now, "all", max_catch_up=3)
    assert capped == [utc(2024, 5, 1, 13), utc(2024, 5, 1, 14), utc(2024, 5, 1, 15)]
    default_cap = due_slots(EVERY_MINUTE, utc(2024, 5, 1), utc(2024, 5, 2), "all")
    assert len(default_cap) == DEFAULT_MAX_CATCH_UP
    assert default_cap[-1] == utc(2024, 5, 2)


def test_skip_policy_drops_missed_slots_but_keeps_an_on_time_one() -> None:
    anchor = utc(2024, 5, 1, 3)
    # 15:00 is 20 minutes old at 15:20: missed, dropped.
    assert due_slots(HOURLY, anchor, utc(2024, 5, 1, 15, 20), "skip") == []
    # 15:00 is 30 s old: on time, runs (older missed ones do not).
    assert due_slots(HOURLY, anchor, utc(2024, 5, 1, 15, 0, 30), "skip") == [utc(2024, 5, 1, 15)]
    assert due_slots(
        HOURLY, anchor, utc(2024, 5, 1, 15, 20), "skip", on_time_grace=timedelta(hours=1)
    ) == [utc(2024, 5, 1, 15)]


def test_no_anchor_means_nothing_is_missed() -> None:
    for policy in ("once", "all", "skip"):
        assert due_slots(EVERY_MINUTE, None, utc(2024, 5, 1, 12), policy) == []


def test_anchor_in_the_future_gives_nothing() -> None:
    # Another runner's clock was ahead: no slot is due twice, none is invented.
    assert due_slots(EVERY_MINUTE, utc(2024, 5, 1, 12, 5), utc(2024, 5, 1, 12)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "every"}, "unknown catch-up policy 'every'; use one of once, all, skip"),
        ({"policy": ""}, "unknown catch-up policy"),
        ({"max_catch_up": 0}, "max_catch_up must be between 1 and 1000"),
        ({"max_catch_up": 1001}, "max_catch_up must be between 1 and 1000"),
    ],
)
def test_bad_policy_settings_are_invalid_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        due_slots(EVERY_MINUTE, utc(2024, 5, 1), utc(2024, 5, 2), **kwargs)  # type: ignore[arg-type]
    assert message in caught.value.detail


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        due_slots(EVERY_MINUTE, utc(2024, 5, 1), datetime(2024, 5, 2))


def test_a_year_of_missed_minutes_costs_little() -> None:
    started = time.process_time()
    once = due_slots(EVERY_MINUTE, utc(2023, 5, 1), utc(2024, 5, 1, 0, 0, 30))
    capped = due_slots(EVERY_MINUTE, utc(2023, 5, 1), utc(2024, 5, 1, 0, 0, 30), "all")
    yearly = parse_schedule("@yearly", "Pacific/Auckland")
    rare = due_slots(yearly, utc(1990, 1, 1), utc(2024, 5, 1))
    elapsed = time.process_time() - started
    assert once == [utc(2024, 5, 1)]
    assert capped[-1] == utc(2024, 5, 1) and len(capped) == DEFAULT_MAX_CATCH_UP
    # New Year in Auckland (UTC+13 in summer) is 11:00 UTC on Dec 31.
    assert rare == [utc(2023, 12, 31, 11)]
    assert elapsed < 1.0, f"{elapsed:.2f}s CPU"


def test_two_runners_in_different_zones_and_seconds_agree_on_slot_identity() -> None:
    # Runner A ticks at 12:00:05 UTC; runner B, configured for Tokyo, at 12:00:40.
    schedule = parse_schedule("0 */6 * * *", "America/Chicago")
    anchor = utc(2024, 5, 1, 5)
    a = due_slots(schedule, anchor, utc(2024, 5, 1, 12, 0, 5))
    b = due_slots(schedule, anchor.astimezone(ZoneInfo("Asia/Tokyo")), utc(2024, 5, 1, 12, 0, 40))
    assert a == b == [utc(2024, 5, 1, 11)]  # 06:00 CDT
    assert a[0].tzinfo is UTC


CATCH_UP = settings(max_examples=60, deadline=None, database=None)
INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)


@CATCH_UP
@given(
    expr=EXPRESSIONS,
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
    anchor=INSTANTS,
    downtime=st.timedeltas(timedelta(0), timedelta(days=3)),
    cap=st.integers(1, 30),
)
def test_policies_agree_with_the_full_list_of_missed_slots(
    expr: str, zone: str, anchor: datetime, downtime: timedelta, cap: int
) -> None:
    schedule = parse_schedule(expr, zone)
    now = anchor + downtime
    missed = schedule.slots_between(anchor, now, 100_000)
    assert len(missed) < 100_000
    assert due_slots(schedule, anchor, now, "once") == missed[-1:]
    assert due_slots(schedule, anchor, now, "all", max_catch_up=cap) == missed[-cap:]
    skipped = due_slots(schedule, anchor, now, "skip")
    assert skipped == [s for s in missed[-1:] if now - s <= timedelta(minutes=2)]
    # Slots are whole UTC minutes, so every runner writes the same scheduled_for.
    assert all(s.tzinfo is UTC and s.second == 0 and s.microsecond == 0 for s in missed)
