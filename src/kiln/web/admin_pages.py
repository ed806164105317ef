"""Administration pages: users, teams, the audit log, the site settings.

As elsewhere in the UI, each action calls the API handler (``kiln.api.admin``), which holds
the rule (site admin, team maintainer) and writes the audit record.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import APIRouter, Form, Query, Request, Response

from kiln.api import admin as api
from kiln.api import site_settings as site_settings_api
from kiln.api.deps import Ctx, Db
from kiln.api.schemas import PageOut, UserPublic
from kiln.db.models import TeamRole
from kiln.domain import identity
from kiln.domain.authz import is_team_maintainer, require_site_admin
from kiln.domain.errors import InvalidInput, about_field
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, render

router = APIRouter(prefix="/admin", route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50
Cursor = Annotated[str | None, Query(max_length=200)]

# What each button on a user's row changes.
USER_ACTIONS: dict[str, api.UserUpdate] = {
    "disable": api.UserUpdate(is_active=False),
    "enable": api.UserUpdate(is_active=True),
    "make-admin": api.UserUpdate(is_site_admin=True),
    "remove-admin": api.UserUpdate(is_site_admin=False),
}


# ---- users --------------------------------------------------------------------------------


@router.get("/users")
def users_page(request: Request, caller: UiCaller, db: Db, cursor: Cursor = None) -> Response:
    require_site_admin(caller.user)
    page = cast(PageOut[UserPublic], api.list_users(db, caller.user, PAGE_SIZE, cursor))
    template = "admin/_user_rows.html" if is_htmx(request) else "admin/users.html"
    return render(
        request, template, caller, users=page.items, next_cursor=page.next_cursor, created=None
    )


@router.post("/users")
def create_user(
    request: Request,
    caller: UiCaller,
    db: Db,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    full_name: Annotated[str, Form(max_length=200)] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    is_site_admin: Annotated[bool, Form()] = False,
) -> Response:
    body = api.UserCreate(
        username=username.strip(),
        password=password,
        full_name=full_name.strip(),
        email=email.strip(),
        is_site_admin=is_site_admin,
    )
    created = api.create_user(body, request, db, caller.user)
    # The user table listens for this event and reloads itself.
    headers = {"HX-Trigger": "users-changed"}
    return render(request, "admin/_user_created.html", caller, headers=headers, created=created)


@router.post("/users/{username}")
def change_user(
    request: Request,
    username: str,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    action: Annotated[str, Form(max_length=20)],
) -> Response:
    change = USER_ACTIONS.get(action)
    if change is None:
        raise InvalidInput(f"unknown action; use one of: {', '.join(USER_ACTIONS)}")
    target = api.update_user(username, change, request, db, caller.user, ctx)
    return render(request, "admin/_user_row.html", caller, u=target)


# ---- teams --------------------------------------------------------------------------------


def _team_card(
    request: Request, caller: UiCaller, db: Db, name: str, notice: str = "", **extra: Any
) -> Response:
    """One team's card, with ``notice`` confirming what was just done to it."""
    team = api.visible_team(db, name, caller.user)
    return render(
        request,
        "admin/_team.html",
        caller,
        team=api.get_team(name, db, caller.user),
        maintainer=is_team_maintainer(db, team, caller.user),
        team_roles=[r.value for r in TeamRole],
        notice=notice,
        **extra,
    )


@router.get("/teams")
def teams_page(request: Request, caller: UiCaller, db: Db, cursor: Cursor = None) -> Response:
    """The teams the user belongs to (site admins: all of them); anyone may create one."""
    page = cast(PageOut[api.TeamOut], api.list_teams(db, caller.user, PAGE_SIZE, cursor))
    maintained = {
        t.name
        for t in page.items
        if is_team_maintainer(db, identity.get_team(db, t.name), caller.user)
    }
    return render(
        request,
        "admin/teams.html",
        caller,
        teams=page.items,
        maintained=maintained,
        notice="",
        next_cursor=page.next_cursor,
        team_roles=[r.value for r in TeamRole],
    )


@router.post("/teams")
def create_team(
    request: Request,
    caller: UiCaller,
    db: Db,
    name: Annotated[str, Form(max_length=64)],
    description: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    body = api.TeamCreate(name=name.strip(), description=description.strip())
    team = api.create_team(body, request, db, caller.user)
    notice = f"Team {team.name} created; you are its maintainer. Add its members below."
    return _team_card(request, caller, db, team.name, notice, oob_delete_empty=True)


@router.post("/teams/{name}/members")
def set_member(
    request: Request,
    name: str,
    caller: UiCaller,
    db: Db,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[TeamRole, Form()] = TeamRole.member,
) -> Response:
    username = username.strip()
    with about_field("username"):
        api.set_member(name, username, api.MemberSet(role=role), request, db, caller.user)
    return _team_card(request, caller, db, name, f"{username} is now a {role.value} of {name}.")


@router.delete("/teams/{name}/members/{username}")
def remove_member(request: Request, name: str, username: str, caller: UiCaller, db: Db) -> Response:
    api.remove_member(name, username, request, db, caller.user)
    return _team_card(request, caller, db, name, f"{username} was removed from {name}.")


# ---- audit log ----------------------------------------------------------------------------


@router.get("/audit")
def audit_page(
    request: Request,
    caller: UiCaller,
    db: Db,
    cursor: Cursor = None,
    action: Annotated[str, Query(max_length=64)] = "",
    actor: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    page = cast(
        PageOut[api.AuditOut],
        api.list_audit(db, caller.user, PAGE_SIZE, cursor, action or None, actor or None),
    )
    return render(
        request,
        "admin/audit.html",
        caller,
        events=page.items,
        next_cursor=page.next_cursor,
        action=action,
        actor=actor,
        paged=cursor is not None,
    )


# ---- site settings --------------------------------------------------------------------------


@router.get("/settings")
def settings_page(request: Request, caller: UiCaller, db: Db) -> Response:
    require_site_admin(caller.user)
    current = site_settings_api.get_site_settings(caller.user, db)
    return render(request, "admin/settings.html", caller, settings=current, saved=False)


@router.post("/settings")
def save_settings(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    public_applications: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    body = site_settings_api.SiteSettingsUpdate(public_applications=public_applications == "true")
    current = site_settings_api.update_site_settings(body, request, ctx, db, caller.user)
    return render(request, "admin/_settings_form.html", caller, settings=current, saved=True)
