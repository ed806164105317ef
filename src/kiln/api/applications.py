"""Applications: create, change and delete (contributors and up), start, stop and restart
(operators and up), look at them and read their logs (viewers and up), open one (viewers and
up, through the sign-in hand-off to its own origin), and the site-wide list of the
applications the caller can open.

Creating answers **201 with the application** as soon as it is durable, with its first
instance queued: the runner's reconciler starts it (the web tier wakes it). ``state`` says
what it does (``starting``, ``running``, ``crashed``, ``crash-looping``, ``waiting`` for
quota, ``stopping``, ``stopped``) and ``message`` why. A change of script, runtime, profile
or environment restarts a running application; its old instance serves until the new one
answers. Logs are the console of the current (or last) instance: ``?follow=true`` keeps the
response open, ``?offset=N`` resumes after N bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field, StrictBool
from sqlalchemy.orm import Session

from kiln.api import handoff
from kiln.api.deps import (
    Ctx,
    CurrentUser,
    Db,
    OperateProject,
    ProjectAccess,
    ViewProject,
    WriteProject,
)
from kiln.api.logs import empty_log, stream_log
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel
from kiln.api.sessions import TimelineEntry
from kiln.db.app_models import Application
from kiln.db.models import Project, utcnow
from kiln.domain import app_instances, session_access, session_editors, site_settings
from kiln.domain import applications as domain
from kiln.domain.errors import KilnError
from kiln.domain.jobs import MAX_ENV_VALUE
from kiln.domain.sessions import profile_names, timelines, usernames
from kiln.runner.client import RunnerClient, runner_client
from kiln.settings import Settings

router = APIRouter(tags=["applications"])

APPS = "/projects/{owner}/{project}/applications"
APP = APPS + "/{application}"
AppRef = Annotated[str, Field(max_length=100)]


class AppFields(InputModel):
    """Fields shared by create and update (on update every field is optional)."""

    description: str | None = Field(None, max_length=2000)
    runtime: str | None = Field(None, max_length=100, description="A runtime's name.")
    profile: str | None = Field(None, max_length=64, description="A resource profile's name.")
    env: dict[str, Annotated[str, Field(max_length=MAX_ENV_VALUE)]] | None = Field(
        None, description="Overrides the project's environment (site < project < application)."
    )
    public: StrictBool | None = Field(
        None,
        description="Reachable without signing in, while the site allows public applications.",
    )


class AppCreate(AppFields):
    name: str = Field(max_length=100)
    subdomain: str = Field(
        max_length=100,
        description="Its address: https://{subdomain}.{content domain}/ (one DNS label, unique "
        "on the site; www, api, modelservice and other Kiln names are reserved).",
    )
    script: str = Field(
        max_length=1024,
        description="Project-relative .py or .sh file that serves HTTP on "
        "127.0.0.1:$CDSW_APP_PORT.",
    )


class AppUpdate(AppFields):
    name: str | None = Field(None, max_length=100)
    subdomain: str | None = Field(None, max_length=100)
    script: str | None = Field(None, max_length=1024)


class InstancePublic(BaseModel):
    id: str
    state: str
    reason: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    timeline: list[TimelineEntry]


class AppPublic(BaseModel):
    id: int
    project: str
    name: str
    subdomain: str
    url: str = Field(description="Where it is served")
    description: str
    script: str
    runtime: str | None
    profile: str | None
    cpu: float = Field(description="vCPU")
    memory_bytes: int
    env: dict[str, str]
    public: bool = Field(description="Marked public by its project")
    reachable_publicly: bool = Field(
        description="Public now: marked public and the site allows public applications"
    )
    desired: str = Field(description="running or stopped: what its users asked for")
    state: str = Field(
        description="running, starting, waiting, crashed, crash-looping, stopping, stopped"
    )
    message: str
    restarting: bool = Field(description="A new instance starts beside the serving one")
    crashes: int = Field(description="Crashes in a row")
    restart_at: dt.datetime | None = Field(description="After a crash: the next start")
    last_output: str = Field(description="The last lines its last crashed instance printed")
    instance: InstancePublic | None = Field(description="The serving (or last) instance")
    memory_used_bytes: int | None = Field(
        None,
        description="Memory its serving instance uses now (asked of the runner when one "
        "application is read; not in lists)",
    )
    created_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


def app_url(settings: Settings, request: Request, app: Application) -> str:
    return (
        session_access.session_origin(
            settings.domain, request.url.scheme, request.url.port, app.subdomain
        )
        + "/"
    )


def publish(
    db: Session, request: Request, settings: Settings, rows: list[tuple[Application, Project]]
) -> list[AppPublic]:
    """The applications as the API shows them, with their instances, timelines, users,
    profiles and runtimes looked up in one query each."""
    apps = [a for a, _ in rows]
    found = domain.instances(db, apps)
    events = timelines(db, [a.workload_id for a in apps if a.workload_id in found])
    users = usernames(db, {a.created_by_id for a in apps})
    profiles = profile_names(db, {a.profile_id for a in apps})
    runtimes = session_editors.runtime_names(db, {a.runtime_id for a in apps})
    public_allowed = bool(site_settings.get(db, site_settings.PUBLIC_APPLICATIONS))
    now = utcnow()
    out = []
    for app, project in rows:
        current = found.get(app.workload_id or "")
        status = domain.describe(app, current, found.get(app.next_workload_id or ""), now)
        instance = None
        if current is not None:
            instance = InstancePublic(
                id=current.id,
                state=current.state,
                reason=current.reason,
                created_at=current.created_at,
                started_at=current.started_at,
                ended_at=current.ended_at,
                timeline=[
                    TimelineEntry(state=e.state, at=e.at, message=e.message)
                    for e in events.get(current.id, [])
                ],
            )
        out.append(
            AppPublic(
                id=app.id,
                project=f"{project.owner_name}/{project.slug}",
                name=app.name,
                subdomain=app.subdomain,
                url=app_url(settings, request, app),
                description=app.description,
                script=app.script,
                runtime=runtimes.get(app.runtime_id) if app.runtime_id else None,
                profile=profiles.get(app.profile_id) if app.profile_id else None,
                cpu=app.cpu_millis / 1000,
                memory_bytes=app.memory_bytes,
                env=dict(app.env),
                public=app.public,
                reachable_publicly=app.public and public_allowed,
                desired=app.desired,
                state=status.state,
                message=status.message,
                restarting=status.restarting,
                crashes=app.crashes,
                restart_at=app.restart_at,
                last_output=app.last_output,
                instance=instance,
                created_by=users.get(app.created_by_id) if app.created_by_id else None,
                created_at=app.created_at,
                updated_at=app.updated_at,
            )
        )
    return out


def _one(
    db: Session, request: Request, ctx: Ctx, access: ProjectAccess, app: Application
) -> AppPublic:
    return publish(db, request, ctx.settings, [(app, access.project)])[0]


def _client(request: Request, settings: Settings) -> RunnerClient:
    return runner_client(request.app.state, settings)


def _changes(body: AppFields) -> dict[str, Any]:
    """The fields the caller sent; ``null`` resets runtime and profile to the site's
    defaults and leaves the others as they are."""
    clearable = {"runtime", "profile"}
    return {
        k: v
        for k, v in body.model_dump(exclude_unset=True).items()
        if v is not None or k in clearable
    }


# ---- the project's applications ------------------------------------------------------------


@router.get(APPS, response_model=list[AppPublic])
def list_applications(access: ViewProject, request: Request, ctx: Ctx, db: Db) -> list[AppPublic]:
    """The project's applications by name, each with what it is doing now."""
    rows = [(a, access.project) for a in domain.list_applications(db, access.project)]
    return publish(db, request, ctx.settings, rows)


