"""Slots across daylight-saving changes, checked three ways: the documented examples, a
minute-by-minute brute force of the rules around real transitions, and general properties."""

from __future__ import annotations

import functools
import itertools
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kiln.scheduling.cron import Schedule, parse_schedule
from tests.unit.test_cron_parse import EXPRESSIONS

MINUTE = timedelta(minutes=1)
PROPERTY = settings(max_examples=120, deadline=None, database=None)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def walk(schedule: Schedule, start: datetime, count: int) -> list[str]:
    """The next ``count`` slots as 'UTC time = local time+offset' strings, easy to read."""
    out = []
    for _ in range(count):
        start = schedule.next_after(start)
        local = start.astimezone(schedule.zone)
        out.append(f"{start:%H:%M}Z={local:%H:%M%z}")
    return out


# -- The behaviour the module docstring promises, in Europe/Berlin ---------------------------
# 2024-03-31: 02:00 CET (+0100) jumps to 03:00 CEST (+0200) at 01:00 UTC.
# 2024-10-27: 03:00 CEST goes back to 02:00 CET at 01:00 UTC; 02:00-02:59 happens twice.


def test_spring_forward_named_hour_fires_once_at_the_jump() -> None:
    daily = parse_schedule("30 2 * * *", "Europe/Berlin")
    assert walk(daily, utc(2024, 3, 29, 12), 4) == [
        "01:30Z=02:30+0100",  # Mar 30
        "01:00Z=03:00+0200",  # Mar 31: 02:30 does not exist; runs at the jump, not skipped
        "00:30Z=02:30+0200",  # Apr 1
        "00:30Z=02:30+0200",  # Apr 2
    ]


def test_spring_forward_several_skipped_slots_collapse_into_one_run() -> None:
    quarter_hours = parse_schedule("*/15 2,3 * * *", "Europe/Berlin")
    assert walk(quarter_hours, utc(2024, 3, 31, 0, 0), 5) == [
        "01:00Z=03:00+0200",  # 02:00, 02:15, 02:30, 02:45 and 03:00 itself: one run
        "01:15Z=03:15+0200",
        "01:30Z=03:30+0200",
        "01:45Z=03:45+0200",
        "00:00Z=02:00+0200",  # next day
    ]


def test_spring_forward_every_hour_schedule_keeps_elapsed_time() -> None:
    hourly = parse_schedule("30 * * * *", "Europe/Berlin")
    assert walk(hourly, utc(2024, 3, 30, 23, 45), 4) == [
        "00:30Z=01:30+0100",
        "01:30Z=03:30+0200",  # one hour later; 02:30 never happened and is not made up
        "02:30Z=04:30+0200",
        "03:30Z=05:30+0200",
    ]


def test_fall_back_named_hour_fires_once_at_the_first_occurrence() -> None:
    daily = parse_schedule("30 2 * * *", "Europe/Berlin")
    assert walk(daily, utc(2024, 10, 26, 12), 2) == [
        "00:30Z=02:30+0200",  # the first 02:30 (CEST); the second (CET) does not run again
        "01:30Z=02:30+0100",  # Oct 28
    ]
    # Asked from inside the repeated hour, the answer is the same: the next day.
    assert walk(daily, utc(2024, 10, 27, 1, 15), 1) == ["01:30Z=02:30+0100"]


def test_fall_back_every_hour_schedule_fires_in_both_occurrences() -> None:
    hourly = parse_schedule("30 * * * *", "Europe/Berlin")
    assert walk(hourly, utc(2024, 10, 26, 23, 45), 4) == [
        "00:30Z=02:30+0200",
        "01:30Z=02:30+0100",  # the repeated hour runs again: still once per real hour
        "02:30Z=03:30+0100",
        "03:30Z=04:30+0100",
    ]
    every_five = parse_schedule("*/5 * * * *", "Europe/Berlin")
    slots = every_five.slots_between(utc(2024, 10, 26, 23), utc(2024, 10, 27, 3), 1000)
    assert len(slots) == 4 * 12  # four real hours, no hole and no double
    assert all(b - a == timedelta(minutes=5) for a, b in itertools.pairwise(slots))


