"""Retries with exponential backoff, and the time limits of workloads.

Both are pure: the runner stores what they return (``not_before`` of a waiting run, the
deadline of a live one) and acts on it in its loop, so a restarted runner keeps the same plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from kiln.domain.errors import InvalidInput
from kiln.scheduling.states import Event, Outcome

MAX_RETRIES = 10
MAX_BACKOFF = timedelta(hours=24)

# CML's time-limit variables: set per site, project or job (site < project < job), in minutes.
JOB_MAXIMUM_MINUTES = "JOB_MAXIMUM_MINUTES"
SESSION_MAXIMUM_MINUTES = "SESSION_MAXIMUM_MINUTES"
IDLE_MAXIMUM_MINUTES = "IDLE_MAXIMUM_MINUTES"
LIMIT_DEFAULTS = {
    JOB_MAXIMUM_MINUTES: 60 * 24 * 7,
    SESSION_MAXIMUM_MINUTES: 60 * 24 * 7,
    IDLE_MAXIMUM_MINUTES: 60,
}
LIMIT_MAXIMUM_MINUTES = 35_000  # CML's documented ceiling for all three


def _unit_fraction(seed: str | int, attempt: int) -> float:
    """A number in [0, 1) fixed by (seed, attempt), equal in every process (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed job run is tried again.

    After attempt ``n`` (1-based) fails, attempt ``n + 1`` starts after
    ``min(max_delay, initial_delay * multiplier ** (n - 1))``, shortened by up to ``jitter`` of
    itself: with jitter 0.2 a 40 s backoff becomes something in (32 s, 40 s]. The jitter is
    drawn from ``(seed, n)`` (use the run's id), so runs failing together spread out while any
    runner computes the same time for one run. The cap is never exceeded.
    """

    retries: int = 0  # extra attempts after the first
    initial_delay: timedelta = timedelta(seconds=30)
    multiplier: float = 2.0
    max_delay: timedelta = timedelta(hours=1)
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidInput(f"retries must be between 0 and {MAX_RETRIES}")
        if not timedelta(0) < self.initial_delay <= self.max_delay:
            raise InvalidInput("initial retry delay must be positive and at most the maximum")
        if self.max_delay > MAX_BACKOFF:
            raise InvalidInput("maximum retry delay must be at most 24 hours")
        if not 1.0 <= self.multiplier <= 10.0:
            raise InvalidInput("retry backoff multiplier must be between 1 and 10")
        if not 0.0 <= self.jitter <= 1.0:
            raise InvalidInput("retry jitter must be between 0 and 1")

    def delay(self, attempt: int, seed: str | int) -> timedelta:
        """The wait after attempt ``attempt`` failed, before the next one, to the millisecond."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        # Exponent capped so a huge attempt number cannot overflow; the cap binds long before.
        ceiling = self.max_delay.total_seconds()
        raw = self.initial_delay.total_seconds() * self.multiplier ** min(attempt - 1, 64)
        full = min(ceiling, raw)
        wait = full * (1.0 - self.jitter * _unit_fraction(seed, attempt))
        return timedelta(milliseconds=max(1, round(wait * 1000)))

    def next_attempt_at(
        self, attempt: int, outcome: Outcome, ended_at: datetime, seed: str | int
    ) -> datetime | None:
        """When attempt ``attempt + 1`` may start, or None: record the failure as final.

        Only failures are retried, and only those the workload met by itself: a stop the
        runner was asked for (cancel, timeout, a start that timed out) is never retried.
        """
        if outcome.event is not Event.FAIL or outcome.stop_cause is not None:
            return None
        if attempt > self.retries:
            return None
        return ended_at + self.delay(attempt, seed)


def parse_limit_minutes(name: str, value: str) -> int:
    """A time-limit variable's value as whole minutes, 1 to 35,000, or ``InvalidInput``.

    Called when a site, project or job sets the variable, so a bad value is refused then and
    not discovered by a run.
    """
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"{name} must be a whole number of minutes, got {value[:20]!r}")
    minutes = int(text)
    if not 1 <= minutes <= LIMIT_MAXIMUM_MINUTES:
        raise InvalidInput(f"{name} must be between 1 and {LIMIT_MAXIMUM_MINUTES} minutes")
    return minutes


def limit_minutes(env: Mapping[str, str], name: str) -> int:
    """The limit ``name`` in effect for a workload with the merged environment ``env``."""
    if name not in LIMIT_DEFAULTS:
        raise ValueError(f"{name} is not a time-limit variable")
    if name not in env:
        return LIMIT_DEFAULTS[name]
    return parse_limit_minutes(name, env[name])


def deadline(started_at: datetime, env: Mapping[str, str], name: str) -> datetime:
    """When a workload that entered ``starting`` at ``started_at`` must be stopped.

    The clock starts at the claim, not when the workload is ready, so a start that hangs is
    bounded too. For a job: ``deadline(run.started_at, merged_env, JOB_MAXIMUM_MINUTES)``;
    past it the runner takes ``STOP`` with ``StopCause.TIMEOUT``.
    """
    if started_at.tzinfo is None:
        raise ValueError("started_at must be an aware datetime")
    return started_at + timedelta(minutes=limit_minutes(env, name))


def job_deadline(started_at: datetime, env: Mapping[str, str]) -> datetime:
    return deadline(started_at, env, JOB_MAXIMUM_MINUTES)
