"""Cron parsing: every bad input is refused with a message naming what is wrong."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.domain.errors import InvalidInput, KilnError
from kiln.scheduling.cron import CronFields, check_timezone, parse_schedule

PROPERTY = settings(max_examples=150, deadline=None, database=None)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # The list: six fields, @reboot, out-of-range fields.
        ("* * * * * *", "has 6 fields; it needs exactly 5"),
        ("0 * * * * *", "a seconds or year field is not supported"),
        ("0 0 12 * * ? 2025", "has 7 fields"),
        ("@reboot", "@reboot is not supported"),
        ("@REBOOT", "@reboot is not supported"),
        ("60 * * * *", "minute field '60': 60 is out of range (0-59)"),
        ("0 24 * * *", "hour field '24': 24 is out of range (0-23)"),
        ("0 0 0 * *", "day-of-month field '0': 0 is out of range (1-31)"),
        ("0 0 32 * *", "day-of-month field '32': 32 is out of range (1-31)"),
        ("0 0 * 0 *", "month field '0': 0 is out of range (1-12, or JAN-DEC)"),
        ("0 0 * 13 *", "month field '13': 13 is out of range"),
        ("0 0 * * 8", "day-of-week field '8': 8 is out of range (0-7, or SUN-SAT)"),
        ("0-60 * * * *", "minute field '0-60': 60 is out of range"),
        ("1,2,99 * * * *", "minute field '1,2,99': 99 is out of range"),
        ("0 22-25 * * *", "hour field '22-25': 25 is out of range"),
        # Never fires.
        ("0 0 30 2 *", "never fires: day-of-month '30' does not occur in month '2'"),
        ("0 0 31 4,6,9,11 *", "never fires"),
        ("0 0 */31 2 *", "step 31 is larger than the range 1-31"),
        ("0 0 31 feb *", "never fires"),
        # Wrong counts and shapes.
        ("", "schedule is empty"),
        ("   ", "schedule is empty"),
        ("* * * *", "has 4 fields; it needs exactly 5"),
        ("*", "has 1 fields"),
        ("@often", "unknown schedule '@often'"),
        ("@daily 5", "unknown schedule"),
        ("*/0 * * * *", "minute field '*/0': a step must be at least 1"),
        ("*/60 * * * *", "step 60 is larger than the range 0-59"),
        ("5-1 * * * *", "range 5-1 is reversed"),
        ("0 0 * * FRI-MON", "range FRI-MON is reversed"),
        ("1,,2 * * * *", "minute field '1,,2': '' is not a value"),
        ("-1 * * * *", "minute field '-1': '-1' is not a value"),
        ("*-5 * * * *", "'*-5' is not a value"),
        ("1.5 * * * *", "'1.5' is not a value"),
        ("0 0 * JANUARY *", "'JANUARY' is not a number or name"),
        ("0 0 * * MONDAY", "'MONDAY' is not a number or name"),
        ("0 0 * MON *", "month field 'MON': 'MON' is not a number or name"),
        ("0 0 * * JAN", "day-of-week field 'JAN'"),
        ("٣ * * * *", "minute field '٣': '٣' is not a value"),
        # Quartz/Jenkins syntax people paste.
        ("0 0 L * *", "day-of-month field 'L': 'L' is Quartz/Jenkins syntax"),
        ("0 0 15W * *", "'15W' is Quartz/Jenkins syntax"),
        ("0 0 * * 5L", "'5L' is Quartz/Jenkins syntax"),
        ("0 0 * * MON#2", "'MON#2' is Quartz/Jenkins syntax"),
        ("0 0 ? * MON", "'?' is Quartz/Jenkins syntax"),
        ("H * * * *", "minute field 'H'"),
        ("H/15 * * * *", "'H/15' is Quartz/Jenkins syntax"),
        ("H(0-29) * * * *", "Quartz/Jenkins syntax"),
        # Hostile text.
        ("0 0 * * *\n0 1 * * *", "control or other non-printing characters"),
        ("0 0 * * *\x00", "control or other non-printing characters"),
        ("0 0\u00a0* * *", "non-printing"),
        ("* " * 200, "longer than 200 characters"),
    ],
)
def test_bad_expression_is_refused_with_a_precise_message(expr: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_schedule(expr, "UTC")
    assert expected in caught.value.detail
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("tz", "expected"),
    [
        ("Europe/Berln", "unknown time zone 'Europe/Berln' (did you mean 'Europe/Berlin'?)"),
        ("Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("europe/berlin", "unknown time zone"),
        ("localtime", "unknown time zone 'localtime'"),  # means something different per host
        ("Factory", "unknown time zone"),
        ("../../etc/passwd", "unknown time zone"),
        ("/usr/share/zoneinfo/UTC", "unknown time zone"),
        ("UTC\x00", "unknown time zone"),
        ("", "time zone must be an IANA name"),
        ("  ", "time zone must be an IANA name"),
        ("+02:00", "unknown time zone"),
    ],
)
def test_bad_time_zone_is_refused(tz: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_schedule("0 2 * * *", tz)
    assert expected in caught.value.detail


def test_errors_are_kiln_errors_so_the_api_answers_4xx() -> None:
    with pytest.raises(KilnError):
        parse_schedule("* * * * * *", "UTC")
    with pytest.raises(KilnError):
        check_timezone("Nowhere/Town")


@pytest.mark.parametrize(
    ("expr", "first_three_after_2024_01_01"),
    [
        ("@hourly", ["2024-01-01T01:00", "2024-01-01T02:00", "2024-01-01T03:00"]),
        ("@daily", ["2024-01-02T00:00", "2024-01-03T00:00", "2024-01-04T00:00"]),
        ("@midnight", ["2024-01-02T00:00", "2024-01-03T00:00", "2024-01-04T00:00"]),
        ("@weekly", ["2024-01-07T00:00", "2024-01-14T00:00", "2024-01-21T00:00"]),
        ("@monthly", ["2024-02-01T00:00", "2024-03-01T00:00", "2024-04-01T00:00"]),
        ("@yearly", ["2025-01-01T00:00", "2026-01-01T00:00", "2027-01-01T00:00"]),
        ("@annually", ["2025-01-01T00:00", "2026-01-01T00:00", "2027-01-01T00:00"]),
        ("*/20 * * * *", ["2024-01-01T00:20", "2024-01-01T00:40", "2024-01-01T01:00"]),
        ("5/20 * * * *", ["2024-01-01T00:05", "2024-01-01T00:25", "2024-01-01T00:45"]),
        ("10-20/5 3 * * *", ["2024-01-01T03:10", "2024-01-01T03:15", "2024-01-01T03:20"]),
        ("0 9 * * MON-FRI", ["2024-01-01T09:00", "2024-01-02T09:00", "2024-01-03T09:00"]),
        ("0 9 * * mon-fri", ["2024-01-01T09:00", "2024-01-02T09:00", "2024-01-03T09:00"]),
        ("0 0 * * 7", ["2024-01-07T00:00", "2024-01-14T00:00", "2024-01-21T00:00"]),
        ("0 0 * * 5-7", ["2024-01-05T00:00", "2024-01-06T00:00", "2024-01-07T00:00"]),
        ("0 0 1 JAN,jul *", ["2024-07-01T00:00", "2025-01-01T00:00", "2025-07-01T00:00"]),
        ("0 0 29 2 *", ["2024-02-29T00:00", "2028-02-29T00:00", "2032-02-29T00:00"]),
        # Both day fields restricted: either matches (the 13th, or any Friday).
        ("0 0 13 * 5", ["2024-01-05T00:00", "2024-01-12T00:00", "2024-01-13T00:00"]),
        # A day field starting with '*' makes both required: odd days that are Mondays.
        ("0 0 */2 * 1", ["2024-01-15T00:00", "2024-01-29T00:00", "2024-02-05T00:00"]),
        ("\t0  12\t* * *  ", ["2024-01-01T12:00", "2024-01-02T12:00", "2024-01-03T12:00"]),
    ],
)
def test_valid_expressions_fire_when_crontab_5_says(
    expr: str, first_three_after_2024_01_01: list[str]
) -> None:
    schedule = parse_schedule(expr, "UTC")
    t = datetime(2024, 1, 1, tzinfo=UTC)
    got = []
    for _ in range(3):
        t = schedule.next_after(t)
        got.append(t.strftime("%Y-%m-%dT%H:%M"))
    assert got == first_three_after_2024_01_01


def test_expression_is_normalized_and_schedule_is_a_value() -> None:
    a = parse_schedule("  0\t2 * *   * ", "Europe/Berlin")
    b = parse_schedule("0 2 * * *", "Europe/Berlin")
    assert a.expression == "0 2 * * *"
    assert a == b and hash(a) == hash(b)
    assert parse_schedule("@DAILY", "UTC").expression == "@daily"
    assert parse_schedule("0 2 * * *", "UTC") != b


def test_feb_29_or_monday_and_the_rare_feb_29_on_a_monday() -> None:
    # Both day fields start with a digit: "Feb 29, or any Monday in February".
    either = parse_schedule("0 0 29 2 1", "UTC")
    assert either.next_after(datetime(2024, 3, 1, tzinfo=UTC)) == datetime(2025, 2, 3, tzinfo=UTC)
    # Both required (what a '*'-prefixed day field gives) is the rarest slot cron can name: the
    # search must reach across 2100, which is not a leap year (2096, then 2112).
    both = CronFields(
        minutes=(0,),
        hours=(0,),
        days=frozenset({29}),
        months=frozenset({2}),
        weekdays=frozenset({1}),
        days_or=False,
    )
    assert both.next_match(datetime(2024, 3, 1)) == datetime(2044, 2, 29)
    assert both.next_match(datetime(2044, 3, 1)) == datetime(2072, 2, 29)
    assert both.next_match(datetime(2097, 1, 1)) == datetime(2112, 2, 29)


def test_naive_datetimes_are_a_programming_error() -> None:
    schedule = parse_schedule("* * * * *", "UTC")
    with pytest.raises(ValueError, match="aware"):
        schedule.next_after(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        schedule.slots_between(datetime(2024, 1, 1), datetime(2024, 1, 2, tzinfo=UTC), 5)


# -- Differential test against croniter, the widely used implementation ----------------------


@st.composite
def _stepped(draw: st.DrawFn, low: int, high: int) -> str:
    first = draw(st.integers(low, high - 1))
    last = draw(st.integers(first + 1, high))
    return f"{first}-{last}/{draw(st.integers(1, last - first))}"


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    single = value.map(str)
    span = st.tuples(value, value).map(lambda p: f"{min(p)}-{max(p)}")
    item = st.one_of(single, span, _stepped(low, high))
    listed = st.lists(item, min_size=1, max_size=3).map(",".join)
    star_step = st.integers(1, max(1, (high - low) // 2)).map(lambda s: f"*/{s}")
    return st.one_of(st.just("*"), star_step, listed)


EXPRESSIONS = st.tuples(
    _field(0, 59), _field(0, 23), _field(1, 28), _field(1, 12), _field(0, 6)
).map(" ".join)
NAIVE_STARTS = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1))


@PROPERTY
@given(expr=EXPRESSIONS, start=NAIVE_STARTS)
def test_wall_clock_matching_agrees_with_croniter(expr: str, start: datetime) -> None:
    """Kiln's own matcher gives croniter's next time for the expanded sets (UTC, no DST)."""
    fields = parse_schedule(expr, "UTC").fields
    lists = [
        ",".join(map(str, sorted(values)))
        for values in (fields.minutes, fields.hours, fields.days, fields.months, fields.weekdays)
    ]
    reference = croniter(" ".join(lists), start, day_or=fields.days_or)
    expected = reference.get_next(datetime)
    wall = start.replace(second=0, microsecond=0)
    ours = fields.next_match(wall + timedelta(minutes=1))
    assert ours == expected
    assert fields.matches(ours)


@PROPERTY
@given(expr=EXPRESSIONS, day=st.dates(date(2000, 1, 1), date(2040, 1, 1)))
def test_day_matching_agrees_with_croniter_match(expr: str, day: date) -> None:
    fields = parse_schedule(expr, "UTC").fields
    probe = datetime.combine(day, datetime.min.time()).replace(
        hour=fields.hours[0], minute=fields.minutes[0]
    )
    lists = [
        ",".join(map(str, sorted(values)))
        for values in (fields.minutes, fields.hours, fields.days, fields.months, fields.weekdays)
    ]
    assert fields.matches(probe) == croniter.match(" ".join(lists), probe, day_or=fields.days_or)
