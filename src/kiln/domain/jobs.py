"""Jobs and their runs, as the web tier writes them.

A job is a script in the project + arguments + runtime + resource profile + environment
(site < project < job), run by hand, on a cron schedule in a time zone, or after a parent job
succeeds. The web tier validates and stores jobs and *queued* runs; the runner's reconciler
(``kiln.runner.reconciler``) creates the scheduled runs, starts queued runs when the job's
concurrency and the user's quota allow, watches them, retries, starts dependent jobs and sends
webhooks. Each run's attempts are workloads of kind ``job_run``.

Every check here runs before anything is written, so a refused request writes nothing.
"""

from __future__ import annotations

import posixpath
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Job, JobDependency, JobRun, ResourceProfile, Runtime, Workload
from kiln.domain import transitions
from kiln.domain.errors import BadPath, Conflict, InvalidInput, NotFound, about_field
from kiln.domain.names import check_display_name
from kiln.domain.pagination import MAX_ROW_ID
from kiln.domain.resources import Resources
from kiln.domain.sessions import DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES
from kiln.scheduling import jobgraph
from kiln.scheduling.cron import CATCH_UP_POLICIES, parse_schedule
from kiln.scheduling.retry import (
    LIMIT_DEFAULTS,
    LIMIT_MAXIMUM_MINUTES,
    MAX_RETRIES,
    parse_limit_minutes,
)
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    Event,
    StopCause,
    WorkloadState,
    stop_event,
)
from kiln.storage.safepath import parse_path

# What runs a script, by its extension (CML runs .py, .R and .scala; Kiln's runtimes have a
# Python and a shell).
INTERPRETERS = {".py": ("python3",), ".sh": ("bash",)}
NOTIFY_EVENTS = ("success", "failure", "timeout")
MAX_ARGUMENTS = 100
MAX_ARGUMENT_LENGTH = 4096
MAX_ENV_VARS = 200
MAX_ENV_VALUE = 32 * 1024
MAX_CONCURRENT_RUNS = 100
MAX_BACKOFF_SECONDS = 24 * 3600
MAX_PARENTS = 50
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def interpreter(script: str) -> tuple[str, ...]:
    return INTERPRETERS[posixpath.splitext(script)[1].lower()]


def job_resources(db: Session, job: Job) -> tuple[int | None, Resources]:
    """(profile id, size) a run of ``job`` asks for: its profile, else the site's default
    profile, else the default size."""
    row = db.get(ResourceProfile, job.profile_id) if job.profile_id else None
    if row is None:
        row = db.scalar(
            select(ResourceProfile)
            .where(ResourceProfile.is_default.is_(True))
            .order_by(ResourceProfile.id)
        )
    if row is None:
        return None, Resources(DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES)
    return row.id, Resources(row.cpu_millis, row.memory_bytes, row.gpu)


def run_user(db: Session, run: JobRun, job: Job) -> User | None:
    """Who a run runs as (whose quota it uses): who triggered it, else the job's creator;
    None when that account is gone or disabled."""
    user_id = run.triggered_by_id or job.created_by_id
    user = db.get(User, user_id) if user_id else None
    return user if user is not None and user.is_active else None