@router.post(APPS, status_code=201, response_model=AppPublic)
def create_application(
    body: AppCreate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> AppPublic:
    """Create an application (contributors and up); it starts at once."""
    changes = _changes(body)
    spec = domain.AppSpec(name=body.name, subdomain=body.subdomain, script=body.script)
    spec = spec.updated({k: v for k, v in changes.items() if k not in ("name", "subdomain")})
    project_dir = ctx.store.project_dir(access.project.id)
    app = domain.create_application(db, access.project, project_dir, access.user, spec)
    commit_audited(
        db,
        access,
        request,
        "application.create",
        changes_project=True,
        application=app.name,
        subdomain=app.subdomain,
        public=app.public,
    )
    _client(request, ctx.settings).wake()
    return _one(db, request, ctx, access, app)


# The memory reading is a nice-to-have on a page that polls: a busy runner must not hold it up.
MEMORY_READ_TIMEOUT = 2.0


@router.get(APP, response_model=AppPublic)
def get_application(
    application: AppRef, access: ViewProject, request: Request, ctx: Ctx, db: Db
) -> AppPublic:
    """One application, with the memory its serving instance uses now."""
    app = domain.get_application(db, access.project, application)
    found = _one(db, request, ctx, access, app)
    if found.instance is None or found.instance.state != "running":
        return found
    try:
        client = _client(request, ctx.settings)
        status = client.status(domain.runner_id(found.instance.id), timeout=MEMORY_READ_TIMEOUT)
    except KilnError:  # the runner is away or slow: the rest of the answer still holds
        return found
    used = status.memory_used_bytes or None
    return found.model_copy(update={"memory_used_bytes": used})


@router.patch(APP, response_model=AppPublic)
def update_application(
    application: AppRef,
    body: AppUpdate,
    access: WriteProject,
    request: Request,
    ctx: Ctx,
    db: Db,
) -> AppPublic:
    """Change some fields (contributors and up), all checked together. A change of script,
    runtime, profile or environment restarts a running application."""
    app = domain.get_application(db, access.project, application)
    changes = _changes(body)
    project_dir = ctx.store.project_dir(access.project.id)
    restarts = domain.update_application(db, access.project, project_dir, app, changes)
    commit_audited(
        db,
        access,
        request,
        "application.update",
        changes_project=True,
        application=app.name,
        fields=sorted(changes),
        restarted=restarts,
    )
    if restarts:
        _client(request, ctx.settings).wake()
    return _one(db, request, ctx, access, app)


@router.delete(APP, status_code=204)
def delete_application(
    application: AppRef, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> Response:
    """Delete an application (contributors and up); its instances are stopped."""
    app = domain.get_application(db, access.project, application)
    name, subdomain = app.name, app.subdomain
    live = domain.delete_application(db, app)
    commit_audited(
        db,
        access,
        request,
        "application.delete",
        changes_project=True,
        application=name,
        subdomain=subdomain,
    )
    app_instances.stop_now(db, _client(request, ctx.settings), live)
    return Response(status_code=204)


def _wanted_running(
    application: str,
    access: ProjectAccess,
    request: Request,
    ctx: Ctx,
    db: Session,
    change: Callable[[Session, Application], None],
    action: str,
) -> AppPublic:
    """Start or restart: change what is wanted, audit it, and nudge the runner."""
    app = domain.get_application(db, access.project, application)
    change(db, app)
    commit_audited(db, access, request, action, application=app.name)
    _client(request, ctx.settings).wake()
    return _one(db, request, ctx, access, app)


@router.post(APP + "/start", response_model=AppPublic)
def start_application(
    application: AppRef, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> AppPublic:
    """Start a stopped (or crashed) application (operators and up)."""
    return _wanted_running(application, access, request, ctx, db, domain.start, "application.start")


@router.post(APP + "/restart", response_model=AppPublic)
def restart_application(
    application: AppRef, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> AppPublic:
    """Restart (operators and up): a new instance starts and takes over once it answers."""
    restart = domain.restart
    return _wanted_running(application, access, request, ctx, db, restart, "application.restart")


@router.post(APP + "/stop", response_model=AppPublic)
def stop_application(
    application: AppRef, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> AppPublic:
    """Stop (operators and up); answers once its instances stopped (or are stopping, when
    the runner cannot be reached: the runner finishes then)."""
    app = domain.get_application(db, access.project, application)
    live = domain.stop(db, app, access.user)
    commit_audited(db, access, request, "application.stop", application=app.name)
    app_instances.stop_now(db, _client(request, ctx.settings), live)
    db.refresh(app)
    return _one(db, request, ctx, access, app)


@router.get(APP + "/logs", response_class=StreamingResponse)
def application_logs(
    application: AppRef,
    access: ViewProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    follow: bool = False,
) -> StreamingResponse:
    """The console of the serving (or last) instance, as text."""
    app = domain.get_application(db, access.project, application)
    instance = domain.current_instance(db, app)
    if instance is None or instance.started_at is None:  # never ran: it printed nothing
        return empty_log()
    client = _client(request, ctx.settings)
    return stream_log(client, domain.runner_id(instance), offset, follow)


@router.get(
    APP + "/open",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "To the application on its own origin"}},
)
def open_application(
    application: AppRef, access: ViewProject, request: Request, ctx: Ctx, db: Db
) -> RedirectResponse:
    """Open the application as the caller: redirects to its origin with a token that signs
    the browser in there once, within a minute."""
    app = domain.get_application(db, access.project, application)
    redirect = handoff.handoff_redirect(request, ctx, db, app.subdomain, access.user.id, "/")
    commit_audited(db, access, request, "application.open", application=app.name)
    return redirect


# ---- the site's -----------------------------------------------------------------------------


@router.get("/applications", response_model=list[AppPublic])
def my_applications(user: CurrentUser, request: Request, ctx: Ctx, db: Db) -> list[AppPublic]:
    """Every application the caller can open (viewer and up of its project), site-wide."""
    return publish(db, request, ctx.settings, domain.visible_applications(db, user))
