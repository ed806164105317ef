"""What the reconciler does to job runs, one run at a time (all in the runner process).

A run is queued by the web tier (run now), by the scheduler (a cron slot) or by a parent's
success (dependency). ``start`` claims it when the job's concurrency and the user's quota
allow, records an attempt (a ``job_run`` workload) and asks the runtime to start
``<interpreter> <script> <arguments>`` in the project. ``observe`` looks at a live run and
records how its attempt ended: success starts the dependent jobs; a failure the retry policy
allows goes back to ``waiting`` with a ``not_before``; everything else is final. Each change is
a compare-and-set of the one state machine (``kiln.scheduling.states``), so a web request
cancelling the run at the same moment wins or loses cleanly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.db.models import Project, utcnow
from kiln.db.workload_models import (
    Job,
    JobDependency,
    JobRun,
    Runtime,
    Workload,
)
from kiln.domain import jobs as domain
from kiln.domain import session_editors
from kiln.domain.control import WorkloadControl
from kiln.domain.errors import InvalidInput, KilnError, NotFound
from kiln.domain.projects import list_env
from kiln.domain.resources import quota_wait_reason
from kiln.domain.sessions import add_event
from kiln.domain.transitions import finish, move
from kiln.rpc import runner_pb2 as pb
from kiln.scheduling.retry import JOB_MAXIMUM_MINUTES, RetryPolicy, limit_minutes
from kiln.scheduling.states import (
    LIVE_STATES,
    Event,
    IllegalTransition,
    Outcome,
    StopCause,
    WorkloadState,
    outcome,
)
from kiln.settings import Settings

log = logging.getLogger("kiln.runner.jobs")

KIND = "job_run"
ENDED = {pb.WORKLOAD_STATE_SUCCEEDED, pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_STOPPED}
LIVE = [s.value for s in LIVE_STATES]


def runner_id(workload_id: str) -> str:
    return f"job-{workload_id}"


@dataclass
class Notice:
    """A webhook to send once the change is committed."""

    url: str
    payload: dict[str, Any]


# ---- starting ------------------------------------------------------------------------------


def job_env(
    db: Session, project: Project, job: Job, workload: Workload, run: JobRun
) -> dict[str, str]:
    """image < project < job < CML's own variables (which describe this run and must be
    true)."""
    runtime = db.get(Runtime, job.runtime_id) if job.runtime_id is not None else None
    env = session_editors.image_env(runtime)
    env.update({v.name: v.value for v in list_env(db, project)})
    env.update(job.env)
    env.update(
        {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": str(project.id),
            "CDSW_ENGINE_ID": workload.id,
            "CDSW_JOB_ID": str(job.id),
            "JOB_ARGUMENTS": " ".join(job.arguments),
            "KILN_PROJECT": f"{project.owner_name}/{project.slug}",
            "KILN_JOB": job.name,
            "KILN_JOB_RUN_ID": str(run.id),
            "KILN_JOB_RUN_ATTEMPT": str(run.attempt),
        }
    )
    return env


def _timeout_seconds(job: Job, env: dict[str, str]) -> int:
    if job.timeout_minutes:
        return job.timeout_minutes * 60
    try:
        return limit_minutes(env, JOB_MAXIMUM_MINUTES) * 60
    except InvalidInput:  # a bad project-level value: the default still bounds the run
        return limit_minutes({}, JOB_MAXIMUM_MINUTES) * 60


def _block(db: Session, run: JobRun, reason: str) -> None:
    """Keep the run waiting with ``reason`` (written only when it changes: no churn)."""
    if run.state == WorkloadState.WAITING and run.reason == reason:
        return
    move(db, run, Event.BLOCK, f"run {run.id}", reason=reason[:2000])
    db.commit()


def _live_runs(db: Session, job: Job) -> int:
    return int(
        db.scalar(
            select(func.count())
            .select_from(JobRun)
            .where(JobRun.job_id == job.id, JobRun.state.in_(LIVE))
        )
        or 0
    )


def _claim(
    db: Session, settings: Settings, run: JobRun, job: Job, project: Project, now: dt.datetime
) -> tuple[Workload, pb.WorkloadSpec] | None:
    """Claim the run and record its attempt (committed), or record why it waits: None."""
    what = f"run {run.id}"
    db.execute(select(Job.id).where(Job.id == job.id).with_for_update())  # PostgreSQL only
    owner = domain.run_user(db, run, job)
    if owner is None:
        move(db, run, Event.FAIL, what, reason="no active user to run it as", ended_at=now)
        db.commit()
        return None
    live = _live_runs(db, job)
    if live >= job.max_concurrent_runs:
        _block(
            db,
            run,
            f"waiting: {live} run(s) of this job in progress "
            f"(max_concurrent_runs = {job.max_concurrent_runs})",
        )
        return None
    profile_id, request = domain.job_resources(db, job)
    reason = quota_wait_reason(db, settings, owner, request, project)
    if reason:
        _block(db, run, reason)
        return None
    try:
        move(db, run, Event.CLAIM, what, reason="", started_at=run.started_at or now)
    except IllegalTransition:
        db.rollback()  # cancelled meanwhile
        return None
    workload = Workload(
        id=secrets.token_hex(8),
        kind=KIND,
        project_id=project.id,
        user_id=owner.id,
        runtime_id=job.runtime_id,
        profile_id=profile_id,
        cpu_millis=request.cpu_millis,
        memory_bytes=request.memory_bytes,
        command=[*domain.interpreter(job.script), job.script, *job.arguments],
        state=WorkloadState.STARTING,
        created_at=now,
        started_at=now,
    )
    db.add(workload)
    db.flush()
    run.workload_id = workload.id
    add_event(db, workload, f"attempt {run.attempt} of run {run.id}: starting", at=now)
    env = job_env(db, project, job, workload, run)
    runtime = db.get(Runtime, job.runtime_id) if job.runtime_id is not None else None
    spec = pb.WorkloadSpec(
        workload_id=runner_id(workload.id),
        kind=pb.WORKLOAD_KIND_JOB_RUN,
        project_id=project.id,
        user_id=owner.id,
        runtime=session_editors.runtime_ref(runtime),
        command=workload.command,
        env=env,
        resources=pb.Resources(cpu=request.cpu_millis / 1000, memory_bytes=request.memory_bytes),
        timeout_seconds=_timeout_seconds(job, env),
        labels={"job": str(job.id), "run": str(run.id), "project": str(project.id)},
    )
    db.commit()  # the attempt is durable before the sandbox exists: a crash cannot lose it
    return workload, spec


# (db, project id) -> "" or a sentence saying the project is over its disk quota.
DiskNote = Callable[[Session, int], str]


def start(
    db: Session,
    runner: WorkloadControl,
    settings: Settings,
    run: JobRun,
    now: dt.datetime,
    claim_lock: AbstractContextManager[Any] | None = None,
    disk_note: DiskNote | None = None,
) -> list[Notice]:
    """Start ``run`` if it may start now; otherwise record why it waits. Commits.

    The check of the job's concurrency and the claim happen under ``claim_lock`` (the
    reconciler's per-job lock: starts run in parallel) and, on PostgreSQL, under a row lock
    on the job (several runners), so two starts never both take the last free slot."""
    job = db.get(Job, run.job_id)
    project = db.get(Project, job.project_id) if job else None
    if job is None or project is None:
        return []
    with claim_lock or contextlib.nullcontext():
        claimed = _claim(db, settings, run, job, project, now)
    if claimed is None:
        return _notices(db, job, project, run) if run.state == WorkloadState.FAILED else []
    workload, spec = claimed
    what = f"run {run.id}"
    try:
        status = runner.start(spec)
    except KilnError as exc:
        return _attempt_ended(db, run, workload, outcome(1), f"could not start: {exc.detail}", now)
    if status.state in ENDED:  # over before the start answered: the same end as observe()'s
        return record_end(db, run, workload, status, disk_note)
    try:
        move(db, run, Event.READY, what)
        move(db, workload, Event.READY, f"workload {workload.id}")
    except IllegalTransition:
        db.rollback()  # cancelled while starting: observe() finishes the stop
        return []
    add_event(db, workload, "running")
    db.commit()
    return []


# ---- watching ------------------------------------------------------------------------------


def observe(
    db: Session,
    runner: WorkloadControl,
    run: JobRun,
    now: dt.datetime,
    disk_note: DiskNote | None = None,
) -> tuple[list[Notice], bool]:
    """Bring a live run up to date with its attempt. Returns (webhooks to send, whether a
    stop must be sent to the runtime: the run is ``stopping`` and its workload still runs)."""
    workload = db.get(Workload, run.workload_id) if run.workload_id else None
    if workload is None:
        move(
            db, run, Event.FAIL, f"run {run.id}", reason="its workload record is gone", ended_at=now
        )
        db.commit()
        return [], False
    try:
        status = runner.status(runner_id(workload.id))
    except NotFound:
        # Claimed, but the runtime never got it: the runner stopped between the two.
        lost = outcome(None)
        reason = "lost: the runner stopped before the workload started"
        return _attempt_ended(db, run, workload, lost, reason, now), False
    except KilnError as exc:
        log.warning("no status for run %d: %s", run.id, exc.detail)
        return [], False
    if status.state in ENDED:
        return record_end(db, run, workload, status, disk_note), False
    if run.state == WorkloadState.STARTING and status.state == pb.WORKLOAD_STATE_RUNNING:
        try:
            move(db, run, Event.READY, f"run {run.id}")
            move(db, workload, Event.READY, f"workload {workload.id}")
            db.commit()
        except IllegalTransition:
            db.rollback()
    return [], run.state == WorkloadState.STOPPING


def record_end(
    db: Session,
    run: JobRun,
    workload: Workload,
    status: pb.WorkloadStatus,
    disk_note: DiskNote | None = None,
) -> list[Notice]:
    """How the attempt ended, from the runtime's final status (and, with ``disk_note``, a
    word on the project's disk when it is over its quota: why writes failed). Commits."""
    cause = StopCause(run.stop_cause) if run.stop_cause else None
    if cause is None and status.reason == "timeout":
        cause = StopCause.TIMEOUT
    elif cause is None and status.state == pb.WORKLOAD_STATE_STOPPED:
        cause = StopCause.REQUESTED  # stopped on the runner's side (an operator)
    exit_code = status.exit_code if status.HasField("exit_code") else None
    lost = status.reason == "lost"
    result = outcome(
        None if lost else exit_code, oom_killed=status.reason == "oom", stop_cause=cause
    )
    reason = f"lost: {status.message}" if lost and cause is None else result.reason
    note = disk_note(db, workload.project_id) if disk_note is not None else ""
    if note:
        reason = f"{reason}; {note}"
    ended = (
        status.finished_at.ToDatetime(tzinfo=dt.UTC) if status.HasField("finished_at") else utcnow()
    )
    return _attempt_ended(db, run, workload, result, reason, ended, exit_code)


