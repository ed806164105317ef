"""Cron schedules with a time zone: strict parsing, DST-correct slots, and the catch-up policy.

A *slot* is a moment a schedule fires: an aware UTC ``datetime`` on a whole minute. Slots are
the identity of scheduled job runs (the DB keeps one run per ``(job_id, scheduled_for)``), so
every function here is deterministic: two runners asking the same question get the same
datetimes, whatever their own time zone.

Syntax (standard 5-field cron, as crontab(5) documents it)::

    minute hour day-of-month month day-of-week
    0-59   0-23 1-31         1-12  0-7 (0 and 7 are Sunday)

Each field is ``*`` or a comma list of items ``n``, ``a-b``, ``*/s``, ``a-b/s`` or ``a/s``
(``a`` to the field's end, every ``s``); months and days of the week also take English
abbreviations (``JAN``, ``MON``). ``@hourly @daily @midnight @weekly @monthly @yearly
@annually`` are accepted. Day matching follows Vixie cron: when either day field starts with
``*`` a day must match both, otherwise it may match either (``0 0 1,15 * MON`` fires on the
1st, the 15th and every Monday).

Daylight-saving time (schedules run on the wall clock of their zone):

* Spring forward (Europe/Berlin: 02:00 CET jumps to 03:00 CEST; 02:00-02:59 never happens).
  A schedule that names its hours (``30 2 * * *``) still fires that day: a slot in the skipped
  hour fires once, at the instant of the jump (03:00 CEST = 01:00 UTC), and several such slots
  (``*/15 2 * * *``) collapse into that one run. A schedule that runs every hour (hour field
  covering 0-23, e.g. ``30 * * * *``) follows elapsed time instead: the skipped wall times are
  skipped, 01:30 CET is followed by 03:30 CEST, one hour later.
* Fall back (03:00 CEST goes back to 02:00 CET; 02:00-02:59 happens twice). A schedule that
  names its hours fires once, at the first occurrence (02:30 CEST); an every-hour schedule
  fires at both (02:30 CEST and 02:30 CET, one hour apart), so ``*/5 * * * *`` has no hole.

This is what Vixie cron and cronie do. croniter is the reference the tests compare this
module's field matching against; it is not used at run time because it is ~100x slower here
(~0.3 ms per step) and knows nothing about the rules above.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Literal, get_args
from zoneinfo import ZoneInfo, available_timezones

from kiln.domain.errors import InvalidInput

MINUTE = timedelta(minutes=1)
MAX_EXPRESSION_LENGTH = 200

CatchUpPolicy = Literal["once", "all", "skip"]
CATCH_UP_POLICIES: tuple[str, ...] = get_args(CatchUpPolicy)
DEFAULT_MAX_CATCH_UP = 10
MAX_CATCH_UP_LIMIT = 1000
# Under the "skip" policy a slot this recent still counts as on time, not as missed: the runner
# ticks every few seconds, and a busy tick must not lose a run.
ON_TIME_GRACE = timedelta(minutes=2)

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month has
_ITEM = re.compile(r"^(?P<base>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>[0-9]+))?$", re.I)
# Quartz/Jenkins syntax people paste by mistake: L, W, LW, 5L, 15W, #, ?, H, H(0-29).
_EXTENSION = re.compile(r"[#?()]|^(?:h|l|w|lw|\d+[lw])(?:/|$)", re.I)
# Zone names that exist on disk but whose meaning depends on the host: two runners must agree.
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "Factory"})
# Offsets are assumed to change at most once between probes this far apart: since 1970 no
# tzdata zone has changed twice within a day.
_PROBE = timedelta(hours=6)
# Longer than any fall-back (the largest since 1970 is 7 hours), so a repeated hour is seen.
_LOOKBACK = timedelta(days=1)
_MAX_SEARCH_DAYS = 366 * 60  # a Feb-29-on-a-Monday schedule fires at least every 40 years


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_base: int = 0  # the number of names[0]

    def describe_range(self) -> str:
        if self.names:
            first, last = self.names[0].upper(), self.names[-1].upper()
            return f"{self.low}-{self.high}, or {first}-{last}"
        return f"{self.low}-{self.high}"


_SPECS = (
    _FieldSpec("minute", 0, 59),
    _FieldSpec("hour", 0, 23),
    _FieldSpec("day-of-month", 1, 31),
    _FieldSpec("month", 1, 12, _MONTHS, 1),
    _FieldSpec("day-of-week", 0, 7, _WEEKDAYS, 0),
)


@dataclass(frozen=True)
class CronFields:
    """The expanded value sets of one expression, and matching of naive wall-clock times."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_or: bool  # both day fields restricted: a day matches either (Vixie cron)

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        by_dom = d.day in self.days
        by_dow = d.isoweekday() % 7 in self.weekdays
        return (by_dom or by_dow) if self.days_or else (by_dom and by_dow)

    def matches(self, wall: datetime) -> bool:
        """True when the naive wall-clock minute ``wall`` is one this expression names."""
        return wall.minute in self.minutes and wall.hour in self.hours and self.day_matches(wall)

    def next_match(self, wall: datetime) -> datetime:
        """The first matching naive wall-clock minute at or after ``wall`` (minute-aligned)."""
        day, hour, minute = wall.date(), wall.hour, wall.minute
        for _ in range(_MAX_SEARCH_DAYS):
            if day.month not in self.months:
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
                hour = minute = 0
                continue
            if self.day_matches(day):
                for h in self.hours[bisect.bisect_left(self.hours, hour) :]:
                    i = bisect.bisect_left(self.minutes, minute if h == hour else 0)
                    if i < len(self.minutes):
                        return datetime.combine(day, time(h, self.minutes[i]))
            day += timedelta(days=1)
            hour = minute = 0
        raise ValueError(f"no slot within {_MAX_SEARCH_DAYS} days of {wall.isoformat()}")


