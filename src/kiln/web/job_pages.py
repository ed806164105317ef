"""Jobs pages: a project's jobs with their pipeline graph, the create/edit form, one job with
its run history, and one run with its console output followed live.

As in ``project_pages``, each action calls the API's handler (``kiln.api.jobs``), so the
rules, the audit records and the commits are the API's own; this module only parses forms and
renders. Authorization is the API's too: viewers look, operators run and cancel
(``OperateProject``), contributors and up create, edit and delete (``WriteProject``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request, Response

from kiln.api import jobs as api
from kiln.api.deps import Caller, Ctx, Db, OperateProject, ProjectAccess, ViewProject, WriteProject
from kiln.domain import jobs as domain
from kiln.domain import resources
from kiln.domain.errors import InvalidInput, KilnError
from kiln.runner.jobruns import runner_id
from kiln.scheduling.cron import CATCH_UP_POLICIES
from kiln.scheduling.states import TERMINAL_STATES
from kiln.web.log_chunks import LOG_CHUNK, read_chunk
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, redirect, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)

JOBS = "/p/{owner}/{project}/jobs"
JOB = JOBS + "/{job}"
RUN = JOB + "/runs/{run_id}"
RUNS_PAGE = 30
ENDED = frozenset(str(s) for s in TERMINAL_STATES)


# ---- the pipeline graph -------------------------------------------------------------------

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 176, 44, 64, 18, 12
LABEL_CHARS = 20


@dataclass(frozen=True)
class Box:
    id: int
    name: str
    label: str
    state: str
    x: int
    y: int


@dataclass(frozen=True)
class Arrow:
    path: str
    parent: str
    child: str


@dataclass(frozen=True)
class Graph:
    boxes: list[Box]
    arrows: list[Arrow]
    width: int
    height: int


def draw_pipeline(pipeline: api.PipelinePublic) -> Graph:
    """Place the API's layout (columns by depth, rows within a column) on an SVG canvas:
    parents sit left of their children, each arrow a curve from a box's right edge to the
    next one's left edge."""
    at: dict[int, tuple[int, int]] = {}
    boxes = []
    for node in pipeline.nodes:
        x = PAD + node.layer * (NODE_W + COL_GAP)
        y = PAD + node.row * (NODE_H + ROW_GAP)
        at[node.id] = (x, y)
        label = node.name if len(node.name) <= LABEL_CHARS else node.name[: LABEL_CHARS - 1] + "…"
        boxes.append(Box(node.id, node.name, label, node.last_state or "never", x, y))
    names = {n.id: n.name for n in pipeline.nodes}
    arrows = []
    for edge in pipeline.edges:
        (px, py), (cx, cy) = at[edge.parent], at[edge.child]
        x1, y1 = px + NODE_W, py + NODE_H // 2
        x2, y2 = cx - 2, cy + NODE_H // 2  # stop short: the arrow head ends at the box
        bend = (x2 - x1) // 2
        path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        arrows.append(Arrow(path, names[edge.parent], names[edge.child]))
    width = max((x for x, _ in at.values()), default=0) + NODE_W + 2 * PAD
    height = max((y for _, y in at.values()), default=0) + NODE_H + 2 * PAD
    return Graph(boxes, arrows, width, height)


# ---- helpers ------------------------------------------------------------------------------


def _jobs_url(access: ProjectAccess) -> str:
    return project_url(access, "jobs")