def _attempt_ended(
    db: Session,
    run: JobRun,
    workload: Workload,
    result: Outcome,
    reason: str,
    ended: dt.datetime,
    exit_code: int | None = None,
) -> list[Notice]:
    job = db.get(Job, run.job_id)
    assert job is not None  # the run's row exists, so its job does (ON DELETE CASCADE)
    what = f"run {run.id}"
    values = {"reason": reason[:2000], "exit_code": exit_code, "ended_at": ended}
    try:
        finish(db, workload, result.event, f"workload {workload.id}", **values)
        add_event(db, workload, reason, at=ended)
        policy = RetryPolicy(
            retries=job.max_retries,
            initial_delay=dt.timedelta(seconds=job.retry_backoff_seconds),
            max_delay=max(dt.timedelta(hours=1), dt.timedelta(seconds=job.retry_backoff_seconds)),
        )
        retry_at = policy.next_attempt_at(run.attempt, result, ended, seed=run.id)
        if retry_at is not None and run.state in (WorkloadState.STARTING, WorkloadState.RUNNING):
            move(
                db,
                run,
                Event.RETRY,
                what,
                reason=f"attempt {run.attempt} {reason}; attempt {run.attempt + 1} "
                f"at {retry_at.strftime('%H:%M:%S')} UTC",
                attempt=run.attempt + 1,
                not_before=retry_at,
                exit_code=exit_code,
            )
            db.commit()
            return []
        finish(db, run, result.event, what, **values)
    except IllegalTransition:
        db.rollback()  # another actor recorded it first
        return []
    project = db.get(Project, job.project_id)
    assert project is not None
    if run.state == WorkloadState.SUCCEEDED:
        for child in _dependents(db, job):
            domain.queue_run(
                db, child, "dependency", user=domain.run_user(db, run, job), parent_run=run
            )
    db.commit()
    return _notices(db, job, project, run)