def _parse_value(token: str, spec: _FieldSpec, text: str) -> int:
    if token.isascii() and token.isdigit():
        value = int(token)
    elif token.lower() in spec.names:
        value = spec.names.index(token.lower()) + spec.name_base
    else:
        raise InvalidInput(
            f"{spec.name} field {text!r}: {token!r} is not a number or name "
            f"(allowed: {spec.describe_range()})"
        )
    if not spec.low <= value <= spec.high:
        raise InvalidInput(
            f"{spec.name} field {text!r}: {value} is out of range ({spec.describe_range()})"
        )
    return value


def _parse_field(text: str, spec: _FieldSpec) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        if _EXTENSION.search(item):
            raise InvalidInput(
                f"{spec.name} field {text!r}: {item!r} is Quartz/Jenkins syntax (L, W, #, "
                "?, H), which Kiln schedules do not support"
            )
        match = _ITEM.match(item)
        if not match:
            raise InvalidInput(
                f"{spec.name} field {text!r}: {item!r} is not a value, range (a-b), "
                "step (*/n, a-b/n) or list (a,b)"
            )
        base, step_text = match["base"], match["step"]
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            first, last = base.split("-")
            low, high = _parse_value(first, spec, text), _parse_value(last, spec, text)
            if low > high:
                raise InvalidInput(
                    f"{spec.name} field {text!r}: range {base} is reversed; ranges do not "
                    "wrap around, write the smaller value first"
                )
        else:
            low = _parse_value(base, spec, text)
            high = spec.high if step_text is not None else low
        step = 1
        if step_text is not None:
            step = int(step_text)
            if step < 1:
                raise InvalidInput(f"{spec.name} field {text!r}: a step must be at least 1")
            if step > max(high - low, 1):
                raise InvalidInput(
                    f"{spec.name} field {text!r}: step {step} is larger than the range "
                    f"{low}-{high} it divides, so it would only ever match {low}"
                )
        values.update(range(low, high + 1, step))
    return values


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones()) - _HOST_DEPENDENT_ZONES