def test_new_york_and_lord_howe_half_hour_shift() -> None:
    # New York 2024-03-10: 02:00 EST -> 03:00 EDT at 07:00 UTC.
    assert walk(parse_schedule("30 2 * * *", "America/New_York"), utc(2024, 3, 8, 12), 3) == [
        "07:30Z=02:30-0500",
        "07:00Z=03:00-0400",
        "06:30Z=02:30-0400",
    ]
    # Lord Howe 2024-10-06: 02:00 +1030 -> 02:30 +1100 (a 30-minute jump) at 15:30 UTC.
    assert walk(parse_schedule("15 2 * * *", "Australia/Lord_Howe"), utc(2024, 10, 4), 3) == [
        "15:45Z=02:15+1030",
        "15:30Z=02:30+1100",  # 02:15 skipped: runs at the jump
        "15:15Z=02:15+1100",
    ]


def test_samoa_skipped_a_whole_day_and_a_daily_job_still_ran_once() -> None:
    # Pacific/Apia went from -10 to +14 at the end of 2011-12-29: Dec 30 never happened.
    daily = parse_schedule("0 12 * * *", "Pacific/Apia")
    slots = daily.slots_between(utc(2011, 12, 28), utc(2012, 1, 2), 10)
    local = [s.astimezone(daily.zone).strftime("%m-%d %H:%M") for s in slots]
    assert local == [
        "12-28 12:00",
        "12-29 12:00",
        "12-31 00:00",  # Dec 30 12:00 never happened: run at the jump
        "12-31 12:00",
        "01-01 12:00",
        "01-02 12:00",
    ]
    hourly_ish = parse_schedule("0 * * * *", "Pacific/Apia")
    jump = hourly_ish.slots_between(utc(2011, 12, 30, 8), utc(2011, 12, 30, 12), 10)
    assert [b - a for a, b in itertools.pairwise(jump)] == [timedelta(hours=1)] * 3


# -- Brute force: every UTC minute around real transitions -----------------------------------


def brute_force(schedule: Schedule, after: datetime, until: datetime) -> list[datetime]:
    """Scan each UTC minute in ``(after, until]`` and apply the documented rules directly."""
    fields, zone = schedule.fields, schedule.zone
    found = []
    u = after.replace(second=0, microsecond=0) + MINUTE
    while u <= until:
        local = u.astimezone(zone)
        wall = local.replace(tzinfo=None)
        if schedule.follows_clock:
            fires = fields.matches(wall)
        else:
            fires = fields.matches(wall) and local.fold == 0
            jump = local.utcoffset() - (u - MINUTE).astimezone(zone).utcoffset()
            if jump > timedelta(0):  # u is the first minute after a spring-forward jump
                skipped = wall - jump
                while skipped < wall and not fires:
                    fires = fields.matches(skipped)
                    skipped += MINUTE
        if fires:
            found.append(u)
        u += MINUTE
    return found


@functools.cache
def transitions(zone: str, year: int) -> list[datetime]:
    """The instants in ``year`` when ``zone`` changes its UTC offset, to the minute."""
    tz = ZoneInfo(zone)
    out = []
    u = utc(year, 1, 1)
    offset = u.astimezone(tz).utcoffset()
    while u.year == year:
        nxt = u + timedelta(hours=3)
        if nxt.astimezone(tz).utcoffset() != offset:
            t = u
            while t.astimezone(tz).utcoffset() == offset:
                t += MINUTE
            out.append(t)
            offset = nxt.astimezone(tz).utcoffset()
        u = nxt
    return out


ZONE_YEARS = [
    ("Europe/Berlin", 2024),
    ("America/New_York", 2024),
    ("Australia/Lord_Howe", 2024),  # 30-minute shifts
    ("Australia/Sydney", 2025),  # southern hemisphere
    ("America/Santiago", 2024),  # changes at local midnight
    ("Africa/Casablanca", 2024),  # goes back for Ramadan, forward after
    ("Antarctica/Troll", 2024),  # a two-hour jump
    ("Pacific/Chatham", 2024),  # +12:45 / +13:45
    ("America/St_Johns", 2024),  # -03:30 / -02:30
    ("Pacific/Apia", 2011),  # a whole day skipped
]
CASES = [(zone, t) for zone, year in ZONE_YEARS for t in transitions(zone, year)]


def test_every_zone_in_the_list_has_transitions() -> None:
    for zone, year in ZONE_YEARS:
        assert transitions(zone, year), zone


