"""Users, teams and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy import select

from kiln.api.deps import (
    SESSION_COOKIE,
    Ctx,
    CurrentUser,
    Db,
    check_password_login,
    client_address,
)
from kiln.api.schemas import InputModel, PageOut, UserPublic
from kiln.db.models import AuditEvent, Team, TeamMember, TeamRole, User
from kiln.domain import audit, identity
from kiln.domain.authz import authorize_team, require_site_admin, visible_teams_clause
from kiln.domain.errors import Forbidden, NotAuthenticated, NotFound
from kiln.domain.pagination import paginate

router = APIRouter(tags=["users and teams"])

Limit = Annotated[int, Query(ge=1, le=200)]
Cursor = Annotated[str | None, Query(max_length=200)]


class UserCreate(InputModel):
    username: str = Field(max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    full_name: str = Field("", max_length=200)
    email: str = Field("", max_length=254)
    is_site_admin: StrictBool = False


class UserUpdate(InputModel):
    full_name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=254)
    password: str | None = Field(None, min_length=8, max_length=1024)
    current_password: str | None = Field(
        None, max_length=1024, description="Required to change your own password."
    )
    is_site_admin: StrictBool | None = None
    is_active: StrictBool | None = None


@router.post("/users", status_code=201, response_model=UserPublic)
def create_user(body: UserCreate, request: Request, db: Db, user: CurrentUser) -> User:
    require_site_admin(user)
    new = identity.create_user(
        db,
        body.username,
        body.password,
        full_name=body.full_name,
        email=body.email,
        site_admin=body.is_site_admin,
    )
    audit.record(
        db,
        "user.create",
        actor=user,
        target=f"user:{new.username}",
        address=client_address(request),
        site_admin=body.is_site_admin,
    )
    db.commit()
    return new


@router.get("/users", response_model=PageOut[UserPublic])
def list_users(db: Db, user: CurrentUser, limit: Limit = 50, cursor: Cursor = None) -> object:
    """Every signed-in user may list users (to add collaborators)."""
    page = paginate(db, select(User), User.id, limit, cursor)
    return PageOut[UserPublic](
        items=[user_public(u, user) for u in page.items], next_cursor=page.next_cursor
    )


def user_public(shown: User, viewer: User) -> UserPublic:
    """Email addresses are for their owner and site admins only."""
    out = UserPublic.model_validate(shown)
    if shown.id != viewer.id and not viewer.is_site_admin:
        out.email = ""
    return out


@router.get("/users/{username}", response_model=UserPublic)
def get_user(username: str, db: Db, user: CurrentUser) -> UserPublic:
    return user_public(identity.get_user(db, username), user)


@router.patch("/users/{username}", response_model=UserPublic)
def update_user(
    username: str, body: UserUpdate, request: Request, db: Db, user: CurrentUser, ctx: Ctx
) -> User:
    """Site admins change anyone; users change their own name, email and password (with
    their current password, checked and throttled like a login)."""
    target = identity.get_user(db, username)
    if body.password is not None and target.id == user.id:
        try:
            check_password_login(ctx, db, request, user.username, body.current_password or "")
        except NotAuthenticated as exc:
            raise Forbidden("the current password is missing or wrong", "current_password") from exc
    if not user.is_site_admin:
        if target.id != user.id:
            raise Forbidden("you can only change your own account")
        if body.is_site_admin is not None or body.is_active is not None:
            raise Forbidden("only a site administrator can change roles or disable accounts")
    if target.id == user.id and body.is_active is False:
        raise Forbidden("you cannot disable your own account")
    if target.is_site_admin and False in (body.is_site_admin, body.is_active):
        others = select(User.id).where(User.is_site_admin, User.is_active, User.id != target.id)
        if db.scalar(others.limit(1)) is None:
            raise Forbidden(f"{username} is the last site administrator; appoint another first")
    if body.full_name is not None:
        target.full_name = body.full_name
    if body.email is not None:
        target.email = body.email
    if body.password is not None:
        identity.set_password(target, body.password)
        own_browser = request.cookies.get(SESSION_COOKIE) if target.id == user.id else None
        identity.end_other_web_sessions(db, target, keep_token=own_browser)
    if body.is_site_admin is not None:
        target.is_site_admin = body.is_site_admin
    if body.is_active is not None:
        target.is_active = body.is_active
    changed = sorted(
        k for k in body.model_dump(exclude_none=True) if k not in ("password", "current_password")
    )
    audit.record(
        db,
        "user.update",
        actor=user,
        target=f"user:{username}",
        address=client_address(request),
        fields=changed,
        password_changed=body.password is not None,
    )
    db.commit()
    return target


# ---- teams --------------------------------------------------------------------------------


class TeamCreate(InputModel):
    name: str = Field(max_length=64)
    description: str = Field("", max_length=500)


class TeamMemberOut(BaseModel):
    username: str
    full_name: str = ""
    role: TeamRole


class TeamOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    description: str
    created_at: datetime
    members: list[TeamMemberOut]


class MemberSet(InputModel):
    role: TeamRole = TeamRole.member


def _team_out(team: Team) -> TeamOut:
    return TeamOut(
        name=team.name,
        description=team.description,
        created_at=team.created_at,
        members=[
            TeamMemberOut(username=m.user.username, full_name=m.user.full_name, role=m.role)
            for m in team.members
        ],
    )


@router.post("/teams", status_code=201, response_model=TeamOut)
def create_team(body: TeamCreate, request: Request, db: Db, user: CurrentUser) -> TeamOut:
    team = identity.create_team(db, body.name, user, body.description)
    audit.record(
        db, "team.create", actor=user, target=f"team:{team.name}", address=client_address(request)
    )
    db.commit()
    return _team_out(team)


@router.get("/teams", response_model=PageOut[TeamOut])
def list_teams(db: Db, user: CurrentUser, limit: Limit = 50, cursor: Cursor = None) -> object:
    """The teams you belong to (site admins: every team)."""
    query = select(Team).where(visible_teams_clause(user))
    page = paginate(db, query, Team.id, limit, cursor)
    return PageOut[TeamOut](items=[_team_out(t) for t in page.items], next_cursor=page.next_cursor)


def visible_team(db: Db, name: str, user: CurrentUser, *, manage: bool = False) -> Team:
    """The team by name if ``user`` may see it (and, with ``manage``, change it)."""
    team = identity.get_team(db, name)
    authorize_team(db, user, team, manage=manage)
    return team


@router.get("/teams/{name}", response_model=TeamOut)
def get_team(name: str, db: Db, user: CurrentUser) -> TeamOut:
    """A team you belong to, with its members (site admins: any team)."""
    return _team_out(visible_team(db, name, user))


@router.put("/teams/{name}/members/{username}", response_model=TeamOut)
def set_member(
    name: str, username: str, body: MemberSet, request: Request, db: Db, user: CurrentUser
) -> TeamOut:
    team = visible_team(db, name, user, manage=True)
    member = identity.get_user(db, username)
    row = db.get(TeamMember, (team.id, member.id))
    if row is None:
        team.members.append(TeamMember(user_id=member.id, role=body.role))
    else:
        row.role = body.role
    audit.record(
        db,
        "team.member.set",
        actor=user,
        target=f"team:{name}",
        address=client_address(request),
        username=username,
        role=body.role.value,
    )
    db.commit()
    db.refresh(team)
    return _team_out(team)


@router.delete("/teams/{name}/members/{username}", status_code=204)
def remove_member(
    name: str, username: str, request: Request, db: Db, user: CurrentUser
) -> Response:
    team = visible_team(db, name, user, manage=True)
    member = identity.get_user(db, username)
    row = db.get(TeamMember, (team.id, member.id))
    if row is None:
        raise NotFound(f"{username} is not a member of team {name}")
    db.delete(row)
    audit.record(
        db,
        "team.member.remove",
        actor=user,
        target=f"team:{name}",
        address=client_address(request),
        username=username,
    )
    db.commit()
    return Response(status_code=204)


# ---- audit log ----------------------------------------------------------------------------


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor_name: str
    action: str
    target: str
    address: str
    outcome: str
    details: dict[str, Any]


@router.get("/audit", response_model=PageOut[AuditOut], tags=["audit"])
def list_audit(
    db: Db,
    user: CurrentUser,
    limit: Limit = 50,
    cursor: Cursor = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
) -> object:
    """The audit log, newest first (site admins only)."""
    require_site_admin(user)
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if actor:
        query = query.where(AuditEvent.actor_name == actor)
    page = paginate(db, query, AuditEvent.id, limit, cursor, descending=True)
    return PageOut[AuditOut](
        items=[AuditOut.model_validate(e) for e in page.items], next_cursor=page.next_cursor
    )
