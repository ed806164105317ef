"""What holds the quota a waiting job run waits for: the live sessions, runs and workers
counting against it, as the person looking at the run may see them.

A run over the quota waits ("uses 2 of 2 vCPU") until room frees up; on its own that is a
dead end for someone who does not know which sessions to stop. This names them, each with
what it holds and whether the viewer may stop it. Workloads in projects the viewer cannot see
are only counted (never named): a run's page must not reveal another project's sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.app_models import Application
from kiln.db.build_models import Build
from kiln.db.models import Project, User
from kiln.db.workload_models import Job, JobRun, Workload
from kiln.domain import jobs
from kiln.domain.authz import ACTION_ROLES, USE_SESSION, Action, effective_roles
from kiln.domain.resources import QUOTA_WAIT_PREFIX, QuotaWait, quota_holders, quota_wait
from kiln.scheduling.states import PENDING_STATES, WorkloadState
from kiln.settings import Settings


@dataclass(frozen=True)
class Holder:
    """One live workload under the quota, in a project the viewer can see."""

    workload: Workload
    project: Project
    run: JobRun | None  # for a job run's attempt
    job: Job | None
    can_stop: bool
    application: Application | None = None  # for an application's instance
    build: Build | None = None  # for a build's install


@dataclass(frozen=True)
class HeldQuota:
    wait: QuotaWait
    holders: list[Holder]
    unseen: int  # live workloads under the quota in projects the viewer cannot see


def _stop_action(workload: Workload) -> Action:
    """Stopping a session (or its workers) takes what using one takes; cancelling a run or
    stopping an application, what operating the job or the application takes; cancelling a
    build, what starting one takes."""
    if workload.kind == "build":
        return Action.write
    return Action.operate if workload.kind in ("job_run", "application") else USE_SESSION


def held_quota(
    db: Session, settings: Settings, run: JobRun, job: Job, viewer: User
) -> HeldQuota | None:
    """For a run waiting for quota: what holds that quota now. None for any other run, and
    when room has freed up meanwhile (the runner starts it at its next look)."""
    pending = WorkloadState(run.state) in PENDING_STATES
    if not pending or not run.reason.startswith(QUOTA_WAIT_PREFIX):
        return None
    owner = jobs.run_user(db, run, job)
    project = db.get(Project, job.project_id)
    if owner is None or project is None:
        return None
    wait = quota_wait(db, settings, owner, jobs.job_resources(db, job)[1], project)
    if wait is None:
        return None
    workloads = quota_holders(db, wait)
    project_ids = {w.project_id for w in workloads}
    projects = {p.id: p for p in db.scalars(select(Project).where(Project.id.in_(project_ids)))}
    roles = effective_roles(db, viewer, list(projects.values()))
    ids = [w.id for w in workloads]
    attempts = {
        r.workload_id: r for r in db.scalars(select(JobRun).where(JobRun.workload_id.in_(ids)))
    }
    job_ids = {r.job_id for r in attempts.values()}
    run_jobs = {j.id: j for j in db.scalars(select(Job).where(Job.id.in_(job_ids)))}
    serving = select(Application).where(
        Application.workload_id.in_(ids) | Application.next_workload_id.in_(ids)
    )
    applications: dict[str, Application] = {}
    for app in db.scalars(serving):
        for instance in (app.workload_id, app.next_workload_id):
            if instance is not None:
                applications[instance] = app
    builds = {b.workload_id: b for b in db.scalars(select(Build).where(Build.workload_id.in_(ids)))}
    holders, unseen = [], 0
    for workload in workloads:
        role = roles.get(workload.project_id)
        if role is None:
            unseen += 1
            continue
        attempt = attempts.get(workload.id)
        holders.append(
            Holder(
                workload=workload,
                project=projects[workload.project_id],
                run=attempt,
                job=run_jobs.get(attempt.job_id) if attempt else None,
                can_stop=role >= ACTION_ROLES[_stop_action(workload)],
                application=applications.get(workload.id),
                build=builds.get(workload.id),
            )
        )
    return HeldQuota(wait, holders, unseen)
