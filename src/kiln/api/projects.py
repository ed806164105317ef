"""Projects, collaborators and project environment variables."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from kiln.api.deps import (
    AdminProject,
    Ctx,
    CurrentUser,
    Db,
    ProjectAccess,
    ViewProject,
    client_address,
)
from kiln.api.schemas import InputModel, PageOut
from kiln.db.models import Project, Role, Visibility
from kiln.domain import audit
from kiln.domain import projects as domain
from kiln.domain.authz import effective_roles
from kiln.domain.pagination import paginate

router = APIRouter(prefix="/projects", tags=["projects"])


class ProjectCreate(InputModel):
    name: str = Field(min_length=1, max_length=100, description="Display name; any text.")
    slug: str | None = Field(
        None, max_length=64, description="URL name; derived from the name when omitted."
    )
    owner: str | None = Field(None, max_length=64, description="A team you belong to, or you.")
    description: str = Field("", max_length=2000)
    visibility: Visibility = Visibility.private
    template: str | None = Field(None, max_length=64, description="A built-in template name.")


class ProjectUpdate(InputModel):
    name: str | None = Field(None, min_length=1, max_length=100)
    description: str | None = Field(None, max_length=2000)
    visibility: Visibility | None = None


class ProjectPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    owner: str
    slug: str
    name: str
    description: str
    visibility: Visibility
    owner_kind: str
    created_at: datetime
    updated_at: datetime
    role: str | None = Field(None, description="The caller's role on the project.")
    git_url: str | None = None


def project_public(
    project: Project, role: Role | None = None, base_url: str | None = None
) -> ProjectPublic:
    return ProjectPublic(
        owner=project.owner_name,
        slug=project.slug,
        name=project.name,
        description=project.description,
        visibility=project.visibility,
        owner_kind=project.owner_kind.value,
        created_at=project.created_at,
        updated_at=project.updated_at,
        role=role.name if role is not None else None,
        git_url=f"{base_url}git/{project.owner_name}/{project.slug}.git" if base_url else None,
    )


def create_project_with_files(
    ctx: Ctx,
    db: Db,
    user: CurrentUser,
    body: ProjectCreate,
    address: str,
    staged: Path | None = None,
) -> Project:
    """The shared path of every way to create a project: row, files, audit, commit.
    ``staged``: files prepared by ``ProjectStore.stage_archive`` (an upload)."""
    project = domain.new_project(
        db,
        user,
        body.name,
        slug=body.slug,
        owner=body.owner,
        description=body.description,
        visibility=body.visibility,
    )
    if staged is None:
        ctx.store.create(project.id, template=body.template)
    else:
        ctx.store.create_from_archive(project.id, staged)
    try:
        audit.record(
            db,
            "project.create" if staged is None else "project.upload",
            actor=user,
            target=f"project:{project.owner_name}/{project.slug}",
            address=address,
            template=body.template,
        )
        db.commit()
    except BaseException:
        ctx.store.delete(project.id)
        raise
    return project


@router.post("", status_code=201, response_model=ProjectPublic)
def create_project(
    body: ProjectCreate, request: Request, ctx: Ctx, db: Db, user: CurrentUser
) -> ProjectPublic:
    """Create a blank project, or one from a built-in template (``template``)."""
    project = create_project_with_files(ctx, db, user, body, client_address(request))
    return project_public(project, Role.admin, str(request.base_url))


@router.get("", response_model=PageOut[ProjectPublic])
def list_projects(
    request: Request,
    db: Db,
    user: CurrentUser,
    q: Annotated[str | None, Query(max_length=100, description="Search text")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageOut[ProjectPublic]:
    """Projects the caller may see, newest last; ``q`` searches names and owners. Each item
    has the same fields as the single GET (the caller's ``role``, ``git_url``)."""
    page = paginate(db, domain.visible_projects_query(user, q), Project.id, limit, cursor)
    roles = effective_roles(db, user, page.items)
    base = str(request.base_url)
    items = [project_public(p, roles.get(p.id), base) for p in page.items]
    return PageOut(items=items, next_cursor=page.next_cursor)


@router.get("/{owner}/{project}", response_model=ProjectPublic)
async def get_project(access: ViewProject, request: Request) -> ProjectPublic:
    return project_public(access.project, access.role, str(request.base_url))


@router.patch("/{owner}/{project}", response_model=ProjectPublic)
def update_project(
    body: ProjectUpdate, access: AdminProject, request: Request, db: Db
) -> ProjectPublic:
    domain.update_project(
        access.project,
        domain.ProjectUpdate(body.name, body.description, body.visibility),
    )
    commit_audited(db, access, request, "project.update", **body.model_dump(exclude_none=True))
    return project_public(access.project, access.role, str(request.base_url))


@router.delete("/{owner}/{project}", status_code=204)
def delete_project(access: AdminProject, request: Request, ctx: Ctx, db: Db) -> Response:
    project_id = access.project.id
    db.delete(access.project)
    commit_audited(db, access, request, "project.delete")
    ctx.store.delete(project_id)
    return Response(status_code=204)


def _target(access: ProjectAccess) -> str:
    return f"project:{access.project.owner_name}/{access.project.slug}"


def commit_audited(
    db: Db,
    access: ProjectAccess,
    request: Request,
    action: str,
    *,
    changes_project: bool = False,
    **details: Any,
) -> None:
    """Record ``action`` on the project in the audit log and commit it with the change;
    ``changes_project``: the project's content (files, jobs, environment) changed, so its
    "updated" time moves too."""
    if changes_project:
        domain.touch(access.project)
    audit.record(
        db,
        action,
        actor=access.user,
        target=_target(access),
        address=client_address(request),
        **details,
    )
    db.commit()


# ---- collaborators ------------------------------------------------------------------------

RoleName = Literal["viewer", "operator", "contributor", "admin"]


class CollaboratorPublic(BaseModel):
    username: str
    full_name: str = ""
    role: RoleName


class CollaboratorSet(InputModel):
    role: RoleName


@router.get("/{owner}/{project}/collaborators", response_model=list[CollaboratorPublic])
def list_collaborators(access: ViewProject, db: Db) -> list[CollaboratorPublic]:
    return [
        CollaboratorPublic(username=c.user.username, full_name=c.user.full_name, role=c.role.name)
        for c in domain.list_collaborators(db, access.project)
    ]


@router.put("/{owner}/{project}/collaborators/{username}", response_model=CollaboratorPublic)
def set_collaborator(
    username: str, body: CollaboratorSet, access: AdminProject, request: Request, db: Db
) -> CollaboratorPublic:
    """Add a collaborator or change their role."""
    row = domain.set_collaborator(db, access.project, username, Role[body.role])
    commit_audited(db, access, request, "collaborator.set", username=username, role=body.role)
    return CollaboratorPublic(username=username, full_name=row.user.full_name, role=body.role)


@router.delete("/{owner}/{project}/collaborators/{username}", status_code=204)
def remove_collaborator(username: str, access: AdminProject, request: Request, db: Db) -> Response:
    domain.remove_collaborator(db, access.project, username)
    commit_audited(db, access, request, "collaborator.remove", username=username)
    return Response(status_code=204)


# ---- environment variables ----------------------------------------------------------------


class EnvVarSet(InputModel):
    value: str = Field(max_length=domain.MAX_ENV_VALUE)
    secret: StrictBool = Field(False, description="Secret values are never returned once set.")


class EnvVarPublic(BaseModel):
    name: str
    value: str | None = Field(description="null for secrets")
    secret: bool


def _env_public(name: str, value: str, secret: bool) -> EnvVarPublic:
    return EnvVarPublic(name=name, value=None if secret else value, secret=secret)


@router.get("/{owner}/{project}/env", response_model=list[EnvVarPublic])
def list_env(access: ViewProject, db: Db) -> list[EnvVarPublic]:
    return [_env_public(v.name, v.value, v.secret) for v in domain.list_env(db, access.project)]


@router.put("/{owner}/{project}/env/{name}", response_model=EnvVarPublic)
def set_env(
    name: str, body: EnvVarSet, access: AdminProject, request: Request, db: Db
) -> EnvVarPublic:
    domain.set_env(db, access.project, name, body.value, body.secret)
    commit_audited(
        db, access, request, "env.set", changes_project=True, name=name, secret=body.secret
    )
    return _env_public(name, body.value, body.secret)


@router.delete("/{owner}/{project}/env/{name}", status_code=204)
def delete_env(name: str, access: AdminProject, request: Request, db: Db) -> Response:
    domain.delete_env(db, access.project, name)
    commit_audited(db, access, request, "env.delete", changes_project=True, name=name)
    return Response(status_code=204)
