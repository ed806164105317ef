"""The workload state machine: its graph, its refusals, and compare-and-set against real SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.domain.errors import Conflict, KilnError
from kiln.scheduling.states import (
    ALLOWED,
    LIVE_STATES,
    PENDING_STATES,
    RULES,
    TERMINAL_STATES,
    Event,
    IllegalTransition,
    StopCause,
    WorkloadState,
    can_transition,
    check_transition,
    is_terminal,
    outcome,
    refusal,
    sources,
    sources_for,
    stop_event,
    target,
    transition,
)

S = WorkloadState


def test_states_partition_into_pending_live_and_terminal() -> None:
    assert set(WorkloadState) == PENDING_STATES | LIVE_STATES | TERMINAL_STATES
    assert not PENDING_STATES & LIVE_STATES
    assert not LIVE_STATES & TERMINAL_STATES
    assert not PENDING_STATES & TERMINAL_STATES


def test_the_transition_table_is_exactly_the_documented_one() -> None:
    expected = {
        Event.CLAIM: ({S.QUEUED, S.WAITING}, S.STARTING),
        Event.BLOCK: ({S.QUEUED, S.WAITING}, S.WAITING),
        Event.READY: ({S.STARTING}, S.RUNNING),
        Event.SUCCEED: ({S.STARTING, S.RUNNING}, S.SUCCEEDED),
        Event.FAIL: ({S.QUEUED, S.WAITING, S.STARTING, S.RUNNING, S.STOPPING}, S.FAILED),
        Event.RETRY: ({S.STARTING, S.RUNNING}, S.WAITING),
        Event.CANCEL: ({S.QUEUED, S.WAITING}, S.STOPPED),
        Event.STOP: ({S.STARTING, S.RUNNING}, S.STOPPING),
        Event.STOPPED: ({S.STOPPING}, S.STOPPED),
        Event.TIME_OUT: ({S.STOPPING}, S.TIMED_OUT),
    }
    assert {e: (set(r.sources), r.target) for e, r in RULES.items()} == expected
    assert set(RULES) == set(Event)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_terminal_states_are_final(state: WorkloadState) -> None:
    assert is_terminal(state)
    assert ALLOWED[state] == frozenset()
    for event in Event:
        with pytest.raises(IllegalTransition) as caught:
            transition(state, event)
        assert f"already ended ({state})" in caught.value.detail


def test_every_state_is_reachable_and_every_non_terminal_state_can_end() -> None:
    reachable, frontier = {S.QUEUED}, [S.QUEUED]
    while frontier:
        for nxt in ALLOWED[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(WorkloadState)
    for state in set(WorkloadState) - TERMINAL_STATES:
        assert ALLOWED[state] & TERMINAL_STATES or any(
            ALLOWED[n] & TERMINAL_STATES for n in ALLOWED[state]
        ), state


@pytest.mark.parametrize("state", list(WorkloadState))
@pytest.mark.parametrize("event", list(Event))
def test_transition_allows_exactly_the_event_sources(state: WorkloadState, event: Event) -> None:
    if state in sources(event):
        assert transition(state, event) == target(event)
        assert can_transition(state, target(event))
        check_transition(state, target(event))
    else:
        with pytest.raises(IllegalTransition) as caught:
            transition(state, event, what="job run 7")
        error = caught.value
        assert isinstance(error, Conflict) and isinstance(error, KilnError)
        assert error.status == 409
        assert error.detail.startswith("job run 7 ")
        assert error.current == state and error.target == target(event)


def test_check_transition_refuses_with_a_readable_reason() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(S.QUEUED, S.RUNNING, what="session abc")
    assert caught.value.detail == (
        "session abc is queued and cannot become running "
        "(from queued: failed, starting, stopped, waiting)"
    )
    with pytest.raises(IllegalTransition, match="already ended"):
        check_transition(S.SUCCEEDED, S.FAILED)
    with pytest.raises(IllegalTransition, match="is already starting"):
        check_transition(S.STARTING, S.STARTING)
    check_transition(S.WAITING, S.WAITING)  # a new waiting reason is a legal update


def test_sources_are_sorted_strings_ready_for_sql() -> None:
    assert sources(Event.CLAIM) == (S.QUEUED, S.WAITING)
    assert [str(s) for s in sources(Event.FAIL)] == sorted(str(s) for s in sources(Event.FAIL))
    # sources_for(target) is the union over events: wider than any one event's sources.
    assert sources_for(S.STOPPED) == (S.QUEUED, S.STOPPING, S.WAITING)
    assert set(sources(Event.CANCEL)) < set(sources_for(S.STOPPED))


def test_stop_requests_pick_the_right_event_and_repeat_harmlessly() -> None:
    assert stop_event(S.QUEUED) == Event.CANCEL
    assert stop_event(S.WAITING) == Event.CANCEL
    assert stop_event(S.STARTING) == Event.STOP
    assert stop_event(S.RUNNING) == Event.STOP
    assert stop_event(S.STOPPING) is None
    for state in TERMINAL_STATES:
        with pytest.raises(IllegalTransition, match="nothing to stop"):
            stop_event(state, what="job run 3")


@pytest.mark.parametrize(
    ("cause", "event", "final"),
    [
        (StopCause.REQUESTED, Event.STOPPED, S.STOPPED),
        (StopCause.PARENT_ENDED, Event.STOPPED, S.STOPPED),
        (StopCause.TIMEOUT, Event.TIME_OUT, S.TIMED_OUT),
        (StopCause.IDLE, Event.TIME_OUT, S.TIMED_OUT),
        (StopCause.LIFETIME, Event.TIME_OUT, S.TIMED_OUT),
        (StopCause.START_TIMEOUT, Event.FAIL, S.FAILED),
    ],
)
def test_each_stop_cause_ends_in_its_terminal_state(
    cause: StopCause, event: Event, final: WorkloadState
) -> None:
    assert cause.ending == event
    assert transition(S.STOPPING, cause.ending) == final
    # Whatever the process did while being stopped, the recorded cause decides.
    for exit_code in (0, 1, -9, None):
        result = outcome(exit_code, stop_cause=cause)
        assert result.event == event and result.stop_cause is cause
        assert result.reason == cause.reason


@pytest.mark.parametrize(
    ("exit_code", "oom", "event", "reason"),
    [
        (0, False, Event.SUCCEED, "exited with code 0"),
        (1, False, Event.FAIL, "exited with code 1"),
        (2, False, Event.FAIL, "exited with code 2"),
        (-9, False, Event.FAIL, "killed by signal SIGKILL"),
        (-15, False, Event.FAIL, "killed by signal SIGTERM"),
        (-99, False, Event.FAIL, "killed by signal signal 99"),
        (137, False, Event.FAIL, "exited with code 137 (128 + SIGKILL)"),
        (255, False, Event.FAIL, "exited with code 255"),
        (None, False, Event.FAIL, "the workload disappeared without an exit status"),
        (-9, True, Event.FAIL, "out of memory"),
        (137, True, Event.FAIL, "out of memory"),
    ],
)
def test_outcome_of_an_exit(exit_code: int | None, oom: bool, event: Event, reason: str) -> None:
    result = outcome(exit_code, oom_killed=oom)
    assert result.event == event
    assert reason in result.reason
    assert result.stop_cause is None


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=25))
def test_any_event_sequence_reaches_at_most_one_terminal_state(events: list[Event]) -> None:
    state, terminal_writes = S.QUEUED, 0
    for event in events:
        try:
            new = transition(state, event)
        except IllegalTransition as error:
            assert error.current == state
            continue
        assert can_transition(state, new)
        if is_terminal(new):
            terminal_writes += 1
        state = new
    assert terminal_writes <= 1
    if terminal_writes:
        assert is_terminal(state)


# -- Compare-and-set as the DB layer will do it (stdlib sqlite3, two connections) -------------


def _apply(conn: sqlite3.Connection, run_id: int, event: Event, runner: str) -> WorkloadState:
    """One compare-and-set: ``UPDATE ... WHERE state IN (sources(event))``, then refusal."""
    marks = ",".join("?" * len(sources(event)))
    cursor = conn.execute(
        f"UPDATE runs SET state = ?, runner = ? WHERE id = ? AND state IN ({marks})",
        (str(target(event)), runner, run_id, *map(str, sources(event))),
    )
    conn.commit()
    if cursor.rowcount == 1:
        return target(event)
    (current,) = conn.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
    raise refusal(WorkloadState(current), event, what=f"run {run_id}")


def test_two_runners_racing_to_claim_one_wins_the_other_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    setup = sqlite3.connect(db)
    setup.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, state TEXT NOT NULL, runner TEXT)")
    setup.execute("INSERT INTO runs (id, state) VALUES (7, 'queued')")
    setup.commit()
    runner_a, runner_b = sqlite3.connect(db), sqlite3.connect(db)
    # Both saw the run queued; both try to claim it.
    assert _apply(runner_a, 7, Event.CLAIM, "a") == S.STARTING
    with pytest.raises(IllegalTransition) as caught:
        _apply(runner_b, 7, Event.CLAIM, "b")
    assert caught.value.detail == "run 7 is already starting"
    assert caught.value.status == 409
    assert setup.execute("SELECT state, runner FROM runs").fetchone() == ("starting", "a")
    # A cancel racing the job's own success: whichever commits second is refused.
    assert _apply(runner_a, 7, Event.READY, "a") == S.RUNNING
    assert _apply(runner_a, 7, Event.SUCCEED, "a") == S.SUCCEEDED
    with pytest.raises(IllegalTransition) as late_cancel:
        _apply(runner_b, 7, Event.STOP, "b")
    assert late_cancel.value.detail == "run 7 already ended (succeeded); it cannot become stopping"
    assert setup.execute("SELECT state FROM runs").fetchone() == ("succeeded",)
    for conn in (setup, runner_a, runner_b):
        conn.close()


def test_refusal_names_the_states_an_event_needed() -> None:
    error = refusal(S.QUEUED, Event.READY, what="session s1")
    assert error.detail == "session s1 is queued; ready needs it to be starting"
