"""Project pages: the list, creation, collaborators, environment, settings (the overview is
``project_overview``).

Each action calls the API's handler for it (``kiln.api.projects``), so the rules, the audit
record and the commit are the API's own; this module only parses forms and renders.
Authorization is the API's too: the ``ViewProject``/``AdminProject`` dependencies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, Response
from sqlalchemy import select

from kiln.api import files as files_api
from kiln.api import projects as api
from kiln.api.deps import AdminProject, Ctx, Db, ProjectAccess, ViewProject, client_address
from kiln.db.models import Role, Team, TeamMember, User, Visibility
from kiln.domain.authz import ACTION_ROLES, Action
from kiln.domain.errors import InvalidInput, NotFound, about_field
from kiln.storage.store import template_names
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, redirect, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 30
ROLE_NAMES = [r.name for r in Role]


def project_url(access: ProjectAccess, tab: str = "") -> str:
    base = f"/p/{access.project.owner_name}/{access.project.slug}"
    return f"{base}/{tab}" if tab else base


def project_context(access: ProjectAccess, tab: str) -> dict[str, Any]:
    """What every project page needs: the project, the caller's role and what it allows."""
    allowed = {action.value: access.role >= ACTION_ROLES[action] for action in Action}
    return {
        "project": access.project,
        "role": access.role.name,
        "can": allowed,
        "tab": tab,
        "base": project_url(access),
    }


# ---- list and search ----------------------------------------------------------------------


