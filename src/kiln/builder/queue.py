"""The build queue, as a builder works it: claim, heartbeat, record, finish, recover.

The database is the queue. Claims are exactly-once: on PostgreSQL the candidates are read
with ``FOR UPDATE SKIP LOCKED`` (two builders never even look at the same row), and on both
databases the claim itself is the state machine's compare-and-set (``queued|waiting →
starting``), which SQLite's single writer makes safe on its own. A build that does not fit
its user's (or its team's) quota stays ``waiting`` with the reason, like a session.

A claimed build carries ``claimed_by`` (the builder's name) and a ``heartbeat_at`` the
builder renews. A build whose builder died — found at that builder's next start, or by any
builder once its heartbeat is older than ``lost_after_seconds`` — is retried once
(``attempt`` 2, back to ``waiting``); a second loss fails it with the reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from kiln.db.build_models import Build, BuildCacheEntry
from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import transitions
from kiln.domain.builds import KIND
from kiln.domain.errors import Conflict
from kiln.domain.resources import Resources, quota_wait_reason
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    Event,
    IllegalTransition,
    StopCause,
    WorkloadState,
)
from kiln.settings import Settings

MAX_ATTEMPTS = 2  # a build lost with its builder is retried once
CANDIDATES = 20


@dataclass
class Claimed:
    build: Build
    workload: Workload
    project: Project


@dataclass
class Lost:
    """A build whose builder died; ``runtime_state`` re-attaches to its sandbox, if any."""

    workload_id: str
    runtime_state: dict[str, Any]
    outcome: str  # "retried", "failed", "stopped"


def _what(build: Build) -> str:
    return f"build {build.number}"


def claim_next(db: Session, settings: Settings, builder: str) -> Claimed | None:
    """Claim the oldest queued build that fits its quotas (commits), or None."""
    query = (
        select(Workload)
        .where(Workload.kind == KIND, Workload.state.in_([s.value for s in PENDING_STATES]))
        .order_by(Workload.created_at, Workload.id)
        .limit(CANDIDATES)
    )
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    try:
        for workload in list(db.scalars(query)):
            build = db.get(Build, workload.id)
            project = db.get(Project, workload.project_id)
            if build is None or project is None:
                continue
            user = db.get(User, workload.user_id) if workload.user_id is not None else None
            if user is None:
                transitions.move(
                    db, workload, Event.FAIL, _what(build),
                    reason="the user who started it no longer exists", ended_at=utcnow(),
                )  # fmt: skip
                continue
            request = Resources(workload.cpu_millis, workload.memory_bytes, 0)
            reason = quota_wait_reason(db, settings, user, request, project)
            if reason is not None:
                if workload.state != WorkloadState.WAITING or workload.reason != reason:
                    transitions.move(db, workload, Event.BLOCK, _what(build), reason=reason)
                continue
            try:
                transitions.move(
                    db, workload, Event.CLAIM, _what(build), reason="", started_at=utcnow()
                )
            except IllegalTransition:
                continue  # another builder, or a cancel, got there first
            now = utcnow()
            build.claimed_by, build.heartbeat_at, build.steps = builder, now, []
            db.commit()
            return Claimed(build, workload, project)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return None


def heartbeat(db: Session, builder: str, workload_ids: list[str]) -> None:
    if workload_ids:
        db.execute(
            update(Build)
            .where(Build.workload_id.in_(workload_ids), Build.claimed_by == builder)
            .values(heartbeat_at=utcnow())
        )
        db.commit()


def mark_running(db: Session, workload: Workload) -> None:
    """The build is under way (its first step runs)."""
    try:
        transitions.move(db, workload, Event.READY, "build")
    except IllegalTransition:
        db.rollback()  # cancelled meanwhile: the worker sees it at its next check
        return
    db.commit()


def is_stopping(db: Session, workload_id: str) -> bool:
    state = db.scalar(select(Workload.state).where(Workload.id == workload_id))
    return state is None or state == WorkloadState.STOPPING


def record(db: Session, workload_id: str, **values: Any) -> None:
    """Write build fields (steps, results) of a running build."""
    db.execute(update(Build).where(Build.workload_id == workload_id).values(**values))
    db.commit()


def finish(db: Session, workload: Workload, event: Event, reason: str, **build_values: Any) -> None:
    """Record how the attempt ended (succeeded, failed, stopped or timed out)."""
    db.refresh(workload)
    build = db.get(Build, workload.id)
    what = _what(build) if build else "build"
    if build_values:
        db.execute(update(Build).where(Build.workload_id == workload.id).values(**build_values))
    if event is Event.SUCCEED and workload.state == WorkloadState.STOPPING:
        event = Event.STOPPED  # cancelled as it finished: a cancel is what the user saw last
    try:
        if event is Event.STOPPED and workload.state != WorkloadState.STOPPING:
            transitions.move(db, workload, Event.STOP, what, stop_cause=StopCause.REQUESTED.value)
        if event is Event.TIME_OUT and workload.state != WorkloadState.STOPPING:
            transitions.move(db, workload, Event.STOP, what, stop_cause=StopCause.TIMEOUT.value)
        values: dict[str, Any] = {"ended_at": utcnow(), "runtime_state": {}}
        if event is not Event.STOPPED or not workload.reason:
            values["reason"] = reason[:500]
        transitions.move(db, workload, event, what, **values)
    except IllegalTransition:
        db.rollback()
        return
    db.commit()


def recover_lost(
    db: Session,
    builder: str,
    lost_after: float,
    *,
    own: bool,
    active: set[str],
) -> list[Lost]:
    """Builds whose builder died: retried once, failed the second time, or (if a cancel was
    asked) stopped. ``own``: also every build this builder had claimed (it just started, so
    none of them is running). Builds in ``active`` run here now and are never touched."""
    cutoff = utcnow() - dt.timedelta(seconds=lost_after)
    stale = or_(Build.heartbeat_at.is_(None), Build.heartbeat_at < cutoff)
    condition = or_(Build.claimed_by == builder, stale) if own else stale
    rows = db.execute(
        select(Build, Workload)
        .join(Workload, Workload.id == Build.workload_id)
        .where(Workload.state.in_([s.value for s in LIVE_STATES]), condition)
    ).all()
    lost: list[Lost] = []
    for build, workload in rows:
        if workload.id in active:
            continue
        state = dict(workload.runtime_state or {})
        who = f"its builder ({build.claimed_by or 'unknown'}) stopped mid-build"
        try:
            if workload.state == WorkloadState.STOPPING:
                transitions.move(
                    db, workload, Event.STOPPED, _what(build),
                    ended_at=utcnow(), runtime_state={},
                )  # fmt: skip
                outcome = "stopped"
            elif build.attempt < MAX_ATTEMPTS:
                transitions.move(
                    db, workload, Event.RETRY, _what(build),
                    reason=f"{who}; retrying (attempt {build.attempt + 1} of {MAX_ATTEMPTS})",
                    runtime_state={},
                )  # fmt: skip
                build.attempt += 1
                build.claimed_by, build.heartbeat_at = "", None
                outcome = "retried"
            else:
                transitions.move(
                    db, workload, Event.FAIL, _what(build),
                    reason=f"{who} on each of its {MAX_ATTEMPTS} attempts; not retried again",
                    ended_at=utcnow(), runtime_state={},
                )  # fmt: skip
                outcome = "failed"
        except (IllegalTransition, Conflict):
            db.rollback()
            continue
        db.commit()
        lost.append(Lost(workload.id, state, outcome))
    return lost


def cached_layer(db: Session, project_id: int, key: str) -> BuildCacheEntry | None:
    entry = db.get(BuildCacheEntry, (project_id, key))
    if entry is not None:
        entry.last_used_at = utcnow()
        db.commit()
    return entry


def store_layer(
    db: Session, project_id: int, key: str, layer: dict[str, Any], repository: str
) -> None:
    entry = db.get(BuildCacheEntry, (project_id, key))
    if entry is None:
        db.add(BuildCacheEntry(project_id=project_id, key=key, layer=layer, repository=repository))
    else:
        entry.layer, entry.repository, entry.last_used_at = layer, repository, utcnow()
    db.commit()
