"""Projects, their collaborators and environment variables."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Select, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.db.models import (
    Collaborator,
    OwnerKind,
    Project,
    ProjectEnvVar,
    Role,
    Team,
    User,
    Visibility,
    utcnow,
)
from kiln.domain.authz import visible_projects_clause
from kiln.domain.errors import Conflict, Forbidden, InvalidInput, NotFound, about_field
from kiln.domain.identity import get_user, team_role
from kiln.domain.names import check_display_name, check_slug, slugify

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_VARS = 500


def resolve_owner(db: Session, caller: User, owner: str | None) -> tuple[OwnerKind, User | Team]:
    """Who will own a new project; a team needs the caller to be one of its members."""
    if owner is None or owner == caller.username:
        return OwnerKind.user, caller
    team = db.scalar(select(Team).where(Team.name == owner))
    if team is not None:
        if team_role(db, team, caller) is None and not caller.is_site_admin:
            raise Forbidden(f"you are not a member of team {owner!r}")
        return OwnerKind.team, team
    if caller.is_site_admin:
        return OwnerKind.user, get_user(db, owner)
    raise Forbidden(f"you cannot create projects for {owner!r}")


def new_project(
    db: Session,
    caller: User,
    name: str,
    *,
    slug: str | None = None,
    owner: str | None = None,
    description: str = "",
    visibility: Visibility = Visibility.private,
) -> Project:
    """Insert the project row (flushed, so it has an id). Files are the caller's next step."""
    with about_field("name"):
        name = check_display_name(name, "project name")
    # A slug derived from the name is the name's problem; one typed in is its own.
    slug_field = "slug" if slug is not None else "name"
    with about_field(slug_field):
        slug = check_slug(slug if slug is not None else slugify(name), "project slug")
    if len(description) > 2000:
        raise InvalidInput("description is longer than 2000 characters", "description")
    with about_field("owner"):
        kind, who = resolve_owner(db, caller, owner)
    owner_name = who.username if isinstance(who, User) else who.name
    if find_project(db, owner_name, slug) is not None:
        raise Conflict(f"project {owner_name}/{slug} already exists", slug_field)
    project = Project(
        owner_name=owner_name,
        owner_kind=kind,
        owner_user_id=who.id if kind == OwnerKind.user else None,
        owner_team_id=who.id if kind == OwnerKind.team else None,
        name=name,
        slug=slug,
        description=description,
        visibility=visibility,
        created_by_id=caller.id,
    )
    db.add(project)
    try:
        db.flush()
    except IntegrityError as exc:
        raise Conflict(f"project {owner_name}/{slug} already exists", slug_field) from exc
    return project


def find_project(db: Session, owner: str, slug: str) -> Project | None:
    return db.scalar(select(Project).where(Project.owner_name == owner, Project.slug == slug))


def get_project(db: Session, owner: str, slug: str) -> Project:
    project = find_project(db, owner, slug)
    if project is None:
        raise NotFound(f"project {owner}/{slug} not found")
    return project


def visible_projects_query(user: User, search: str | None = None) -> Select[Project]:
    query = select(Project).where(visible_projects_clause(user))
    if search:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(
            Project.name.ilike(pattern, escape="\\")
            | Project.slug.ilike(pattern, escape="\\")
            | Project.owner_name.ilike(pattern, escape="\\")
        )
    return query


@dataclass
class ProjectUpdate:
    name: str | None = None
    description: str | None = None
    visibility: Visibility | None = None


def update_project(project: Project, change: ProjectUpdate) -> Project:
    if change.name is not None:
        with about_field("name"):
            project.name = check_display_name(change.name, "project name")
    if change.description is not None:
        if len(change.description) > 2000:
            raise InvalidInput("description is longer than 2000 characters", "description")
        project.description = change.description
    if change.visibility is not None:
        project.visibility = change.visibility
    return project


# ---- collaborators ------------------------------------------------------------------------


def list_collaborators(db: Session, project: Project) -> list[Collaborator]:
    return list(
        db.scalars(
            select(Collaborator)
            .where(Collaborator.project_id == project.id)
            .order_by(Collaborator.added_at, Collaborator.user_id)
        )
    )


def set_collaborator(db: Session, project: Project, username: str, role: Role) -> Collaborator:
    user = get_user(db, username)
    if project.owner_user_id == user.id:
        raise InvalidInput(f"{username} owns this project and is always its admin", "username")
    row = db.get(Collaborator, (project.id, user.id))
    if row is None:
        row = Collaborator(project_id=project.id, user_id=user.id, role=role)
        db.add(row)
    else:
        row.role = role
    db.flush()
    return row


def remove_collaborator(db: Session, project: Project, username: str) -> None:
    user = get_user(db, username)
    row = db.get(Collaborator, (project.id, user.id))
    if row is None:
        raise NotFound(f"{username} is not a collaborator on {project.owner_name}/{project.slug}")
    db.delete(row)


# ---- environment variables ----------------------------------------------------------------


def list_env(db: Session, project: Project) -> list[ProjectEnvVar]:
    return list(
        db.scalars(
            select(ProjectEnvVar)
            .where(ProjectEnvVar.project_id == project.id)
            .order_by(ProjectEnvVar.name)
        )
    )


def set_env(db: Session, project: Project, name: str, value: str, secret: bool) -> ProjectEnvVar:
    if not ENV_NAME.match(name):
        raise InvalidInput(
            f"environment variable name {name[:80]!r} is not valid: letters, digits and '_', "
            "not starting with a digit, at most 128 characters",
            "name",
        )
    if len(value) > MAX_ENV_VALUE:
        raise InvalidInput(f"value of {name} is longer than {MAX_ENV_VALUE} characters", "value")
    if "\x00" in value:
        raise InvalidInput(f"value of {name} contains a NUL character", "value")
    row = db.get(ProjectEnvVar, (project.id, name))
    if row is None:
        if len(list_env(db, project)) >= MAX_ENV_VARS:
            raise InvalidInput(f"a project can have at most {MAX_ENV_VARS} variables", "name")
        row = ProjectEnvVar(project_id=project.id, name=name, value=value, secret=secret)
        db.add(row)
    else:
        row.value, row.secret = value, secret
    db.flush()
    return row


def delete_env(db: Session, project: Project, name: str) -> None:
    result = db.execute(
        delete(ProjectEnvVar).where(
            ProjectEnvVar.project_id == project.id, ProjectEnvVar.name == name
        )
    )
    if getattr(result, "rowcount", 0) == 0:
        raise NotFound(f"environment variable {name[:80]!r} not found")


def touch(project: Project) -> None:
    """Mark the project as changed now (its files, jobs or environment): ``updated_at`` is
    what the project list and the overview show as "Updated"."""
    project.updated_at = utcnow()