def _hour_field() -> st.SearchStrategy[str]:
    near_changes = st.lists(st.sampled_from([0, 1, 2, 3, 4, 22, 23]), min_size=1, max_size=3)
    return st.one_of(
        st.just("*"),
        st.just("*/2"),
        st.just("1-3"),
        near_changes.map(lambda h: ",".join(map(str, sorted(set(h))))),
    )


DST_EXPRESSIONS = st.tuples(
    st.sampled_from(["0", "30", "15,45", "*/20", "*/7", "59", "0-10", "*"]),
    _hour_field(),
    st.sampled_from(["*", "1-31/2", "*/2"]),
    st.just("*"),
    st.sampled_from(["*", "0-6", "1-5", "0,6"]),
).map(" ".join)


@settings(max_examples=80, deadline=None, database=None)
@given(
    case=st.sampled_from(CASES),
    expr=DST_EXPRESSIONS,
    lead=st.integers(60, 26 * 60),
)
def test_slots_equal_a_minute_by_minute_scan_around_transitions(
    case: tuple[str, datetime], expr: str, lead: int
) -> None:
    zone, change = case
    schedule = parse_schedule(expr, zone)
    after = change - timedelta(minutes=lead)
    until = change + timedelta(hours=28)
    expected = brute_force(schedule, after, until)
    assert schedule.slots_between(after, until, 100_000) == expected
    # Starting fresh anywhere in the window (no state carried from earlier slots) agrees too.
    for u in [after + timedelta(minutes=m) for m in range(0, lead + 28 * 60, 17)]:
        later = [s for s in expected if s > u]
        if later:
            assert schedule.next_after(u) == later[0], u
    for slot in expected[:-1]:
        assert schedule.next_after(slot - timedelta(seconds=1)) == slot


# -- General properties, any zone ------------------------------------------------------------

ZONES = sorted(available_timezones() - {"localtime", "Factory"})
INSTANTS = st.datetimes(
    min_value=datetime(1985, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)
)


@PROPERTY
@given(expr=EXPRESSIONS, zone=st.sampled_from(ZONES), t=INSTANTS, frac=st.floats(0, 1))
def test_next_after_is_strictly_increasing_and_skips_nothing(
    expr: str, zone: str, t: datetime, frac: float
) -> None:
    schedule = parse_schedule(expr, zone)
    assume(t.astimezone(schedule.zone).utcoffset() % MINUTE == timedelta(0))
    first = schedule.next_after(t)
    second = schedule.next_after(first)
    assert t < first < second
    for slot in (first, second):
        assert slot.tzinfo is UTC and slot.second == 0 and slot.microsecond == 0
    # Any instant between t and the first slot leads to that same slot: nothing in between.
    between = t + (first - t) * frac
    if between < first:
        assert schedule.next_after(between) == first
    assert schedule.slots_between(t, second, 10) == [first, second]
    assert schedule.slots_between(t, second, 1) == [first]
    assert schedule.latest_slots(t, second, 5) == [first, second]
    assert schedule.latest_slots(t, second, 1) == [second]
    assert schedule.slots_between(first, second - timedelta(microseconds=1), 10) == []
    # A slot is a matching wall time, or (named hours only) the instant of a forward jump.
    wall = first.astimezone(schedule.zone).replace(tzinfo=None)
    jumped = (
        first.astimezone(schedule.zone).utcoffset()
        != (first - MINUTE).astimezone(schedule.zone).utcoffset()
    )
    assert schedule.fields.matches(wall) or (jumped and not schedule.follows_clock)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "Asia/Kolkata"])
def test_same_answer_whatever_zone_the_question_is_asked_in(zone: str) -> None:
    schedule = parse_schedule("0 9 * * MON-FRI", "Europe/Berlin")
    t = datetime(2024, 6, 1, 12, tzinfo=UTC)
    assert schedule.next_after(t.astimezone(ZoneInfo(zone))) == utc(2024, 6, 3, 7)


def test_a_week_of_minutes_is_fast_enough_for_a_scheduler_tick() -> None:
    schedule = parse_schedule("* * * * *", "Europe/Berlin")
    started = time.process_time()  # CPU time: the machine is shared
    slots = schedule.slots_between(utc(2024, 3, 28), utc(2024, 4, 4), 100_000)
    elapsed = time.process_time() - started
    assert len(slots) == 7 * 24 * 60  # every real minute, the DST jump notwithstanding
    assert elapsed < 3.0, f"{elapsed:.2f}s CPU for {len(slots)} slots"
