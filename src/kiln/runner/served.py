"""What the keepers of served workloads share (applications' instances, models' replicas):
waiting for quota before a start, and stopping with the cause recorded first.

Both keepers run in the reconciler's thread; ``stop_later`` hands the slow part of a stop
(the workload's grace period) to the reconciler's stop pool.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import app_instances as instances
from kiln.domain.resources import Resources, quota_wait_reason
from kiln.domain.sessions import add_event
from kiln.domain.transitions import move
from kiln.scheduling.states import PENDING_STATES, Event, StopCause, WorkloadState
from kiln.settings import Settings


class StopLater(Protocol):
    """Stop a workload in the background (the reconciler's stop pool); ``grace``: seconds
    from SIGTERM to SIGKILL, the runner client's default when None."""

    def __call__(
        self, runner_workload_id: str, reason: str, grace: float | None = None
    ) -> None: ...


def must_wait(
    db: Session, settings: Settings, project: Project, instance: Workload, gone: str
) -> bool:
    """Keep a new workload waiting while it does not fit its user's (or team's) quota; one
    whose user is gone fails, saying ``gone`` (committed when something changed)."""
    user = db.get(User, instance.user_id) if instance.user_id else None
    if user is None or not user.is_active:
        instances.fail(db, instance, gone)
        return True
    request = Resources(instance.cpu_millis, instance.memory_bytes, instance.gpu)
    reason = quota_wait_reason(db, settings, user, request, project)
    if reason is None:
        return False
    if instance.reason != reason:
        name = instances.served(instance).name(instance)
        move(db, instance, Event.BLOCK, name, reason=reason[:500])
        add_event(db, instance, reason)
        db.commit()
    return True


def cancel_pending(db: Session, instance: Workload, reason: str) -> None:
    """End a workload that never started (flushed): nothing runs, nothing to stop."""
    move(
        db,
        instance,
        Event.CANCEL,
        instances.served(instance).name(instance),
        reason=reason[:500],
        ended_at=utcnow(),
        stop_cause=StopCause.REQUESTED.value,
    )
    add_event(db, instance, reason)


def stop(
    db: Session,
    instance: Workload,
    reason: str,
    stop_later: StopLater,
    grace: float | None = None,
) -> None:
    """Record the stop (its cause first, committed), then stop it in the background."""
    state = WorkloadState(instance.state)
    kind = instances.served(instance)
    if state in PENDING_STATES:
        cancel_pending(db, instance, reason)
    elif state in (WorkloadState.STARTING, WorkloadState.RUNNING):
        move(
            db,
            instance,
            Event.STOP,
            kind.name(instance),
            stop_cause=StopCause.REQUESTED.value,
            reason=reason[:500],
        )
        add_event(db, instance, reason)
    db.commit()
    if WorkloadState(instance.state) == WorkloadState.STOPPING:
        stop_later(kind.runner_id(instance), reason, grace)