@dataclass
class JobSpec:
    """Everything a user sets on a job; ``check`` validates it as a whole."""

    name: str
    script: str
    arguments: list[str] = field(default_factory=list)
    runtime: str | None = None
    profile: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    schedule: str | None = None
    timezone: str = "UTC"
    catch_up: str = "once"
    timeout_minutes: int | None = None
    max_retries: int = 0
    retry_backoff_seconds: int = 30
    max_concurrent_runs: int = 1
    webhook_url: str | None = None
    notify_on: list[str] = field(default_factory=lambda: list(NOTIFY_EVENTS))
    parents: list[str] = field(default_factory=list)
    enabled: bool = True

    def updated(self, changes: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidInput(f"unknown job field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


def spec_of(db: Session, job: Job) -> JobSpec:
    """The spec a stored job was made from (for an update: change some fields, check all)."""
    runtime = db.get(Runtime, job.runtime_id) if job.runtime_id else None
    profile = db.get(ResourceProfile, job.profile_id) if job.profile_id else None
    return JobSpec(
        name=job.name,
        script=job.script,
        arguments=list(job.arguments),
        runtime=runtime.name if runtime else None,
        profile=profile.name if profile else None,
        env=dict(job.env),
        schedule=job.schedule,
        timezone=job.timezone,
        catch_up=job.catch_up,
        timeout_minutes=job.timeout_minutes,
        max_retries=job.max_retries,
        retry_backoff_seconds=job.retry_backoff_seconds,
        max_concurrent_runs=job.max_concurrent_runs,
        webhook_url=job.webhook_url,
        notify_on=list(job.notify_on),
        parents=sorted(parent_names(db, job)),
        enabled=job.enabled,
    )


# ---- validation ----------------------------------------------------------------------------


def check_script(project_dir: Path, script: str) -> str:
    """A project-relative script that exists as a regular file and that Kiln knows how to run.

    The path is checked like any file-API path (no ``..``, no absolute path, not in ``.git``),
    then looked up without following symlinks: the runner runs it inside the sandbox, where
    the project is the only thing mounted, but a clear 422 now beats a failed run later."""
    try:
        path = parse_path(script)
    except BadPath as exc:  # a field of a JSON body: 422 like every other bad field
        raise InvalidInput(f"script: {exc.detail}") from None
    if posixpath.splitext(path.name)[1].lower() not in INTERPRETERS:
        raise InvalidInput(
            f"script {script[:200]!r}: Kiln runs {', '.join(sorted(INTERPRETERS))} files"
        )
    here = project_dir
    for part in path.parts:
        here = here / part
        try:
            mode = here.lstat().st_mode
        except OSError:
            raise InvalidInput(f"script {str(path)!r} does not exist in the project") from None
        if stat.S_ISLNK(mode):
            raise InvalidInput(f"script {str(path)!r} goes through a symbolic link")
    if not stat.S_ISREG(mode):
        raise InvalidInput(f"script {str(path)!r} is not a regular file")
    return str(path)


def check_env(env: dict[str, str]) -> dict[str, str]:
    if len(env) > MAX_ENV_VARS:
        raise InvalidInput(f"at most {MAX_ENV_VARS} environment variables per job")
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise InvalidInput(
                f"environment variable {name[:60]!r}: use letters, digits and '_', "
                "not starting with a digit"
            )
        if len(value) > MAX_ENV_VALUE or "\0" in value:
            raise InvalidInput(f"environment variable {name}: value too long or has a NUL")
        if name in LIMIT_DEFAULTS:
            parse_limit_minutes(name, value)
    return env


def check_webhook_url(url: str) -> str:
    """An http(s) URL with a host. Where it may point is checked at each delivery, when the
    name is resolved (``kiln.runner.webhooks``: never Kiln itself, private networks only when
    the admin allows them), since a name's addresses can change after it is saved."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing it is the check: "host:99999" raises)
    except ValueError as exc:  # "http://[::1", "http://host:99999"
        raise InvalidInput(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook_url must be an http:// or https:// URL with a host name")
    if len(url) > 2000 or parts.username or parts.password:
        raise InvalidInput("webhook_url must be at most 2000 characters, without credentials")
    return url


def _check_spec(spec: JobSpec) -> None:
    """Every field of ``spec``; an error names the field it is about (``about_field``)."""
    with about_field("name"):
        check_display_name(spec.name, "job name")
    with about_field("arguments"):
        if len(spec.arguments) > MAX_ARGUMENTS:
            raise InvalidInput(f"at most {MAX_ARGUMENTS} arguments")
        for arg in spec.arguments:
            if len(arg) > MAX_ARGUMENT_LENGTH or "\0" in arg:
                raise InvalidInput(f"arguments must be at most {MAX_ARGUMENT_LENGTH} characters")
    with about_field("env"):
        check_env(spec.env)
    with about_field("schedule"):
        if spec.schedule is not None:
            parse_schedule(spec.schedule, "UTC")
    with about_field("timezone"):
        parse_schedule(spec.schedule or "@daily", spec.timezone)  # checked even unscheduled
    with about_field("catch_up"):
        if spec.catch_up not in CATCH_UP_POLICIES:
            raise InvalidInput(f"catch_up must be one of: {', '.join(CATCH_UP_POLICIES)}")
    _check_limits(spec)
    if spec.webhook_url is not None:
        with about_field("webhook_url"):
            check_webhook_url(spec.webhook_url)
    unknown = set(spec.notify_on) - set(NOTIFY_EVENTS)
    if unknown:
        raise InvalidInput(
            f"notify_on takes {', '.join(NOTIFY_EVENTS)}; not {sorted(unknown)}", "notify_on"
        )
    if len(spec.parents) > MAX_PARENTS:
        raise InvalidInput(f"a job may depend on at most {MAX_PARENTS} jobs", "parents")


def _check_limits(spec: JobSpec) -> None:
    if spec.timeout_minutes is not None and not 1 <= spec.timeout_minutes <= LIMIT_MAXIMUM_MINUTES:
        raise InvalidInput(
            f"timeout_minutes must be between 1 and {LIMIT_MAXIMUM_MINUTES}", "timeout_minutes"
        )
    if not 0 <= spec.max_retries <= MAX_RETRIES:
        raise InvalidInput(f"max_retries must be between 0 and {MAX_RETRIES}", "max_retries")
    if not 1 <= spec.retry_backoff_seconds <= MAX_BACKOFF_SECONDS:
        raise InvalidInput(
            f"retry_backoff_seconds must be between 1 and {MAX_BACKOFF_SECONDS}",
            "retry_backoff_seconds",
        )
    if not 1 <= spec.max_concurrent_runs <= MAX_CONCURRENT_RUNS:
        raise InvalidInput(
            f"max_concurrent_runs must be between 1 and {MAX_CONCURRENT_RUNS}",
            "max_concurrent_runs",
        )


def _runtime_id(db: Session, name: str | None) -> int | None:
    if name is None:
        return None
    row = db.scalar(select(Runtime).where(Runtime.name == name))
    if row is None:
        names = ", ".join(db.scalars(select(Runtime.name).order_by(Runtime.name)))
        raise InvalidInput(
            f"no runtime named {name[:100]!r}; runtimes: {names or 'none'}", "runtime"
        )
    return row.id


def _profile_id(db: Session, name: str | None) -> int | None:
    if name is None:
        return None
    row = db.scalar(select(ResourceProfile).where(ResourceProfile.name == name))
    if row is None:
        names = ", ".join(db.scalars(select(ResourceProfile.name).order_by(ResourceProfile.name)))
        raise InvalidInput(
            f"no resource profile named {name[:64]!r}; profiles: {names or 'none'}", "profile"
        )
    if row.gpu > 0:
        raise InvalidInput(
            f"profile {row.name!r} needs GPUs, which this site cannot provide", "profile"
        )
    return row.id


def _parent_ids(
    db: Session, project: Project, job_id: int | None, names: Sequence[str]
) -> list[int]:
    """The parent jobs' ids, refusing unknown names and any cycle the new edges would make."""
    if not names:
        return []
    rows = db.execute(
        select(Job.id, Job.name).where(Job.project_id == project.id, Job.name.in_(set(names)))
    ).all()
    found = {name: job for job, name in rows}
    missing = sorted(set(names) - set(found))
    if missing:
        raise InvalidInput(
            f"no job named {missing[0][:100]!r} in this project to depend on", "parents"
        )
    all_names = dict(db.execute(select(Job.id, Job.name).where(Job.project_id == project.id)).all())
    edges = [
        (c, p)
        for c, p in db.execute(
            select(JobDependency.child_id, JobDependency.parent_id)
            .join(Job, Job.id == JobDependency.child_id)
            .where(Job.project_id == project.id)
        ).all()
        if c != job_id
    ]
    child = job_id if job_id is not None else -1  # a new job has no edges yet
    labels = {**all_names, -1: "(new job)"}
    for name in names:
        with about_field("parents"):
            jobgraph.check_new_edge(edges, child, found[name], labels)
        edges.append((child, found[name]))
    return sorted(set(found[n] for n in names))


def _apply(db: Session, job: Job, spec: JobSpec) -> None:
    """Write ``spec`` (already checked) onto ``job``."""
    schedule_changed = (job.schedule, job.timezone) != (spec.schedule, spec.timezone)
    job.name = spec.name.strip()
    job.arguments = list(spec.arguments)
    job.runtime_id = _runtime_id(db, spec.runtime)
    job.profile_id = _profile_id(db, spec.profile)
    job.env = dict(spec.env)
    job.schedule = spec.schedule
    job.timezone = spec.timezone
    job.catch_up = spec.catch_up
    job.timeout_minutes = spec.timeout_minutes
    job.max_retries = spec.max_retries
    job.retry_backoff_seconds = spec.retry_backoff_seconds
    job.max_concurrent_runs = spec.max_concurrent_runs
    job.webhook_url = spec.webhook_url
    job.notify_on = sorted(set(spec.notify_on))
    job.enabled = spec.enabled
    if schedule_changed or job.schedule_anchor is None:
        # Slots before now are never due for a new or changed schedule: no surprise runs.
        job.schedule_anchor = utcnow()


def _check_unique_name(db: Session, project: Project, name: str, job_id: int | None) -> None:
    other = db.scalar(select(Job.id).where(Job.project_id == project.id, Job.name == name))
    if other is not None and other != job_id:
        raise Conflict(f"this project already has a job named {name!r}", "name")


def create_job(db: Session, project: Project, project_dir: Path, user: User, spec: JobSpec) -> Job:
    _check_spec(spec)
    with about_field("script"):
        script = check_script(project_dir, spec.script)
    name = spec.name.strip()
    _check_unique_name(db, project, name, None)
    parents = _parent_ids(db, project, None, spec.parents)
    job = Job(project_id=project.id, script=script, created_by_id=user.id)
    _apply(db, job, spec)
    db.add(job)
    db.flush()
    for parent in parents:
        db.add(JobDependency(child_id=job.id, parent_id=parent))
    db.flush()
    return job


def update_job(
    db: Session, project: Project, project_dir: Path, job: Job, changes: dict[str, Any]
) -> Job:
    spec = spec_of(db, job).updated(changes)
    _check_spec(spec)
    with about_field("script"):
        script = check_script(project_dir, spec.script) if "script" in changes else job.script
    _check_unique_name(db, project, spec.name.strip(), job.id)
    parents = _parent_ids(db, project, job.id, spec.parents)
    job.script = script
    _apply(db, job, spec)
    if "parents" in changes:
        db.execute(delete(JobDependency).where(JobDependency.child_id == job.id))
        for parent in parents:
            db.add(JobDependency(child_id=job.id, parent_id=parent))
    db.flush()
    return job


def delete_job(db: Session, job: Job) -> None:
    """Delete a job with its history; refused while a run is live (cancel it first)."""
    live = db.scalar(
        select(func.count())
        .select_from(JobRun)
        .where(JobRun.job_id == job.id, JobRun.state.in_([s.value for s in LIVE_STATES]))
    )
    if live:
        raise Conflict(f"job {job.name!r} has {live} run(s) in progress; cancel them first")
    db.execute(
        update(JobRun)
        .where(JobRun.job_id == job.id, JobRun.state.in_([s.value for s in PENDING_STATES]))
        .values(state=WorkloadState.STOPPED, reason="the job was deleted", ended_at=utcnow())
    )
    db.delete(job)
    db.flush()


# ---- reading -------------------------------------------------------------------------------


def get_job(db: Session, project: Project, ref: str) -> Job:
    """A job by id (digits) or by name; another project's job is not found."""
    if ref.isascii() and ref.isdigit() and 0 < int(ref) <= MAX_ROW_ID:
        job = db.get(Job, int(ref))
    else:
        job = db.scalar(select(Job).where(Job.project_id == project.id, Job.name == ref[:100]))
    if job is None or job.project_id != project.id:
        raise NotFound(f"job {ref[:100]!r} not found in this project")
    return job


def list_jobs(db: Session, project: Project) -> list[Job]:
    return list(db.scalars(select(Job).where(Job.project_id == project.id).order_by(Job.name)))


def parent_names(db: Session, job: Job) -> list[str]:
    query = (
        select(Job.name)
        .join(JobDependency, JobDependency.parent_id == Job.id)
        .where(JobDependency.child_id == job.id)
        .order_by(Job.name)
    )
    return list(db.scalars(query))


def project_edges(db: Session, project: Project) -> list[tuple[int, int]]:
    query = (
        select(JobDependency.child_id, JobDependency.parent_id)
        .join(Job, Job.id == JobDependency.child_id)
        .where(Job.project_id == project.id)
    )
    return [(c, p) for c, p in db.execute(query).all()]


def last_runs(db: Session, job_ids: Iterable[int]) -> dict[int, JobRun]:
    """Each job's newest run, in one query."""
    ids = list(job_ids)
    if not ids:
        return {}
    newest = (
        select(func.max(JobRun.id)).where(JobRun.job_id.in_(ids)).group_by(JobRun.job_id)
    ).scalar_subquery()
    return {r.job_id: r for r in db.scalars(select(JobRun).where(JobRun.id.in_(newest)))}


def get_run(db: Session, job: Job, run_id: int) -> JobRun:
    run = db.get(JobRun, run_id) if 0 < run_id <= MAX_ROW_ID else None
    if run is None or run.job_id != job.id:
        raise NotFound(f"run {run_id} of job {job.name!r} not found")
    return run


def list_runs(
    db: Session, job: Job, limit: int, before: int | None, number: int | None = None
) -> list[JobRun]:
    query = select(JobRun).where(JobRun.job_id == job.id)
    if before is not None:
        query = query.where(JobRun.id < before)
    if number is not None:
        query = query.where(JobRun.number == number)
    return list(db.scalars(query.order_by(JobRun.id.desc()).limit(limit)))


def parent_runs(db: Session, run_ids: Iterable[int | None]) -> dict[int, tuple[JobRun, Job]]:
    """Runs (with their jobs) by id, in one query: the parents of dependent runs."""
    ids = [i for i in run_ids if i is not None]
    if not ids:
        return {}
    rows = db.execute(
        select(JobRun, Job).join(Job, Job.id == JobRun.job_id).where(JobRun.id.in_(ids))
    ).all()
    return {run.id: (run, job) for run, job in rows}


def recent_runs(db: Session, project: Project, limit: int) -> list[tuple[JobRun, Job]]:
    """The project's newest runs, of all its jobs, with their jobs: one query."""
    query = (
        select(JobRun, Job)
        .join(Job, Job.id == JobRun.job_id)
        .where(Job.project_id == project.id)
        .order_by(JobRun.id.desc())
        .limit(limit)
    )
    return [(run, job) for run, job in db.execute(query).all()]


def run_workloads(db: Session, runs: Iterable[JobRun]) -> dict[str, Workload]:
    ids = [r.workload_id for r in runs if r.workload_id]
    if not ids:
        return {}
    return {w.id: w for w in db.scalars(select(Workload).where(Workload.id.in_(ids)))}


# ---- runs ----------------------------------------------------------------------------------


def next_run_number(db: Session, job_id: int) -> int:
    """Take the job's next run number (#1, #2, ...). One ``UPDATE ... RETURNING`` on the job's
    row: two writers (the web tier and a runner) never get the same number, and a rolled-back
    run gives its number back. The job's ``updated_at`` stays: running is not editing."""
    number = db.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_run_number=Job.last_run_number + 1, updated_at=Job.updated_at)
        .returning(Job.last_run_number),
        execution_options={"synchronize_session": False},
    ).scalar_one()
    return int(number)