@router.get("/projects")
def projects_page(
    request: Request,
    caller: UiCaller,
    db: Db,
    q: Annotated[str, Query(max_length=100)] = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    q = q.strip()
    page = api.list_projects(request, db, caller.user, q or None, PAGE_SIZE, cursor)
    context: dict[str, Any] = {
        "projects": page.items,
        "next_cursor": page.next_cursor,
        "q": q,
        "more": cursor,
    }
    # Search-as-you-type and "show more" replace only the list.
    template = "projects/_cards.html" if is_htmx(request) else "projects/list.html"
    return render(request, template, caller, **context)


def _owner_choices(db: Db, user: User) -> list[str]:
    teams = db.scalars(
        select(Team.name)
        .join(TeamMember, TeamMember.team_id == Team.id)
        .where(TeamMember.user_id == user.id)
        .order_by(Team.name)
    )
    return [user.username, *teams]


@router.get("/projects/new")
def new_project_page(request: Request, caller: UiCaller, db: Db) -> Response:
    return render(
        request,
        "projects/new.html",
        caller,
        owners=_owner_choices(db, caller.user),
        templates=template_names(),
        visibilities=[v.value for v in Visibility],
    )


@router.post("/projects/new")
def create_project(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    name: Annotated[str, Form(max_length=100)],
    source: Annotated[str, Form()] = "blank",
    template: Annotated[str, Form(max_length=64)] = "",
    slug: Annotated[str, Form(max_length=64)] = "",
    owner: Annotated[str, Form(max_length=64)] = "",
    description: Annotated[str, Form(max_length=2000)] = "",
    visibility: Annotated[Visibility, Form()] = Visibility.private,
) -> Response:
    if source == "upload":  # kiln.js sends uploads to /projects/upload
        raise InvalidInput(
            "choose the archive to upload, then press Create project again", "source"
        )
    if source not in ("blank", "template"):
        raise InvalidInput(
            "choose how to start: blank, from a template, or from an archive", "source"
        )
    if source == "template" and not template:
        raise InvalidInput("choose a template", "template")
    body = api.ProjectCreate(
        name=name,
        slug=slug.strip() or None,
        owner=owner or None,
        description=description,
        visibility=visibility,
        template=template if source == "template" else None,
    )
    project = api.create_project_with_files(ctx, db, caller.user, body, client_address(request))
    return redirect(request, f"/p/{project.owner_name}/{project.slug}")


@router.post("/projects/upload")
async def upload_project(request: Request, caller: UiCaller, ctx: Ctx, db: Db) -> Response:
    """The same form with an archive: the upload API reads the multipart body itself."""
    created = await files_api.upload_project(request, ctx, db, caller.user)
    return redirect(request, f"/p/{created.owner}/{created.slug}")


# ---- one project --------------------------------------------------------------------------


# ---- collaborators ------------------------------------------------------------------------


def _collaborators(
    request: Request, caller: UiCaller, access: ProjectAccess, db: Db, notice: str = ""
) -> Response:
    """The collaborators card; ``notice`` confirms the change just made."""
    template = "project/_collaborators.html" if is_htmx(request) else "project/collaborators.html"
    return render(
        request,
        template,
        caller,
        collaborators=api.list_collaborators(access, db),
        roles=ROLE_NAMES,
        notice=notice,
        **project_context(access, "collaborators"),
    )


@router.get("/p/{owner}/{project}/collaborators")
def collaborators_page(request: Request, caller: UiCaller, access: ViewProject, db: Db) -> Response:
    return _collaborators(request, caller, access, db)


@router.post("/p/{owner}/{project}/collaborators")
def set_collaborator(
    request: Request,
    caller: UiCaller,
    access: AdminProject,
    db: Db,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[api.RoleName, Form()],
) -> Response:
    username = username.strip()
    existing = {c.username for c in api.list_collaborators(access, db)}
    with about_field("username"):
        api.set_collaborator(username, api.CollaboratorSet(role=role), access, request, db)
    done = "is now" if username in existing else "was added as"
    return _collaborators(request, caller, access, db, f"{username} {done} {role} of this project.")


@router.delete("/p/{owner}/{project}/collaborators/{username}")
def remove_collaborator(
    request: Request, username: str, caller: UiCaller, access: AdminProject, db: Db
) -> Response:
    api.remove_collaborator(username, access, request, db)
    return _collaborators(request, caller, access, db, f"{username} was removed.")


# ---- environment variables ----------------------------------------------------------------


def _env(request: Request, caller: UiCaller, access: ProjectAccess, db: Db) -> Response:
    template = "project/_env.html" if is_htmx(request) else "project/env.html"
    # The API's listing: secret values are already None here and never reach a template.
    variables = api.list_env(access, db)
    return render(request, template, caller, variables=variables, **project_context(access, "env"))


@router.get("/p/{owner}/{project}/env")
def env_page(request: Request, caller: UiCaller, access: ViewProject, db: Db) -> Response:
    return _env(request, caller, access, db)


@router.post("/p/{owner}/{project}/env")
def set_env(
    request: Request,
    caller: UiCaller,
    access: AdminProject,
    db: Db,
    name: Annotated[str, Form(max_length=128)],
    value: Annotated[str, Form()] = "",
    secret: Annotated[bool, Form()] = False,
) -> Response:
    api.set_env(name.strip(), api.EnvVarSet(value=value, secret=secret), access, request, db)
    return _env(request, caller, access, db)


@router.delete("/p/{owner}/{project}/env/{name}")
def delete_env(
    request: Request, name: str, caller: UiCaller, access: AdminProject, db: Db
) -> Response:
    api.delete_env(name, access, request, db)
    return _env(request, caller, access, db)


# ---- settings -----------------------------------------------------------------------------


@router.get("/p/{owner}/{project}/settings")
def settings_page(request: Request, caller: UiCaller, access: AdminProject) -> Response:
    return render(
        request,
        "project/settings.html",
        caller,
        visibilities=[v.value for v in Visibility],
        saved=False,
        **project_context(access, "settings"),
    )


@router.post("/p/{owner}/{project}/settings")
def save_settings(
    request: Request,
    caller: UiCaller,
    access: AdminProject,
    db: Db,
    name: Annotated[str, Form(max_length=100)],
    description: Annotated[str, Form(max_length=2000)] = "",
    visibility: Annotated[Visibility, Form()] = Visibility.private,
) -> Response:
    change = api.ProjectUpdate(name=name, description=description, visibility=visibility)
    api.update_project(change, access, request, db)
    return render(
        request,
        "project/_settings_form.html",
        caller,
        visibilities=[v.value for v in Visibility],
        saved=True,
        **project_context(access, "settings"),
    )


@router.post("/p/{owner}/{project}/delete")
def delete_project(
    request: Request,
    caller: UiCaller,
    access: AdminProject,
    ctx: Ctx,
    db: Db,
    confirm: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    full_name = f"{access.project.owner_name}/{access.project.slug}"
    if confirm.strip() != full_name:
        raise InvalidInput(f"type {full_name} to confirm that the project should be deleted")
    api.delete_project(access, request, ctx, db)
    return redirect(request, "/projects")


# Registered after every other UI router: any other address under /p/ is a page that does not
# exist (an HTML 404, not the API's JSON one), and anonymous visitors are asked to sign in.
fallback_router = APIRouter(route_class=UiRoute, include_in_schema=False)


@fallback_router.get("/p/{rest:path}")
def unknown_project_page(rest: str, caller: UiCaller) -> Response:
    raise NotFound(f"there is no page at /p/{rest[:200]}")
