"""Applications pages: the site-wide list of the applications a user can open (what CML's
business users see), a project's applications with their state, link and resources, the
create/edit form, one application's page with its status, timeline and live log, and
``/open/<label>``, where a browser without access to an origin of the content domain signs
in and is handed over.

As elsewhere in the UI, each action calls the API's handler (``kiln.api.applications``), so
the rules, runner calls, audit records and commits are the API's own; this module parses
forms and renders. Viewers look and open, operators start, stop and restart, contributors
create, edit and delete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Query, Request, Response

from kiln.api import applications as api
from kiln.api.deps import (
    Ctx,
    Db,
    OperateProject,
    ProjectAccess,
    ViewProject,
    WriteProject,
    client_address,
)
from kiln.api.handoff import handoff_redirect
from kiln.domain import applications as domain
from kiln.domain import audit, resources, site_settings
from kiln.domain.app_access import Kind, kind_of
from kiln.domain.errors import KilnError, NotFound
from kiln.pki.ca import content_domain
from kiln.web.job_pages import env_field
from kiln.web.log_chunks import LOG_CHUNK, read_chunk
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, redirect, render, safe_next
from kiln.web.session_pages import size_label

router = APIRouter(route_class=UiRoute, include_in_schema=False)

APPS = "/p/{owner}/{project}/applications"
APP = APPS + "/{application}"
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# States an application only passes through: while one is shown, its page asks again.
PASSING = frozenset({"starting", "waiting", "stopping", "crashed", "crash-looping"})
ENDED_INSTANCE = frozenset({"succeeded", "failed", "timed_out", "stopped"})


def _apps_url(access: ProjectAccess) -> str:
    return project_url(access, "applications")


def _view(app: api.AppPublic) -> dict[str, Any]:
    return {
        "a": app,
        "size": size_label(app.cpu, app.memory_bytes),
        "passing": app.state in PASSING or app.restarting,
    }


def _context(access: ProjectAccess) -> dict[str, Any]:
    return {"apps_url": _apps_url(access), **project_context(access, "applications")}


# ---- the form ------------------------------------------------------------------------------


@dataclass
class AppForm:
    """The create/edit form's fields as typed (what the template shows back)."""

    name: str = ""
    subdomain: str = ""
    script: str = ""
    description: str = ""
    runtime: str = ""
    profile: str = ""
    env: str = ""
    public: bool = False

    @classmethod
    def of(cls, app: api.AppPublic) -> AppForm:
        return cls(
            name=app.name,
            subdomain=app.subdomain,
            script=app.script,
            description=app.description,
            runtime=app.runtime or "",
            profile=app.profile or "",
            env="\n".join(f"{k}={v}" for k, v in app.env.items()),
            public=app.public,
        )

    def fields(self) -> dict[str, Any]:
        return {
            "name": self.name.strip(),
            "subdomain": self.subdomain.strip(),
            "script": self.script.strip(),
            "description": self.description.strip(),
            "runtime": self.runtime or None,
            "profile": self.profile or None,
            "env": env_field(self.env),
            "public": self.public,
        }


def _form_choices(ctx: Ctx, db: Db) -> dict[str, Any]:
    resources.ensure_builtin_runtime(db)
    db.commit()
    return {
        "runtimes": [r.name for r in resources.list_runtimes(db)],
        "profiles": [p.name for p in resources.list_profiles(db)],
        "content_domain": content_domain(ctx.settings.domain),
        "public_allowed": bool(site_settings.get(db, site_settings.PUBLIC_APPLICATIONS)),
    }


def _form_page(
    request: Request,
    caller: UiCaller,
    access: ProjectAccess,
    ctx: Ctx,
    db: Db,
    form: AppForm,
    editing: api.AppPublic | None,
) -> Response:
    return render(
        request,
        "applications/form.html",
        caller,
        form=form,
        editing=editing,
        **_form_choices(ctx, db),
        **_context(access),
    )


FormText = Annotated[str, Form(max_length=2000)]


def _posted_form(
    name: FormText = "",
    subdomain: FormText = "",
    script: FormText = "",
    description: FormText = "",
    runtime: FormText = "",
    profile: FormText = "",
    env: Annotated[str, Form(max_length=100_000)] = "",
    public: FormText = "",
) -> AppForm:
    """The create and edit forms' fields, as posted."""
    return AppForm(name, subdomain, script, description, runtime, profile, env, public == "true")


PostedForm = Annotated[AppForm, Depends(_posted_form)]


# ---- the project's applications ------------------------------------------------------------


@router.get(APPS)
def apps_page(
    request: Request, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db
) -> Response:
    apps = [_view(a) for a in api.list_applications(access, request, ctx, db)]
    context = {"apps": apps, "polling": any(v["passing"] for v in apps), **_context(access)}
    if is_htmx(request):  # polling replaces only the list
        return render(request, "applications/_list.html", caller, **context)
    return render(request, "applications/list.html", caller, **context)


@router.get(APPS + "/new")
def new_app_page(
    request: Request, caller: UiCaller, access: WriteProject, ctx: Ctx, db: Db
) -> Response:
    return _form_page(request, caller, access, ctx, db, AppForm(), None)


@router.post(APPS + "/new")
def create_app(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    form: PostedForm,
) -> Response:
    body = api.AppCreate(**form.fields())
    app = api.create_application(body, access, request, ctx, db)
    return redirect(request, f"{_apps_url(access)}/{app.name}")