def queue_run(
    db: Session,
    job: Job,
    trigger: str,
    *,
    user: User | None = None,
    parent_run: JobRun | None = None,
    scheduled_for: datetime | None = None,
) -> JobRun:
    """A queued run (flushed; the caller commits, then wakes the runner)."""
    run = JobRun(
        job_id=job.id,
        number=next_run_number(db, job.id),
        trigger=trigger,
        triggered_by_id=user.id if user else None,
        parent_run_id=parent_run.id if parent_run else None,
        scheduled_for=scheduled_for,
        state=WorkloadState.QUEUED,
        created_at=utcnow(),
    )
    db.add(run)
    db.flush()
    return run


def cancel_run(db: Session, run: JobRun, by: User) -> bool:
    """Cancel a run. A run that has not started ends ``stopped`` at once; a live one becomes
    ``stopping`` (the cause recorded first) and the runner kills it. Returns True when the
    runner has work to do. 409 when the run already ended."""
    what = f"run {run.id}"
    event = stop_event(WorkloadState(run.state), what)
    if event is None:
        return True  # already stopping: the runner is on it
    values: dict[str, Any] = {"stop_cause": StopCause.REQUESTED.value}
    if event is Event.CANCEL:
        values.update(reason=f"cancelled by {by.username} before it started", ended_at=utcnow())
    transitions.move(db, run, event, what, **values)
    return event is Event.STOP


__all__ = [
    "INTERPRETERS",
    "JobSpec",
    "cancel_run",
    "create_job",
    "delete_job",
    "get_job",
    "get_run",
    "list_jobs",
    "list_runs",
    "next_run_number",
    "queue_run",
    "update_job",
]