def _context(access: ProjectAccess) -> dict[str, Any]:
    return {"jobs_url": _jobs_url(access), **project_context(access, "jobs")}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _int_field(value: str, label: str, field: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        message = f"{label} must be a whole number, not {value[:40]!r}"
        raise InvalidInput(message, field) from None


def env_field(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            message = f"environment lines are NAME=VALUE; not {line.strip()[:60]!r}"
            raise InvalidInput(message, "env")
        env[name.strip()] = value
    return env


@dataclass
class JobForm:
    """The create/edit form's fields as typed text (what the template shows back)."""

    name: str = ""
    script: str = ""
    arguments: str = ""
    runtime: str = ""
    profile: str = ""
    env: str = ""
    schedule: str = ""
    timezone: str = "UTC"
    catch_up: str = "once"
    timeout_minutes: str = ""
    max_retries: str = "0"
    retry_backoff_seconds: str = "30"
    max_concurrent_runs: str = "1"
    webhook_url: str = ""
    notify_on: tuple[str, ...] = domain.NOTIFY_EVENTS
    parents: tuple[str, ...] = ()
    enabled: bool = True

    @classmethod
    def of(cls, job: api.JobPublic) -> JobForm:
        return cls(
            name=job.name,
            script=job.script,
            arguments="\n".join(job.arguments),
            runtime=job.runtime or "",
            profile=job.profile or "",
            env="\n".join(f"{k}={v}" for k, v in job.env.items()),
            schedule=job.schedule or "",
            timezone=job.timezone,
            catch_up=job.catch_up,
            timeout_minutes="" if job.timeout_minutes is None else str(job.timeout_minutes),
            max_retries=str(job.max_retries),
            retry_backoff_seconds=str(job.retry_backoff_seconds),
            max_concurrent_runs=str(job.max_concurrent_runs),
            webhook_url=job.webhook_url or "",
            notify_on=tuple(job.notify_on),
            parents=tuple(job.parents),
            enabled=job.enabled,
        )

    def fields(self) -> dict[str, Any]:
        """The API body: every field set explicitly, so an emptied optional field clears it
        on an edit (schedule, timeout, webhook, runtime, profile)."""
        return {
            "arguments": [a for a in self.arguments.splitlines() if a.strip()],
            "runtime": self.runtime or None,
            "profile": self.profile or None,
            "env": env_field(self.env),
            "schedule": self.schedule.strip() or None,
            "timezone": self.timezone.strip() or "UTC",
            "catch_up": self.catch_up,
            "timeout_minutes": _int_field(self.timeout_minutes, "Timeout", "timeout_minutes"),
            "max_retries": _int_field(self.max_retries, "Retries", "max_retries") or 0,
            "retry_backoff_seconds": _int_field(
                self.retry_backoff_seconds, "Retry backoff", "retry_backoff_seconds"
            )
            or 30,
            "max_concurrent_runs": _int_field(
                self.max_concurrent_runs, "Concurrent runs", "max_concurrent_runs"
            )
            or 1,
            "webhook_url": self.webhook_url.strip() or None,
            "notify_on": list(self.notify_on),
            "parents": list(self.parents),
            "enabled": self.enabled,
        }


def _form_choices(db: Db, access: ProjectAccess, editing: str | None) -> dict[str, Any]:
    """The form's choices: runtimes, profiles, catch-up policies, and the other jobs of the
    project as possible parents (not the job itself)."""
    return {
        "runtimes": [r.name for r in resources.list_runtimes(db)],
        "profiles": [p.name for p in resources.list_profiles(db)],
        "catch_up_policies": CATCH_UP_POLICIES,
        "notify_events": domain.NOTIFY_EVENTS,
        "other_jobs": [j.name for j in domain.list_jobs(db, access.project) if j.name != editing],
    }


# Form fields of the job form, read by the one dependency below (create and edit share it).
Text = Annotated[str, Form(max_length=2000)]
LongText = Annotated[str, Form(max_length=200_000)]
Many = Annotated[list[str] | None, Form()]


def _read_form(
    name: Annotated[str, Form(max_length=100)] = "",
    script: Annotated[str, Form(max_length=1024)] = "",
    arguments: LongText = "",
    runtime: Text = "",
    profile: Text = "",
    env: LongText = "",
    schedule: Text = "",
    timezone: Text = "UTC",
    catch_up: Text = "once",
    timeout_minutes: Text = "",
    max_retries: Text = "0",
    retry_backoff_seconds: Text = "30",
    max_concurrent_runs: Text = "1",
    webhook_url: Text = "",
    notify_on: Many = None,
    parents: Many = None,
    enabled: Text = "",
) -> JobForm:
    return JobForm(
        name=name.strip(),
        script=script.strip(),
        arguments=arguments,
        runtime=runtime,
        profile=profile,
        env=env,
        schedule=schedule,
        timezone=timezone,
        catch_up=catch_up,
        timeout_minutes=timeout_minutes,
        max_retries=max_retries,
        retry_backoff_seconds=retry_backoff_seconds,
        max_concurrent_runs=max_concurrent_runs,
        webhook_url=webhook_url,
        notify_on=tuple(notify_on or ()),
        parents=tuple(parents or ()),
        enabled=enabled == "true",
    )


PostedJob = Annotated[JobForm, Depends(_read_form)]


# ---- the list -----------------------------------------------------------------------------


@router.get(JOBS)
def jobs_page(request: Request, caller: UiCaller, access: ViewProject, db: Db) -> Response:
    jobs = api.list_jobs(access, db)
    graph = draw_pipeline(api.pipeline(access, db)) if jobs else None
    return render(
        request,
        "jobs/list.html",
        caller,
        jobs=jobs,
        graph=graph,
        has_edges=bool(graph and graph.arrows),
        node_w=NODE_W,
        node_h=NODE_H,
        **_context(access),
    )


@router.get(JOBS + "/new")
def new_job_page(request: Request, caller: UiCaller, access: WriteProject, db: Db) -> Response:
    return render(
        request,
        "jobs/form.html",
        caller,
        form=JobForm(),
        editing=None,
        job_id=None,
        **_form_choices(db, access, None),
        **_context(access),
    )


@router.post(JOBS + "/new")
def create_job(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    form: PostedJob,
) -> Response:
    """Create a job; a refusal (any field) is shown in the form, which keeps what was typed."""
    body = api.JobCreate(name=form.name, script=form.script, **form.fields())
    job = api.create_job(body, access, request, ctx, db)
    return redirect(request, f"{_jobs_url(access)}/{job.id}")


@router.get(JOB + "/edit")
def edit_job_page(
    request: Request, job: str, caller: UiCaller, access: WriteProject, db: Db
) -> Response:
    found = api.get_job(job, access, db)
    return render(
        request,
        "jobs/form.html",
        caller,
        form=JobForm.of(found),
        editing=found.name,
        job_id=found.id,
        **_form_choices(db, access, found.name),
        **_context(access),
    )


@router.post(JOB + "/edit")
def update_job(
    request: Request,
    job: str,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    form: PostedJob,
) -> Response:
    body = api.JobUpdate(name=form.name, script=form.script, **form.fields())
    changed = api.update_job(job, body, access, request, ctx, db)
    return redirect(request, f"{_jobs_url(access)}/{changed.id}")


@router.post(JOB + "/delete")
def delete_job(
    request: Request, job: str, caller: UiCaller, access: WriteProject, db: Db
) -> Response:
    api.delete_job(job, access, request, db)
    return redirect(request, _jobs_url(access))


# ---- one job ------------------------------------------------------------------------------


@router.get(JOB)
def job_page(
    request: Request,
    job: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    found = api.get_job(job, access, db)
    runs = api.list_runs(str(found.id), access, ctx, db, RUNS_PAGE, cursor)
    live = any(r.state not in ENDED for r in runs.items)
    context = {
        "job": found,
        "runs": runs.items,
        "next_cursor": runs.next_cursor,
        "cursor": cursor,
        "polling": live,
        "duration": duration,
        "job_url": f"{_jobs_url(access)}/{found.id}",
        **_context(access),
    }
    # While runs are live the history refreshes itself (only the table is replaced).
    template = "jobs/_runs.html" if is_htmx(request) else "jobs/detail.html"
    return render(request, template, caller, **context)


@router.post(JOB + "/run")
def run_job(
    request: Request, job: str, caller: UiCaller, access: OperateProject, ctx: Ctx, db: Db
) -> Response:
    """Run now (operators and up), then show the run following its log."""
    found = api.get_job(job, access, db)
    run = api.run_job(str(found.id), access, request, ctx, db)
    return redirect(request, f"{_jobs_url(access)}/{found.id}/runs/{run.id}")


# ---- one run ------------------------------------------------------------------------------


def _run_context(access: ProjectAccess, job: api.JobPublic, run: api.RunPublic) -> dict[str, Any]:
    job_url = f"{_jobs_url(access)}/{job.id}"
    return {
        "run": run,
        "job": job,
        "job_url": job_url,
        "run_url": f"{job_url}/runs/{run.id}",
        "live": run.state not in ENDED,
        "duration": duration,
        **_context(access),
    }


def _read_log(request: Request, ctx: Ctx, run: api.RunPublic, offset: int) -> tuple[str, int]:
    """Up to LOG_CHUNK bytes of the run's output from ``offset``: (text, next offset)."""
    if run.workload_id is None:
        return "", offset
    return read_chunk(request, ctx, runner_id(run.workload_id), offset, run.state in ENDED)


def _shown_run(
    job: str, run_id: int, access: ViewProject, ctx: Ctx, db: Db
) -> tuple[api.JobPublic, api.RunPublic]:
    """The job and the run a run page's address names, as the API shows them."""
    found = api.get_job(job, access, db)
    return found, api.get_run(str(found.id), run_id, access, ctx, db)


ShownRun = Annotated[tuple[api.JobPublic, api.RunPublic], Depends(_shown_run)]


@router.get(RUN)
def run_page(request: Request, caller: UiCaller, access: ViewProject, shown: ShownRun) -> Response:
    found, run = shown
    # The log arrives through the poller (the first poll at once): the page itself never
    # waits on the runner.
    return render(
        request,
        "jobs/run.html",
        caller,
        offset=0,
        attempt=run.attempt,
        done=False,
        problem="",
        oob=False,
        **_run_context(access, found, run),
    )


@router.get(RUN + "/status")
def run_status(
    request: Request, caller: UiCaller, access: ViewProject, shown: ShownRun
) -> Response:
    found, run = shown
    return render(request, "jobs/_run_status.html", caller, **_run_context(access, found, run))


@router.get(RUN + "/log")
def run_log(
    request: Request,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    shown: ShownRun,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    attempt: Annotated[int, Query(ge=0, le=1000)] = 0,
) -> Response:
    """New output since ``offset``, appended to the page's log; the response also replaces
    the poller (out of band) with one that asks from the new offset, or stops asking once the
    run has ended and everything is shown. A retry starts a new attempt's log from 0."""
    found, run = shown
    new_attempt = attempt not in (0, run.attempt)
    if new_attempt:
        offset = 0
    return log_fragment(
        request,
        caller,
        lambda: _read_log(request, ctx, run, offset),
        offset=offset,
        ended=run.state in ENDED,
        attempt=run.attempt,
        new_attempt=new_attempt,
        context=_run_context(access, found, run),
    )


def log_fragment(
    request: Request,
    caller: Caller,
    read: Callable[[], tuple[str, int]],
    *,
    offset: int,
    ended: bool,
    attempt: int,
    new_attempt: bool,
    context: dict[str, Any],
) -> Response:
    """The answer to a log poll (job runs, builds): the new text, and a poller that asks
    from the new offset, or none once the log has ended and all of it is shown. If the log
    cannot be read now (its service is away), say so and keep asking."""
    problem = ""
    try:
        text, next_offset = read()
    except KilnError as exc:
        text, next_offset, problem = "", offset, exc.detail
    done = ended and not problem and next_offset - offset < LOG_CHUNK
    return render(
        request,
        "jobs/_log.html",
        caller,
        text=text,
        offset=next_offset,
        attempt=attempt,
        new_attempt=new_attempt,
        problem=problem,
        done=done,
        oob=True,
        **context,
    )


@router.post(RUN + "/cancel")
def cancel_run(
    request: Request,
    job: str,
    run_id: int,
    caller: UiCaller,
    access: OperateProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    found = api.get_job(job, access, db)
    run = api.cancel_run(str(found.id), run_id, access, request, ctx, db)
    if not is_htmx(request):
        return redirect(request, f"{_jobs_url(access)}/{found.id}/runs/{run.id}")
    return render(request, "jobs/_run_status.html", caller, **_run_context(access, found, run))
