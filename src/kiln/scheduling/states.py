"""The one state machine every workload follows: sessions, job runs, and later replicas, apps
and builds.

::

    event     from                                         to
    CLAIM     queued, waiting                              starting
    BLOCK     queued, waiting                              waiting    (reason stored beside)
    READY     starting                                     running
    SUCCEED   starting, running                            succeeded
    FAIL      queued, waiting, starting, running, stopping failed
    RETRY     starting, running                            waiting    (back edge, see below)
    CANCEL    queued, waiting                              stopped
    STOP      starting, running                            stopping
    STOPPED   stopping                                     stopped
    TIME_OUT  stopping                                     timed_out

States:

* ``queued``: accepted and durable; no workload exists yet.
* ``waiting``: cannot start yet; the row carries the reason shown to the user (over the
  user's or team's quota, at the job's maximum of concurrent runs, retry backoff until T).
* ``starting``: a runner claimed it and is creating the workload. A job that exits before the
  runner sees it up may go straight to ``succeeded``/``failed``.
* ``running``: the workload is up (job process started; session editor answering).
* ``stopping``: someone or something decided to end it (cancel, timeout, idle, lifetime); the
  runner kills the workload and then records the ending that decision implies. Recording the
  intent first means a runner that crashes mid-kill finishes the job after its restart.
* Terminal, final, exactly one per run: ``succeeded`` (exit 0), ``failed`` (could not start,
  non-zero exit, out of memory, lost while the runner was down: see :func:`outcome` for the
  reason text), ``timed_out`` (a time limit ended it), ``stopped`` (ended on request: a user's
  cancel or stop; CML's word for both).

Retries are a back edge, not a second life: when an attempt fails and the retry policy allows
another, the runner takes ``RETRY`` (to ``waiting``) *instead of* ``FAIL``, so ``failed`` is
written once, for the last attempt.

Concurrency: each event has a fixed set of source states, so the DB does the transition as
one compare-and-set, ``UPDATE ... SET state = :target WHERE id = :id AND state IN
(:sources)``. Of two runners racing to claim a run, one updates a row and the other updates
none; that one re-reads the state and raises :func:`refusal` (409, a clean message).
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from kiln.domain.errors import Conflict


class WorkloadState(enum.StrEnum):
    QUEUED = "queued"
    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    STOPPED = "stopped"


S = WorkloadState
PENDING_STATES = frozenset({S.QUEUED, S.WAITING})  # no workload exists yet
LIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.STOPPING})  # a workload may exist: poll it
TERMINAL_STATES = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.STOPPED})


class Event(enum.StrEnum):
    """What happened to a workload; each event has fixed source states and one target."""

    CLAIM = "claim"  # a runner takes the run to start it
    BLOCK = "block"  # it cannot start yet (quota, concurrency); the reason is stored beside
    READY = "ready"  # the workload is up
    SUCCEED = "succeed"  # it exited with code 0 by itself
    FAIL = "fail"  # it could not start, exited non-zero, ran out of memory, or was lost
    RETRY = "retry"  # the attempt failed and the retry policy allows another after a backoff
    CANCEL = "cancel"  # stop before any workload exists: nothing to tear down
    STOP = "stop"  # stop a live workload: it is stopping until it is gone
    STOPPED = "stopped"  # a requested stop finished
    TIME_OUT = "time_out"  # a stop forced by a time limit finished


@dataclass(frozen=True)
class Rule:
    sources: frozenset[WorkloadState]
    target: WorkloadState


RULES: dict[Event, Rule] = {
    Event.CLAIM: Rule(PENDING_STATES, S.STARTING),
    Event.BLOCK: Rule(PENDING_STATES, S.WAITING),
    Event.READY: Rule(frozenset({S.STARTING}), S.RUNNING),
    Event.SUCCEED: Rule(frozenset({S.STARTING, S.RUNNING}), S.SUCCEEDED),
    Event.FAIL: Rule(PENDING_STATES | LIVE_STATES, S.FAILED),
    Event.RETRY: Rule(frozenset({S.STARTING, S.RUNNING}), S.WAITING),
    Event.CANCEL: Rule(PENDING_STATES, S.STOPPED),
    Event.STOP: Rule(frozenset({S.STARTING, S.RUNNING}), S.STOPPING),
    Event.STOPPED: Rule(frozenset({S.STOPPING}), S.STOPPED),
    Event.TIME_OUT: Rule(frozenset({S.STOPPING}), S.TIMED_OUT),
}

# The state graph: every (from, to) pair some event allows.
ALLOWED: dict[WorkloadState, frozenset[WorkloadState]] = {
    state: frozenset(rule.target for rule in RULES.values() if state in rule.sources)
    for state in WorkloadState
}


class IllegalTransition(Conflict):
    """A state change the machine forbids, or one another actor got to first (HTTP 409)."""

    title = "State conflict"

    def __init__(
        self, detail: str, current: WorkloadState, target: WorkloadState | None = None
    ) -> None:
        super().__init__(detail)
        self.current = current
        self.target = target


def is_terminal(state: WorkloadState) -> bool:
    return state in TERMINAL_STATES


def sources(event: Event) -> tuple[WorkloadState, ...]:
    """The states ``event`` may leave, sorted: the ``IN (...)`` list of its compare-and-set."""
    return tuple(sorted(RULES[event].sources))


def target(event: Event) -> WorkloadState:
    return RULES[event].target


def sources_for(new: WorkloadState) -> tuple[WorkloadState, ...]:
    """Every state some event may move to ``new`` from, sorted.

    Prefer :func:`sources` of the event you mean: ``stopped`` is reached from ``queued`` by a
    cancel but from ``stopping`` only when the kill is done, and only the event says which.
    """
    return tuple(sorted(s for s, targets in ALLOWED.items() if new in targets))


def can_transition(current: WorkloadState, new: WorkloadState) -> bool:
    return new in ALLOWED[current]


def _describe_refusal(current: WorkloadState, new: WorkloadState, what: str) -> str:
    if is_terminal(current):
        return f"{what} already ended ({current}); it cannot become {new}"
    if current == new:
        return f"{what} is already {current}"
    allowed = ", ".join(sorted(ALLOWED[current])) or "nothing"
    return f"{what} is {current} and cannot become {new} (from {current}: {allowed})"


def check_transition(current: WorkloadState, new: WorkloadState, what: str = "run") -> None:
    """Raise :class:`IllegalTransition` unless the graph allows ``current -> new``."""
    if not can_transition(current, new):
        raise IllegalTransition(_describe_refusal(current, new, what), current, new)


def transition(current: WorkloadState, event: Event, what: str = "run") -> WorkloadState:
    """The state ``event`` leads to from ``current``, or :class:`IllegalTransition`."""
    if current not in RULES[event].sources:
        raise refusal(current, event, what)
    return RULES[event].target


def refusal(current: WorkloadState, event: Event, what: str = "run") -> IllegalTransition:
    """The error for an ``event`` that found the run in ``current``.

    Use it when a compare-and-set updated no row: re-read the state and raise this, so the
    loser of a race gets "run 7 is already starting", not a 500 or a silent no-op.
    """
    new = RULES[event].target
    if is_terminal(current) or current == new:
        detail = _describe_refusal(current, new, what)
    else:
        expected = ", ".join(sources(event))
        detail = f"{what} is {current}; {event} needs it to be {expected}"
    return IllegalTransition(detail, current, new)


class StopCause(enum.StrEnum):
    """Why a live workload is being stopped; decides the terminal state once it is gone."""

    REQUESTED = "requested"  # a user or operator asked (job cancel, session stop)
    PARENT_ENDED = "parent_ended"  # workers die with their session
    TIMEOUT = "timeout"  # JOB_MAXIMUM_MINUTES
    IDLE = "idle"  # IDLE_MAXIMUM_MINUTES without activity
    LIFETIME = "lifetime"  # SESSION_MAXIMUM_MINUTES
    START_TIMEOUT = "start_timeout"  # never became ready: a start failure, not a time limit

    @property
    def ending(self) -> Event:
        """The event that records the end of a stop with this cause."""
        if self in (StopCause.REQUESTED, StopCause.PARENT_ENDED):
            return Event.STOPPED
        if self is StopCause.START_TIMEOUT:
            return Event.FAIL
        return Event.TIME_OUT

    @property
    def reason(self) -> str:
        return _STOP_REASONS[self]


_STOP_REASONS = {
    StopCause.REQUESTED: "stopped on request",
    StopCause.PARENT_ENDED: "its parent session ended",
    StopCause.TIMEOUT: "ran longer than its time limit (JOB_MAXIMUM_MINUTES)",
    StopCause.IDLE: "idle for longer than IDLE_MAXIMUM_MINUTES",
    StopCause.LIFETIME: "ran longer than SESSION_MAXIMUM_MINUTES",
    StopCause.START_TIMEOUT: "did not become ready in time",
}


def stop_event(current: WorkloadState, what: str = "run") -> Event | None:
    """The event a stop/cancel request takes from ``current``.

    ``CANCEL`` when nothing was started, ``STOP`` when a workload may be live, ``None`` when
    it is already stopping (repeat requests are harmless), :class:`IllegalTransition` when
    it has ended.
    """
    if current in PENDING_STATES:
        return Event.CANCEL
    if current is S.STOPPING:
        return None
    if current in RULES[Event.STOP].sources:
        return Event.STOP
    raise IllegalTransition(f"{what} already ended ({current}); there is nothing to stop", current)


@dataclass(frozen=True)
class Outcome:
    """How a workload ended: the event to record and the reason to show."""

    event: Event
    reason: str
    stop_cause: StopCause | None = None  # set when a deliberate stop ended it


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {_signal_name(-code)}"
    if 128 < code < 128 + 65:  # a shell reports a child killed by signal n as 128 + n
        return f"exited with code {code} (128 + {_signal_name(code - 128)})"
    return f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(
    exit_code: int | None, *, oom_killed: bool = False, stop_cause: StopCause | None = None
) -> Outcome:
    """Classify the end of a workload from what the runtime reported.

    ``exit_code`` follows ``Popen.returncode``: 0 success, > 0 failure, -n killed by signal
    n, ``None`` when the workload vanished without a status (for example while the runner was
    down). A recorded ``stop_cause`` wins over the exit status: a session's editor that exits
    0 on SIGTERM was still stopped, not successful. Out of memory is a failure whose reason
    says so, not a state of its own (webhooks and badges know success, failure, timeout).
    """
    if stop_cause is not None:
        return Outcome(stop_cause.ending, stop_cause.reason, stop_cause)
    if oom_killed:
        return Outcome(Event.FAIL, "out of memory: killed for exceeding its memory limit")
    if exit_code is None:
        return Outcome(Event.FAIL, "the workload disappeared without an exit status")
    if exit_code == 0:
        return Outcome(Event.SUCCEED, _describe_exit(0))
    return Outcome(Event.FAIL, _describe_exit(exit_code))