@router.get(APP + "/edit")
def edit_app_page(
    request: Request,
    application: str,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    app = api.get_application(application, access, request, ctx, db)
    return _form_page(request, caller, access, ctx, db, AppForm.of(app), app)


@router.post(APP + "/edit")
def update_app(
    request: Request,
    application: str,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    form: PostedForm,
) -> Response:
    body = api.AppUpdate(**form.fields())
    app = api.update_application(application, body, access, request, ctx, db)
    return redirect(request, f"{_apps_url(access)}/{app.name}")


@router.post(APP + "/delete")
def delete_app(
    request: Request, application: str, access: WriteProject, ctx: Ctx, db: Db
) -> Response:
    api.delete_application(application, access, request, ctx, db)
    return redirect(request, _apps_url(access))


# ---- one application -----------------------------------------------------------------------


def _app_context(access: ProjectAccess, app: api.AppPublic) -> dict[str, Any]:
    return {
        **_view(app),
        "app_url": f"{_apps_url(access)}/{app.name}",
        "open_url": f"/open/{app.subdomain}",
        **_context(access),
    }


@router.get(APP)
def app_page(
    request: Request,
    application: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    app = api.get_application(application, access, request, ctx, db)
    # The log arrives through its poller (the first poll at once).
    instance = app.instance.id if app.instance else ""
    return render(
        request,
        "applications/detail.html",
        caller,
        offset=0,
        instance=instance,
        done=False,
        problem="",
        oob=False,
        **_app_context(access, app),
    )


@router.get(APP + "/status")
def app_status(
    request: Request,
    application: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    app = api.get_application(application, access, request, ctx, db)
    return render(request, "applications/_status.html", caller, **_app_context(access, app))


@router.get(APP + "/log")
def app_log(
    request: Request,
    application: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    instance: Annotated[str, Query(max_length=32)] = "",
) -> Response:
    """New output since ``offset`` of the serving (or last) instance, appended to the page;
    a new instance (a restart) starts its log from 0 under a separator line."""
    app = api.get_application(application, access, request, ctx, db)
    current = app.instance
    new_instance = current is not None and instance not in ("", current.id)
    if new_instance:
        offset = 0
    text, next_offset, problem = "", offset, ""
    ended = current is None or current.state in ENDED_INSTANCE
    if current is not None and current.started_at is not None:
        try:
            text, next_offset = read_chunk(
                request, ctx, domain.runner_id(current.id), offset, ended
            )
        except KilnError as exc:  # the runner is away: say so, keep asking
            problem = exc.detail
    # An application has no end: keep asking, except for a stopped one fully shown.
    done = app.desired == domain.STOPPED and ended and next_offset - offset < LOG_CHUNK
    return render(
        request,
        "applications/_log.html",
        caller,
        text=text,
        offset=next_offset,
        instance=current.id if current else "",
        new_instance=new_instance,
        problem=problem,
        done=done and not problem,
        oob=True,
        **_app_context(access, app),
    )


def _act(
    request: Request, caller: UiCaller, access: ProjectAccess, app: api.AppPublic, view: str
) -> Response:
    """Answer an action with what the page that asked shows: the list, or the app."""
    if view == "list":
        return redirect(request, _apps_url(access))
    if not is_htmx(request):
        return redirect(request, f"{_apps_url(access)}/{app.name}")
    return render(request, "applications/_status.html", caller, **_app_context(access, app))


View = Annotated[str, Form(max_length=10)]


# What the page's buttons call: the API's handler of each action (its rule: operators).
ACTIONS = {
    "start": api.start_application,
    "stop": api.stop_application,
    "restart": api.restart_application,
}


@router.post(APP + "/{action}")
def act_on_app(
    request: Request,
    application: str,
    action: Literal["start", "stop", "restart"],
    caller: UiCaller,
    access: OperateProject,
    ctx: Ctx,
    db: Db,
    view: View = "app",
) -> Response:
    app = ACTIONS[action](application, access, request, ctx, db)
    return _act(request, caller, access, app, view)


# ---- the site's ------------------------------------------------------------------------------


@router.get("/applications")
def my_apps_page(request: Request, caller: UiCaller, ctx: Ctx, db: Db) -> Response:
    """Every application the user can open, by project: the page business users live on."""
    apps = [_view(a) for a in api.my_applications(caller.user, request, ctx, db)]
    return render(request, "applications/mine.html", caller, apps=apps)


@router.get("/open/{label}")
def open_origin(
    request: Request,
    label: str,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    next_path: Annotated[str, Query(alias="next", max_length=2000)] = "/",
) -> Response:
    """Sign the browser in on ``<label>.<content domain>`` (an application, or a session's
    editor or web UI), then land on ``next`` there. Where the proxy sends a browser without
    access; 404 for those who may not see it."""
    if not _LABEL.fullmatch(label):
        raise NotFound("there is no application at this address")
    after = safe_next(next_path) if next_path != "/" else "/"
    response = handoff_redirect(request, ctx, db, label, caller.user.id, after)
    kind = kind_of(label)[0]
    action = "application.open" if kind is Kind.APPLICATION else "session.open"
    audit.record(
        db, action, actor=caller.user, target=f"origin:{label}", address=client_address(request)
    )
    db.commit()
    return response
