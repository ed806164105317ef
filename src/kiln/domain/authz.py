"""Authorization: the one place that decides who may do what to a project.

A caller's *effective role* on a project is the highest of:
- admin, for a site admin or the owning user;
- admin for a maintainer, contributor for a member, of the owning team;
- the role of an explicit collaborator entry;
- viewer, for any signed-in user when the project is public, and for members of a team the
  owner belongs to (or of the owning team) when it is team-visible.

Every project operation names an ``Action``; ``ACTION_ROLES`` is the single role table. A caller
who cannot even view a project is told it does not exist (404), so private projects stay secret.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from sqlalchemy import ColumnElement, false, or_, select
from sqlalchemy.orm import Session

from kiln.db.models import (
    Collaborator,
    OwnerKind,
    Project,
    Role,
    Team,
    TeamMember,
    TeamRole,
    User,
    Visibility,
)
from kiln.domain.errors import Forbidden, NotFound
from kiln.domain.identity import team_role


class Action(enum.StrEnum):
    view = "view"  # read metadata, files, git clone/fetch, logs
    operate = "operate"  # start/stop existing jobs and workloads
    write = "write"  # write files, git push, create/edit jobs, run workloads
    admin = "admin"  # collaborators, settings, environment, delete


ACTION_ROLES: dict[Action, Role] = {
    Action.view: Role.viewer,
    Action.operate: Role.operator,
    Action.write: Role.contributor,
    Action.admin: Role.admin,
}

# Using a running session — its terminal, its editor's pages through the session proxy —
# runs code as the project, so it takes what starting one takes.
USE_SESSION = Action.write

# Calling a model's endpoint (with a model API key): any role on the model's project, as in
# CML, where callers must be collaborators of the project. Changing, building and deleting a
# model is ``write``; deploying an existing build, scaling and stopping is ``operate``.
CALL_MODEL = Action.view


def effective_role(db: Session, user: User | None, project: Project) -> Role | None:
    return effective_roles(db, user, [project]).get(project.id)


def effective_roles(db: Session, user: User | None, projects: Sequence[Project]) -> dict[int, Role]:
    """The caller's role on each of ``projects`` (by project id; absent: cannot view), in
    three queries whatever the number of projects: lists show the same role a single GET
    does, computed by the same rules."""
    if user is None or not user.is_active or not projects:
        return {}
    if user.is_site_admin:
        return {p.id: Role.admin for p in projects}
    ids = [p.id for p in projects]
    team_roles: dict[int, TeamRole] = {
        team: role
        for team, role in db.execute(
            select(TeamMember.team_id, TeamMember.role).where(
                TeamMember.user_id == user.id,
                TeamMember.team_id.in_([p.owner_team_id for p in projects if p.owner_team_id]),
            )
        )
    }
    collab_roles: dict[int, Role] = {
        project: role
        for project, role in db.execute(
            select(Collaborator.project_id, Collaborator.role).where(
                Collaborator.user_id == user.id, Collaborator.project_id.in_(ids)
            )
        )
    }
    team_owners = {p.owner_user_id for p in projects if p.visibility == Visibility.team}
    teammates: set[int] = set()
    if team_owners - {None}:
        my_teams = select(TeamMember.team_id).where(TeamMember.user_id == user.id)
        teammates = set(
            db.scalars(
                select(TeamMember.user_id).where(
                    TeamMember.team_id.in_(my_teams),
                    TeamMember.user_id.in_([o for o in team_owners if o is not None]),
                )
            )
        )
    found: dict[int, Role] = {}
    for project in projects:
        if project.owner_kind == OwnerKind.user and project.owner_user_id == user.id:
            found[project.id] = Role.admin
            continue
        roles: list[Role] = []
        team_role = team_roles.get(project.owner_team_id or 0)
        if team_role is not None:
            roles.append(Role.admin if team_role == TeamRole.maintainer else Role.contributor)
        if project.id in collab_roles:
            roles.append(collab_roles[project.id])
        shares_team = project.owner_user_id in teammates
        if project.visibility == Visibility.public or (
            project.visibility == Visibility.team and shares_team
        ):
            roles.append(Role.viewer)
        if roles:
            found[project.id] = max(roles)
    return found


def authorize(db: Session, user: User | None, project: Project, action: Action) -> Role:
    """Return the caller's role, or raise NotFound (cannot view) / Forbidden (role too low)."""
    role = effective_role(db, user, project)
    if role is None:
        raise NotFound(f"project {project.owner_name}/{project.slug} not found")
    needed = ACTION_ROLES[action]
    if role < needed:
        raise Forbidden(
            f"this needs the {needed.name} role on {project.owner_name}/{project.slug}; "
            f"you have {role.name}"
        )
    return role


def visible_projects_clause(user: User) -> ColumnElement[bool]:
    """SQL condition selecting the projects ``user`` may view (mirrors ``effective_role``)."""
    if not user.is_active:
        return false()
    if user.is_site_admin:
        return Project.id.is_not(None)
    my_teams = select(TeamMember.team_id).where(TeamMember.user_id == user.id)
    teammates = select(TeamMember.user_id).where(TeamMember.team_id.in_(my_teams))
    collab_projects = select(Collaborator.project_id).where(Collaborator.user_id == user.id)
    return or_(
        Project.owner_user_id == user.id,
        Project.visibility == Visibility.public,
        Project.owner_team_id.in_(my_teams),
        Project.id.in_(collab_projects),
        (Project.visibility == Visibility.team) & Project.owner_user_id.in_(teammates),
    )


# ---- teams --------------------------------------------------------------------------------
# A team, its members and their roles are seen by its members and by site admins; to anyone
# else it does not exist (404, like a private project). Changing members takes a maintainer.


def visible_teams_clause(user: User) -> ColumnElement[bool]:
    """SQL condition selecting the teams ``user`` may see."""
    if not user.is_active:
        return false()
    if user.is_site_admin:
        return Team.id.is_not(None)
    return Team.id.in_(select(TeamMember.team_id).where(TeamMember.user_id == user.id))


def can_see_team(db: Session, user: User, team: Team) -> bool:
    if not user.is_active:
        return False
    return user.is_site_admin or team_role(db, team, user) is not None


def authorize_team(db: Session, user: User, team: Team, *, manage: bool = False) -> None:
    """NotFound unless ``user`` may see the team; with ``manage``, Forbidden unless they are
    one of its maintainers (or a site admin)."""
    if not can_see_team(db, user, team):
        raise NotFound(f"team {team.name!r} not found")
    if manage and not is_team_maintainer(db, team, user):
        raise Forbidden(f"only maintainers of team {team.name} can change its members")


def is_team_maintainer(db: Session, team: Team, user: User) -> bool:
    return user.is_site_admin or team_role(db, team, user) == TeamRole.maintainer


def require_site_admin(user: User | None) -> User:
    if user is None or not user.is_site_admin:
        raise Forbidden("this needs a site administrator")
    return user