def _dependents(db: Session, job: Job) -> list[Job]:
    query = (
        select(Job)
        .join(JobDependency, JobDependency.child_id == Job.id)
        .where(JobDependency.parent_id == job.id, Job.enabled.is_(True))
        .order_by(Job.id)
    )
    return list(db.scalars(query))


_NOTIFY_FOR = {
    WorkloadState.SUCCEEDED: "success",
    WorkloadState.FAILED: "failure",
    WorkloadState.TIMED_OUT: "timeout",
}


def _notices(db: Session, job: Job, project: Project, run: JobRun) -> list[Notice]:
    kind = _NOTIFY_FOR.get(WorkloadState(run.state))
    if not job.webhook_url or kind is None or kind not in job.notify_on:
        return []
    duration = (
        (run.ended_at - run.started_at).total_seconds() if run.ended_at and run.started_at else None
    )
    payload = {
        "event": kind,
        "project": f"{project.owner_name}/{project.slug}",
        "job": {"id": job.id, "name": job.name},
        "run": {
            "id": run.id,
            "number": run.number,
            "state": run.state,
            "reason": run.reason,
            "exit_code": run.exit_code,
            "trigger": run.trigger,
            "attempt": run.attempt,
            "scheduled_for": run.scheduled_for.isoformat() if run.scheduled_for else None,
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "ended_at": run.ended_at.isoformat() if run.ended_at else None,
            "duration_seconds": duration,
        },
    }
    return [Notice(job.webhook_url, payload)]
