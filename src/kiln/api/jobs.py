"""Jobs and job runs: create/edit/delete (contributors and up), run now and cancel
(operators and up), read runs and logs (viewers and up), and the project's pipeline graph.

A job is referenced by id or by name (``.../jobs/nightly``). Running answers **201 with the
queued run** as soon as it is durable; the runner's reconciler starts it (the web tier wakes
it, and it also looks every second). Logs are the console output of the run's latest
attempt, streamed from the runner: ``?follow=true`` keeps the response open until the run
ends, ``?offset=N`` resumes after the first N bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StrictBool
from sqlalchemy.orm import Session

from kiln.api.deps import Ctx, Db, OperateProject, ViewProject, WriteProject
from kiln.api.logs import empty_log, stream_log
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.db.models import Project, utcnow
from kiln.db.workload_models import Job, JobRun
from kiln.domain import jobs as domain
from kiln.domain.errors import KilnError, NotFound
from kiln.domain.held_quota import HeldQuota, Holder, held_quota
from kiln.domain.pagination import decode_cursor, encode_cursor
from kiln.domain.sessions import usernames
from kiln.runner.client import runner_client
from kiln.runner.jobruns import runner_id
from kiln.scheduling import jobgraph
from kiln.scheduling.cron import parse_schedule
from kiln.settings import Settings

router = APIRouter(prefix="/projects", tags=["jobs"])

JOBS = "/{owner}/{project}/jobs"
JOB = JOBS + "/{job}"
RUNS = JOB + "/runs"
RUN = RUNS + "/{run_id}"
JobRef = Annotated[str, Field(max_length=100)]


class JobFields(InputModel):
    """Fields shared by create and update (on update every field is optional)."""

    arguments: list[Annotated[str, Field(max_length=domain.MAX_ARGUMENT_LENGTH)]] | None = Field(
        None, max_length=domain.MAX_ARGUMENTS, description="Passed to the script, in order."
    )
    runtime: str | None = Field(None, max_length=100, description="A runtime's name.")
    profile: str | None = Field(None, max_length=64, description="A resource profile's name.")
    env: dict[str, Annotated[str, Field(max_length=domain.MAX_ENV_VALUE)]] | None = Field(
        None, description="Job environment; overrides the project's (site < project < job)."
    )
    schedule: str | None = Field(
        None,
        max_length=200,
        description="5-field cron expression (or @hourly, @daily, ...); null: no schedule.",
    )
    timezone: str | None = Field(None, max_length=64, description="IANA zone of the schedule.")
    catch_up: str | None = Field(
        None, max_length=8, description="After downtime: once (default), all, or skip."
    )
    timeout_minutes: int | None = Field(None, description="Default: JOB_MAXIMUM_MINUTES.")
    max_retries: int | None = Field(None, description="Extra attempts after a failure (0-10).")
    retry_backoff_seconds: int | None = Field(None, description="First retry delay; doubles.")
    max_concurrent_runs: int | None = Field(None, description="Runs of this job at once.")
    webhook_url: str | None = Field(None, max_length=2000, description="POSTed a JSON body.")
    notify_on: list[str] | None = Field(
        None, max_length=3, description="Subset of success, failure, timeout."
    )
    parents: list[Annotated[str, Field(max_length=100)]] | None = Field(
        None,
        max_length=domain.MAX_PARENTS,
        description="Names of jobs this one runs after (when one of them succeeds).",
    )
    enabled: StrictBool | None = None


class JobCreate(JobFields):
    name: str = Field(max_length=100)
    script: str = Field(max_length=1024, description="Project-relative .py or .sh file.")


class JobUpdate(JobFields):
    name: str | None = Field(None, max_length=100)
    script: str | None = Field(None, max_length=1024)


class QuotaHolderPublic(BaseModel):
    kind: str = Field(description="session, job_run, worker, application or build")
    id: str = Field(
        description="The session's id; for a job run, the run's id; for an application, its "
        "name; for a build, its number"
    )
    project: str
    name: str = Field(description="What it is: 'JupyterLab session 3f2a…', 'run 12 of nightly'")
    cpu: float = Field(description="vCPU it holds")
    memory_bytes: int
    started_by: str | None
    url: str = Field(description="Its page (a worker's: its session's)")
    stop: str | None = Field(
        description="When you may stop it: the API path that does (DELETE a session, POST a "
        "run's cancel or an application's stop)"
    )


class QuotaWaitPublic(BaseModel):
    """What holds the quota a waiting run needs (see kiln.domain.held_quota)."""

    whose: str = Field(description="The quota: a user's name, or 'team NAME'")
    holders: list[QuotaHolderPublic]
    elsewhere: int = Field(
        description="Live workloads under the same quota in projects you cannot see"
    )


class ParentRun(BaseModel):
    """The run whose success started a dependent run."""

    id: int
    number: int
    job: str
    job_id: int
    trigger: str = Field(description="How the parent run itself was started.")


class RunPublic(BaseModel):
    id: int = Field(description="Site-wide id: names the run in URLs and API paths.")
    number: int = Field(description="The run's number within its job: #1, #2, ...")
    job: str
    state: str
    reason: str
    quota: QuotaWaitPublic | None = Field(
        None, description="While the run waits for quota: what holds it, with ways to stop it"
    )
    exit_code: int | None
    trigger: str
    triggered_by: str | None
    scheduled_for: dt.datetime | None
    attempt: int
    parent_run_id: int | None
    parent_run: ParentRun | None = Field(
        None, description="For runs started by a dependency: the parent job's run."
    )
    workload_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    duration_seconds: float | None


class JobPublic(BaseModel):
    id: int
    project: str
    name: str
    script: str
    arguments: list[str]
    runtime: str | None
    profile: str | None
    env: dict[str, str]
    schedule: str | None
    timezone: str
    catch_up: str
    next_run_at: dt.datetime | None
    timeout_minutes: int | None
    max_retries: int
    retry_backoff_seconds: int
    max_concurrent_runs: int
    webhook_url: str | None
    notify_on: list[str]
    parents: list[str]
    enabled: bool
    created_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    last_run: RunPublic | None


class GraphNode(BaseModel):
    id: int
    name: str
    layer: int
    row: int
    last_state: str | None


class GraphEdge(BaseModel):
    parent: int
    child: int


class PipelinePublic(BaseModel):
    nodes: list[GraphNode]
    edges: list[GraphEdge]


EDITOR_NAMES = {"terminal": "Terminal", "jupyterlab": "JupyterLab"}


def _holder_public(holder: Holder, users: dict[int, str]) -> QuotaHolderPublic:
    w, project = holder.workload, holder.project
    ui = f"/p/{project.owner_name}/{project.slug}"
    api = f"/api/v1/projects/{project.owner_name}/{project.slug}"
    stop: str | None = None
    if holder.run is not None and holder.job is not None:
        kind, ident = "job_run", str(holder.run.id)
        name = f"run {holder.run.id} of {holder.job.name}"
        url = f"{ui}/jobs/{holder.job.id}/runs/{holder.run.id}"
        stop = f"{api}/jobs/{holder.job.id}/runs/{holder.run.id}/cancel"
    elif holder.application is not None:
        kind, ident = "application", holder.application.name
        name = f"application {holder.application.name}"
        url = f"{ui}/applications/{holder.application.name}"
        stop = f"{api}/applications/{holder.application.name}/stop"
    elif holder.build is not None:
        kind, ident = "build", str(holder.build.number)
        name = f"build #{holder.build.number}"
        url = f"{ui}/builds/{holder.build.number}"
        stop = f"{api}/builds/{holder.build.number}/cancel"
    elif w.kind == "application":  # its application was deleted: the runner is stopping it
        kind, ident = "application", w.id
        name = f"instance {w.id[:8]} of a deleted application, stopping"
        url = f"{ui}/applications"
    elif w.kind == "worker":
        kind, ident = "worker", w.id
        name = f"worker {w.id[:8]} of session {(w.parent_id or '')[:8]}"
        url = f"{ui}/sessions/{w.parent_id}"  # stopped with its session
    else:
        kind, ident = "session", w.id
        name = f"{EDITOR_NAMES.get(w.editor, w.editor)} session {w.id[:8]}"
        url = f"{ui}/sessions/{w.id}"
        stop = f"{api}/sessions/{w.id}"
    return QuotaHolderPublic(
        kind=kind,
        id=ident,
        project=f"{project.owner_name}/{project.slug}",
        name=name,
        cpu=w.cpu_millis / 1000,
        memory_bytes=w.memory_bytes,
        started_by=users.get(w.user_id) if w.user_id else None,
        url=url,
        stop=stop if holder.can_stop else None,
    )


def quota_public(db: Session, held: HeldQuota | None) -> QuotaWaitPublic | None:
    if held is None:
        return None
    users = usernames(db, {h.workload.user_id for h in held.holders})
    return QuotaWaitPublic(
        whose=held.wait.who,
        holders=[_holder_public(h, users) for h in held.holders],
        elsewhere=held.unseen,
    )


def publish_runs(
    db: Session,
    runs: Sequence[JobRun],
    jobs: dict[int, Job],
    quota: Callable[[JobRun], QuotaWaitPublic | None] | None = None,
) -> list[RunPublic]:
    """The runs as the API shows them (``jobs``: at least the runs' own jobs, by id), with
    their users and parent runs looked up in one query each; ``quota`` says what holds the
    quota a waiting run needs."""
    users = usernames(db, {r.triggered_by_id for r in runs})
    parents = domain.parent_runs(db, {r.parent_run_id for r in runs if r.parent_run_id})
    return [
        _run_public(
            r,
            jobs[r.job_id],
            users,
            parents.get(r.parent_run_id or 0),
            quota(r) if quota is not None else None,
        )
        for r in runs
    ]


def _run_public(
    run: JobRun,
    job: Job,
    users: dict[int, str],
    parent: tuple[JobRun, Job] | None,
    quota: QuotaWaitPublic | None = None,
) -> RunPublic:
    duration = None
    if run.started_at and run.ended_at:
        duration = (run.ended_at - run.started_at).total_seconds()
    parent_run = None
    if parent is not None:
        prun, pjob = parent
        parent_run = ParentRun(
            id=prun.id, number=prun.number, job=pjob.name, job_id=pjob.id, trigger=prun.trigger
        )
    return RunPublic(
        id=run.id,
        number=run.number,
        job=job.name,
        state=run.state,
        reason=run.reason,
        quota=quota,
        exit_code=run.exit_code,
        trigger=run.trigger,
        triggered_by=users.get(run.triggered_by_id) if run.triggered_by_id else None,
        scheduled_for=run.scheduled_for,
        attempt=run.attempt,
        parent_run_id=run.parent_run_id,
        parent_run=parent_run,
        workload_id=run.workload_id,
        created_at=run.created_at,
        started_at=run.started_at,
        ended_at=run.ended_at,
        duration_seconds=duration,
    )


def _next_run(job: Job) -> dt.datetime | None:
    if not job.schedule or not job.enabled:
        return None
    try:
        return parse_schedule(job.schedule, job.timezone).next_after(utcnow())
    except (KilnError, ValueError):
        return None


def publish_jobs(db: Session, project: Project, jobs: list[Job]) -> list[JobPublic]:
    last = domain.last_runs(db, [j.id for j in jobs])
    users = usernames(db, {j.created_by_id for j in jobs})
    by_job = {j.id: j for j in jobs}
    last_public = {p.id: p for p in publish_runs(db, list(last.values()), by_job)}
    result = []
    for job in jobs:
        spec = domain.spec_of(db, job)
        result.append(
            JobPublic(
                id=job.id,
                project=f"{project.owner_name}/{project.slug}",
                name=job.name,
                script=job.script,
                arguments=spec.arguments,
                runtime=spec.runtime,
                profile=spec.profile,
                env=spec.env,
                schedule=job.schedule,
                timezone=job.timezone,
                catch_up=job.catch_up,
                next_run_at=_next_run(job),
                timeout_minutes=job.timeout_minutes,
                max_retries=job.max_retries,
                retry_backoff_seconds=job.retry_backoff_seconds,
                max_concurrent_runs=job.max_concurrent_runs,
                webhook_url=job.webhook_url,
                notify_on=spec.notify_on,
                parents=spec.parents,
                enabled=job.enabled,
                created_by=users.get(job.created_by_id) if job.created_by_id else None,
                created_at=job.created_at,
                updated_at=job.updated_at,
                last_run=last_public[last[job.id].id] if job.id in last else None,
            )
        )
    return result


def _wake(request: Request, settings: Settings) -> None:
    runner_client(request.app.state, settings).wake()


def _project_dir(ctx: Ctx, project: Project) -> Path:
    return ctx.store.project_dir(project.id)


def _changes(body: JobFields) -> dict[str, Any]:
    """The fields the caller sent. ``null`` clears schedule/timeout/webhook/runtime/profile;
    for the others it means "leave as is"."""
    clearable = {"schedule", "timeout_minutes", "webhook_url", "runtime", "profile"}
    return {
        k: v
        for k, v in body.model_dump(exclude_unset=True).items()
        if v is not None or k in clearable
    }


# ---- jobs ----------------------------------------------------------------------------------


@router.get(JOBS, response_model=list[JobPublic])
def list_jobs(access: ViewProject, db: Db) -> list[JobPublic]:
    """The project's jobs by name, each with its latest run and next scheduled time."""
    return publish_jobs(db, access.project, domain.list_jobs(db, access.project))


@router.post(JOBS, status_code=201, response_model=JobPublic)
def create_job(
    body: JobCreate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> JobPublic:
    """Create a job (contributors and up). Nothing runs until it is run, scheduled, or a
    parent succeeds."""
    changes = _changes(body)
    spec = domain.JobSpec(name=body.name, script=body.script).updated(
        {k: v for k, v in changes.items() if k not in ("name", "script")}
    )
    job = domain.create_job(
        db, access.project, _project_dir(ctx, access.project), access.user, spec
    )
    commit_audited(db, access, request, "job.create", changes_project=True, job=job.name)
    return publish_jobs(db, access.project, [job])[0]


@router.get(JOB, response_model=JobPublic)
def get_job(job: JobRef, access: ViewProject, db: Db) -> JobPublic:
    return publish_jobs(db, access.project, [domain.get_job(db, access.project, job)])[0]


@router.patch(JOB, response_model=JobPublic)
def update_job(
    job: JobRef, body: JobUpdate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> JobPublic:
    """Change some of a job's fields (contributors and up); all are checked together."""
    row = domain.get_job(db, access.project, job)
    changes = _changes(body)
    domain.update_job(db, access.project, _project_dir(ctx, access.project), row, changes)
    fields = sorted(changes)
    commit_audited(
        db, access, request, "job.update", changes_project=True, job=row.name, fields=fields
    )
    return publish_jobs(db, access.project, [row])[0]


@router.delete(JOB, status_code=204)
def delete_job(job: JobRef, access: WriteProject, request: Request, db: Db) -> Response:
    """Delete a job and its run history (refused while a run is in progress)."""
    row = domain.get_job(db, access.project, job)
    name = row.name
    domain.delete_job(db, row)
    commit_audited(db, access, request, "job.delete", changes_project=True, job=name)
    return Response(status_code=204)


@router.get("/{owner}/{project}/pipeline", response_model=PipelinePublic)
def pipeline(access: ViewProject, db: Db) -> PipelinePublic:
    """The project's jobs as a dependency graph: columns by depth, for drawing."""
    jobs = domain.list_jobs(db, access.project)
    names = {j.id: j.name for j in jobs}
    edges = domain.project_edges(db, access.project)
    layout = jobgraph.layout(list(names), edges, names)
    last = domain.last_runs(db, list(names))
    return PipelinePublic(
        nodes=[
            GraphNode(
                id=n.job,
                name=names[n.job],
                layer=n.layer,
                row=n.row,
                last_state=last[n.job].state if n.job in last else None,
            )
            for n in layout.nodes
        ],
        edges=[GraphEdge(parent=e.parent, child=e.child) for e in layout.edges],
    )


# ---- runs ----------------------------------------------------------------------------------


@router.post(RUNS, status_code=201, response_model=RunPublic)
def run_job(job: JobRef, access: OperateProject, request: Request, ctx: Ctx, db: Db) -> RunPublic:
    """Run a job now (operators and up): answers with the queued run."""
    row = domain.get_job(db, access.project, job)
    run = domain.queue_run(db, row, "manual", user=access.user)
    commit_audited(db, access, request, "job.run", job=row.name, run=run.number, run_id=run.id)
    _wake(request, ctx.settings)
    return publish_runs(db, [run], {row.id: row})[0]


@router.get(RUNS, response_model=PageOut[RunPublic])
def list_runs(
    job: JobRef,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    number: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Only the run with this number.")
    ] = None,
) -> PageOut[RunPublic]:
    """The job's runs, newest first (``?number=N``: just its run #N, or no item)."""
    row = domain.get_job(db, access.project, job)
    before = decode_cursor(cursor) if cursor else None
    runs = domain.list_runs(db, row, limit + 1, before, number)
    more = len(runs) > limit
    runs = runs[:limit]

    def quota(run: JobRun) -> QuotaWaitPublic | None:
        return quota_public(db, held_quota(db, ctx.settings, run, row, access.user))

    return PageOut(
        items=publish_runs(db, runs, {row.id: row}, quota),
        next_cursor=encode_cursor(runs[-1].id) if more and runs else None,
    )


def _run(db: Db, project: Project, job: str, run_id: int) -> tuple[Job, JobRun]:
    row = domain.get_job(db, project, job)
    return row, domain.get_run(db, row, run_id)


@router.get(RUN, response_model=RunPublic)
def get_run(job: JobRef, run_id: int, access: ViewProject, ctx: Ctx, db: Db) -> RunPublic:
    """One run; while it waits for quota, ``quota`` says what holds it."""
    row, run = _run(db, access.project, job, run_id)
    held = held_quota(db, ctx.settings, run, row, access.user)
    return publish_runs(db, [run], {row.id: row}, lambda _: quota_public(db, held))[0]


@router.post(RUN + "/cancel", response_model=RunPublic)
def cancel_run(
    job: JobRef, run_id: int, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> RunPublic:
    """Cancel a run (operators and up). A queued run ends at once; a live one is
    ``stopping`` until the runner has ended it. 409 when it already ended."""
    row, run = _run(db, access.project, job, run_id)
    domain.cancel_run(db, run, access.user)
    commit_audited(db, access, request, "job.cancel", job=row.name, run=run.number, run_id=run.id)
    _wake(request, ctx.settings)
    return publish_runs(db, [run], {row.id: row})[0]


@router.get(RUN + "/logs", response_class=StreamingResponse)
def run_logs(
    job: JobRef,
    run_id: int,
    access: ViewProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    follow: bool = False,
) -> StreamingResponse:
    """The run's console output (its latest attempt) as text; ``follow`` streams it live."""
    _, run = _run(db, access.project, job, run_id)
    if run.workload_id is None:
        if not follow:
            return empty_log()
        raise NotFound("the run has not started yet: no log to follow")
    client = runner_client(request.app.state, ctx.settings)
    return stream_log(client, runner_id(run.workload_id), offset, follow)
