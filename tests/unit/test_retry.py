"""Retry backoff with deterministic jitter, and the CML time-limit variables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.domain.errors import InvalidInput
from kiln.scheduling.retry import (
    IDLE_MAXIMUM_MINUTES,
    JOB_MAXIMUM_MINUTES,
    SESSION_MAXIMUM_MINUTES,
    RetryPolicy,
    deadline,
    job_deadline,
    limit_minutes,
    parse_limit_minutes,
)
from kiln.scheduling.states import Event, Outcome, StopCause, outcome

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
FAILED = outcome(1)


def test_without_jitter_the_delay_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, initial_delay=timedelta(seconds=10), jitter=0.0)
    delays = [policy.delay(n, seed="run-1").total_seconds() for n in range(1, 11)]
    assert delays == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]


def test_jitter_only_shortens_and_stays_within_its_fraction() -> None:
    policy = RetryPolicy(retries=5, initial_delay=timedelta(seconds=40), jitter=0.2)
    for seed in range(200):
        wait = policy.delay(1, seed).total_seconds()
        assert 32.0 <= wait <= 40.0


def test_jitter_is_deterministic_per_run_and_attempt_but_spreads_runs() -> None:
    policy = RetryPolicy(retries=3, jitter=0.5)
    assert policy.delay(2, "run-42") == policy.delay(2, "run-42")
    assert policy.delay(2, 42) == policy.delay(2, "42")  # the seed's text is what counts
    spread = {policy.delay(1, f"run-{i}") for i in range(100)}
    assert len(spread) > 90  # a hundred runs failing together do not retry together


def test_a_huge_attempt_number_is_capped_not_an_overflow() -> None:
    policy = RetryPolicy(retries=10, multiplier=10.0, jitter=0.0)
    assert policy.delay(10_000, "x") == policy.max_delay


def test_delay_is_at_least_a_millisecond_and_attempts_start_at_one() -> None:
    policy = RetryPolicy(retries=1, initial_delay=timedelta(microseconds=1), jitter=1.0)
    assert policy.delay(1, "x") >= timedelta(milliseconds=1)
    with pytest.raises(ValueError, match="numbered from 1"):
        policy.delay(0, "x")


def test_next_attempt_only_after_a_failure_the_workload_met_by_itself() -> None:
    policy = RetryPolicy(retries=2, jitter=0.0)
    assert policy.next_attempt_at(1, FAILED, T0, "r") == T0 + timedelta(seconds=30)
    assert policy.next_attempt_at(2, FAILED, T0, "r") == T0 + timedelta(seconds=60)
    assert policy.next_attempt_at(3, FAILED, T0, "r") is None  # retries used up
    assert policy.next_attempt_at(1, outcome(0), T0, "r") is None
    assert policy.next_attempt_at(1, outcome(None), T0, "r") is not None  # lost: retry
    assert policy.next_attempt_at(1, outcome(-9, oom_killed=True), T0, "r") is not None
    for cause in StopCause:  # cancel, timeouts and start timeouts are never retried
        assert policy.next_attempt_at(1, outcome(1, stop_cause=cause), T0, "r") is None
    assert RetryPolicy().next_attempt_at(1, FAILED, T0, "r") is None  # default: no retries
    assert policy.next_attempt_at(1, Outcome(Event.TIME_OUT, "x"), T0, "r") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be between 0 and 10"),
        ({"retries": 11}, "retries must be between 0 and 10"),
        ({"initial_delay": timedelta(0)}, "initial retry delay must be positive"),
        ({"initial_delay": timedelta(hours=2)}, "at most the maximum"),
        (
            {"max_delay": timedelta(days=2), "initial_delay": timedelta(seconds=1)},
            "at most 24 hours",
        ),
        ({"multiplier": 0.5}, "multiplier must be between 1 and 10"),
        ({"multiplier": 11.0}, "multiplier must be between 1 and 10"),
        ({"jitter": -0.1}, "jitter must be between 0 and 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
    ],
)
def test_bad_retry_settings_are_invalid_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert message in caught.value.detail


@settings(max_examples=200, deadline=None, database=None)
@given(
    retries=st.integers(0, 10),
    initial=st.integers(1, 600),
    multiplier=st.floats(1.0, 10.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.text(max_size=20),
)
def test_delays_never_exceed_the_cap_and_never_shrink_without_jitter(
    retries: int, initial: int, multiplier: float, jitter: float, seed: str
) -> None:
    policy = RetryPolicy(
        retries=retries,
        initial_delay=timedelta(seconds=initial),
        multiplier=multiplier,
        jitter=jitter,
        max_delay=timedelta(hours=1),
    )
    plain = RetryPolicy(
        retries=retries,
        initial_delay=timedelta(seconds=initial),
        multiplier=multiplier,
        jitter=0.0,
        max_delay=timedelta(hours=1),
    )
    previous = timedelta(0)
    for attempt in range(1, 15):
        wait, full = policy.delay(attempt, seed), plain.delay(attempt, seed)
        assert timedelta(0) < wait <= full <= timedelta(hours=1)
        assert wait >= full * (1 - jitter) - timedelta(milliseconds=1)
        assert full >= previous
        previous = full


# -- Time limits -----------------------------------------------------------------------------


def test_limits_default_to_cml_values() -> None:
    assert limit_minutes({}, JOB_MAXIMUM_MINUTES) == 7 * 24 * 60
    assert limit_minutes({}, SESSION_MAXIMUM_MINUTES) == 7 * 24 * 60
    assert limit_minutes({}, IDLE_MAXIMUM_MINUTES) == 60


def test_the_merged_environment_sets_the_deadline() -> None:
    assert job_deadline(T0, {"JOB_MAXIMUM_MINUTES": "90"}) == T0 + timedelta(minutes=90)
    assert job_deadline(T0, {}) == T0 + timedelta(days=7)
    env = {"SESSION_MAXIMUM_MINUTES": " 120 "}
    assert deadline(T0, env, SESSION_MAXIMUM_MINUTES) == T0 + timedelta(hours=2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "between 1 and 35000 minutes"),
        ("35001", "between 1 and 35000 minutes"),
        ("-5", "must be a whole number of minutes, got '-5'"),
        ("1.5", "must be a whole number of minutes"),
        ("", "must be a whole number of minutes"),
        ("ten", "must be a whole number of minutes, got 'ten'"),
        ("١٢", "must be a whole number of minutes"),
        ("9" * 100, "between 1 and 35000 minutes"),
    ],
)
def test_bad_limit_values_are_refused(value: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_limit_minutes(JOB_MAXIMUM_MINUTES, value)
    assert caught.value.detail.startswith("JOB_MAXIMUM_MINUTES must be")
    assert message in caught.value.detail
    with pytest.raises(InvalidInput):
        job_deadline(T0, {JOB_MAXIMUM_MINUTES: value})


def test_programming_errors_are_not_user_errors() -> None:
    with pytest.raises(ValueError, match="not a time-limit variable"):
        limit_minutes({}, "PATH")
    with pytest.raises(ValueError, match="aware"):
        job_deadline(datetime(2024, 5, 1), {})