def check_timezone(tz: str) -> ZoneInfo:
    """The ``ZoneInfo`` for an IANA zone name, or ``InvalidInput`` saying what is wrong."""
    if not isinstance(tz, str) or not tz.strip():
        raise InvalidInput("time zone must be an IANA name such as 'Europe/Berlin' or 'UTC'")
    if tz not in _zone_names():
        near = difflib.get_close_matches(tz, sorted(_zone_names()), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InvalidInput(
            f"unknown time zone {tz[:64]!r}{hint}; use an IANA name such as "
            "'Europe/Berlin' or 'UTC'"
        )
    return ZoneInfo(tz)


def _check_fires(fields: CronFields, dom_text: str, month_text: str) -> None:
    """Refuse expressions such as ``0 0 30 2 *`` whose day and month never meet."""
    if fields.days_or:
        return  # the weekday alone matches every week
    for month in fields.months:
        if any(day <= _DAYS_IN_MONTH[month - 1] for day in fields.days):
            return  # weekdays meet every valid date over a 400-year cycle
    raise InvalidInput(
        f"schedule never fires: day-of-month {dom_text!r} does not occur in month {month_text!r}"
    )


def _parse_expression(expr: str) -> tuple[str, CronFields]:
    if not isinstance(expr, str):
        raise InvalidInput("schedule must be a string such as '0 2 * * *'")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise InvalidInput(f"schedule is longer than {MAX_EXPRESSION_LENGTH} characters")
    if any(not (ch.isprintable() or ch in " \t") for ch in expr):
        raise InvalidInput("schedule must not contain control or other non-printing characters")
    parts = expr.split()
    if not parts:
        raise InvalidInput("schedule is empty; write 5 fields such as '0 2 * * *', or '@daily'")
    if parts[0].startswith("@"):
        macro = parts[0].lower()
        if macro == "@reboot":
            raise InvalidInput(
                "@reboot is not supported: a schedule names clock times, and runners restart "
                "without that meaning anything for your job; use a manual or dependent run"
            )
        if macro not in MACROS or len(parts) != 1:
            raise InvalidInput(
                f"unknown schedule {expr.strip()[:40]!r}; use 5 fields or one of "
                + ", ".join(MACROS)
            )
        normalized, parts = macro, MACROS[macro].split()
    else:
        normalized = " ".join(parts)
    if len(parts) != 5:
        extra = " (a seconds or year field is not supported)" if len(parts) in (6, 7) else ""
        raise InvalidInput(
            f"schedule {normalized[:60]!r} has {len(parts)} fields; it needs exactly 5: "
            f"minute hour day-of-month month day-of-week{extra}"
        )
    minutes, hours, days, months, weekdays = (
        _parse_field(text, spec) for text, spec in zip(parts, _SPECS, strict=True)
    )
    if 7 in weekdays:  # 7 is another name for Sunday
        weekdays = (weekdays - {7}) | {0}
    fields = CronFields(
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_or=not (parts[2].startswith("*") or parts[4].startswith("*")),
    )
    _check_fires(fields, parts[2], parts[3])
    return normalized, fields


def _as_utc(t: datetime, what: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got naive {t.isoformat()}")
    return t.astimezone(UTC)


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + MINUTE


def _wall(u: datetime, offset: timedelta) -> datetime:
    """The naive wall-clock reading of the UTC instant ``u`` under ``offset``."""
    return (u + offset).replace(tzinfo=None)


@dataclass(frozen=True)
class Schedule:
    """A validated cron expression in a time zone. Build one with :func:`parse_schedule`."""

    expression: str  # whitespace-normalized as given (macros stay as written, lowercased)
    timezone: str
    fields: CronFields = field(repr=False)
    zone: ZoneInfo = field(repr=False, compare=False)

    @property
    def follows_clock(self) -> bool:
        """True when the schedule runs every hour: it then follows elapsed time across DST."""
        return len(self.fields.hours) == 24

    def next_after(self, t: datetime) -> datetime:
        """The first slot strictly after ``t`` (aware; any zone), as an aware UTC datetime."""
        return next(self._slots_after(_as_utc(t, "t")))

    def slots_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Slots ``s`` with ``after < s <= until``, oldest first, at most ``limit`` of them."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        until = _as_utc(until, "until")
        found: list[datetime] = []
        if limit == 0:
            return found
        for slot in self._slots_after(_as_utc(after, "after")):
            if slot > until:
                break
            found.append(slot)
            if len(found) == limit:
                break
        return found

    def latest_slots(self, after: datetime, until: datetime, count: int) -> list[datetime]:
        """The newest ``count`` slots with ``after < s <= until``, oldest first.

        Searches back from ``until`` in doubling windows, so a year of missed minutes costs as
        much as the few slots wanted, and the answer never depends on how the search went.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        after, until = _as_utc(after, "after"), _as_utc(until, "until")
        span = timedelta(hours=1)
        while True:
            start = max(after, until - span)
            newest: deque[datetime] = deque(maxlen=count)
            for slot in self._slots_after(start):
                if slot > until:
                    break
                newest.append(slot)
            if len(newest) == count or start == after:
                return list(newest)
            span *= 2

    def _offset(self, u: datetime) -> timedelta:
        offset = u.astimezone(self.zone).utcoffset()
        assert offset is not None  # a ZoneInfo always knows its offset
        return offset

    def _change_between(self, lo: datetime, hi: datetime, lo_offset: timedelta) -> datetime:
        """The first whole second in ``(lo, hi]`` whose offset differs from ``lo_offset``."""
        lo_s, hi_s = int(lo.timestamp()), int(hi.timestamp())
        while hi_s - lo_s > 1:
            mid = (lo_s + hi_s) // 2
            if self._offset(datetime.fromtimestamp(mid, UTC)) == lo_offset:
                lo_s = mid
            else:
                hi_s = mid
        return datetime.fromtimestamp(hi_s, UTC)

    def _first_change(self, u: datetime, until: datetime, offset: timedelta) -> datetime | None:
        """The first offset change in ``(u, until]``, or None when the offset holds."""
        previous, probe = u, u + _PROBE
        while True:
            probe = min(probe, until)
            if self._offset(probe) != offset:
                return self._change_between(previous, probe, offset)
            if probe == until:
                return None
            previous, probe = probe, probe + _PROBE

    def _repeated_until(self, u: datetime) -> datetime | None:
        """If ``u`` follows a recent fall-back, the wall time where repeated times end."""
        offset, back = self._offset(u), u - _LOOKBACK
        back_offset = self._offset(back)
        if back_offset <= offset:
            return None
        change = self._change_between(back, u, back_offset)
        return _wall(change, back_offset)

    def _jump_skipped_a_slot(self, change: datetime, before: timedelta, after: timedelta) -> bool:
        """True when a wall time the forward jump at ``change`` skipped is a match."""
        jumped_from, jumped_to = _wall(change, before), _wall(change, after)
        return self.fields.next_match(_ceil_minute(jumped_from)) < jumped_to

    def _slots_after(self, t: datetime) -> Iterator[datetime]:
        """Every slot strictly after the UTC instant ``t``, in order.

        Walks spans of constant UTC offset. Within one, wall time and UTC move together, so
        the next wall-clock match gives the next slot; at each offset change the DST rules in
        the module docstring decide what the skipped or repeated wall times do.
        """
        u = _floor_minute(t) + MINUTE  # the earliest instant still allowed
        by_wall_time = not self.follows_clock
        # Wall times before this have already happened (only set just after a fall-back).
        seen_until = self._repeated_until(u) if by_wall_time else None
        while True:
            offset = self._offset(u)
            if by_wall_time:
                before = self._offset(u - MINUTE)
                if before != offset:  # u is the first minute after an offset change
                    entered = self._change_between(u - MINUTE, u, before)
                    if offset < before:  # fall back: do not repeat wall times already seen
                        seen_until = _wall(entered, before)
                    elif self._jump_skipped_a_slot(entered, before, offset):
                        yield u  # spring forward: skipped slots run once, at the jump
                        u += MINUTE
                        continue
            start = _wall(u, offset)
            if seen_until is not None and seen_until > start:
                start = _ceil_minute(seen_until)
            slot = _ceil_minute((self.fields.next_match(start) - offset).replace(tzinfo=UTC))
            ahead = self._first_change(u, slot, offset)
            if ahead is None:
                yield slot
                u = slot + MINUTE
            else:  # the offset changes first: go there and let the top of the loop decide
                u = _ceil_minute(ahead)


def parse_schedule(expr: str, tz: str) -> Schedule:
    """Validate a 5-field cron expression (or macro) in an IANA zone; ``InvalidInput`` if bad."""
    normalized, fields = _parse_expression(expr)
    zone = check_timezone(tz)
    return Schedule(expression=normalized, timezone=tz, fields=fields, zone=zone)


def due_slots(
    schedule: Schedule,
    last_scheduled: datetime | None,
    now: datetime,
    policy: CatchUpPolicy = "once",
    max_catch_up: int = DEFAULT_MAX_CATCH_UP,
    on_time_grace: timedelta = ON_TIME_GRACE,
) -> list[datetime]:
    """The slots a scheduler should create runs for at ``now``, oldest first.

    ``last_scheduled`` is the anchor: the ``scheduled_for`` of the newest run the job already
    has, or, for a job without scheduled runs, the moment its schedule was set. ``None`` means
    "no anchor": nothing counts as missed and nothing is due; store ``now`` as the anchor.

    Slots in ``(last_scheduled, now]`` are due. When there are several, the runner was down or
    behind, and ``policy`` decides:

    * ``"once"`` (default): one run, for the newest due slot; older ones are not run.
    * ``"all"``: a run per due slot, but only the newest ``max_catch_up`` of them.
    * ``"skip"``: missed slots are dropped; only a slot at most ``on_time_grace`` old runs.

    After creating the runs (``INSERT ... ON CONFLICT DO NOTHING`` on ``(job_id,
    scheduled_for)``), move the anchor to the newest returned slot. The result depends only on
    the arguments, so racing runners insert the same rows and the unique key keeps one each.
    """
    if policy not in CATCH_UP_POLICIES:
        raise InvalidInput(
            f"unknown catch-up policy {str(policy)[:20]!r}; use one of "
            + ", ".join(CATCH_UP_POLICIES)
        )
    if not 1 <= max_catch_up <= MAX_CATCH_UP_LIMIT:
        raise InvalidInput(f"max_catch_up must be between 1 and {MAX_CATCH_UP_LIMIT}")
    now = _as_utc(now, "now")
    if last_scheduled is None or _as_utc(last_scheduled, "last_scheduled") >= now:
        return []
    if policy == "all":
        return schedule.latest_slots(last_scheduled, now, max_catch_up)
    newest = schedule.latest_slots(last_scheduled, now, 1)
    if policy == "skip" and newest and now - newest[0] > on_time_grace:
        return []
    return newest
