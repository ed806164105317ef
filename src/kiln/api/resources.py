"""Runtimes, resource profiles and quotas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from kiln.api.deps import Ctx, CurrentUser, Db, client_address
from kiln.api.schemas import InputModel, PageOut
from kiln.db.models import Team, User
from kiln.db.workload_models import ResourceProfile, Runtime
from kiln.domain import audit, identity, resources
from kiln.domain.authz import require_site_admin

router = APIRouter(tags=["runtimes and resources"])

Name = Annotated[str, Path(max_length=64)]
Limit = Annotated[int, Query(ge=1, le=200)]
Cursor = Annotated[str | None, Query(max_length=200)]


class RuntimeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    source: str
    digest: str | None
    editors: list[str]
    python_version: str
    description: str
    is_default: bool
    size_bytes: int
    created_at: datetime
    image_repository: str | None = Field(
        None, description="For a runtime from Kiln's registry: the repository it came from"
    )
    image_digest: str | None = Field(
        None, description="...and the digest of the image manifest that was unpacked"
    )


@router.get("/runtimes", response_model=list[RuntimeOut])
def list_runtimes(db: Db, user: CurrentUser) -> list[Runtime]:
    """The runtime catalog. The built-in runtime (the host's Python) is always there."""
    resources.ensure_builtin_runtime(db)
    db.commit()
    return resources.list_runtimes(db)


class RuntimeCreate(InputModel):
    image: str = Field(
        max_length=300,
        description="An image in Kiln's registry: runtimes/python:3.12 or runtimes/python@sha256:…",
    )
    name: str | None = Field(
        None, max_length=64, description="Catalog name (default: from the image, python-3.12)"
    )
    description: str = Field("", max_length=500)


@router.post("/runtimes", status_code=201, response_model=RuntimeOut)
def create_runtime(
    body: RuntimeCreate, request: Request, ctx: Ctx, db: Db, user: CurrentUser
) -> Runtime:
    """Add a runtime from an image pushed to Kiln's registry (site admins only): it is
    verified and unpacked into the runtime cache before this returns (a large image takes a
    while), then listed for everyone."""
    require_site_admin(user)
    row = resources.add_registry_runtime(db, ctx.settings, body.image, body.name, body.description)
    audit.record(
        db,
        "runtime.create",
        actor=user,
        target=f"runtime:{row.name}",
        address=client_address(request),
        image=body.image,
        digest=row.image_digest,
    )
    db.commit()
    return row


class RuntimeUpdate(InputModel):
    is_default: Literal[True] = Field(
        description="Make this the runtime new sessions get when they name none"
    )


@router.patch("/runtimes/{name}", response_model=RuntimeOut)
def update_runtime(
    name: Name, body: RuntimeUpdate, request: Request, db: Db, user: CurrentUser
) -> Runtime:
    """Pick the default runtime (site admins only). There is always exactly one default, so
    the way to change it is to make another runtime the default."""
    require_site_admin(user)
    resources.ensure_builtin_runtime(db)
    row = resources.set_default_runtime(db, name)
    audit.record(
        db, "runtime.default", actor=user, target=f"runtime:{name}", address=client_address(request)
    )
    db.commit()
    return row


class ProfileIn(InputModel):
    name: str = Field(max_length=64)
    cpu: float = Field(gt=0, le=resources.MAX_CPU_MILLIS / 1000, description="vCPU, e.g. 0.5")
    memory_mib: int = Field(ge=64, le=64 * 1024 * 1024, description="Memory in MiB")
    gpu: int = Field(0, ge=0, le=resources.MAX_GPU)
    is_default: StrictBool = False


class ProfileOut(BaseModel):
    name: str
    cpu: float
    memory_mib: int
    gpu: int
    is_default: bool


def _profile_out(p: ResourceProfile) -> ProfileOut:
    return ProfileOut(
        name=p.name,
        cpu=p.cpu_millis / 1000,
        memory_mib=p.memory_bytes // 1024**2,
        gpu=p.gpu,
        is_default=p.is_default,
    )


@router.get("/resource-profiles", response_model=list[ProfileOut])
def list_profiles(db: Db, user: CurrentUser) -> list[ProfileOut]:
    return [_profile_out(p) for p in resources.list_profiles(db)]


@router.get("/resource-profiles/{name}", response_model=ProfileOut)
def get_profile(name: Name, db: Db, user: CurrentUser) -> ProfileOut:
    return _profile_out(resources.get_profile(db, name))


@router.post("/resource-profiles", status_code=201, response_model=ProfileOut)
def create_profile(body: ProfileIn, request: Request, db: Db, user: CurrentUser) -> ProfileOut:
    """Define a profile users can pick for sessions and jobs (site admins only)."""
    require_site_admin(user)
    wanted = resources.Resources(round(body.cpu * 1000), body.memory_mib * 1024**2, body.gpu)
    row = resources.create_profile(db, body.name, wanted, body.is_default)
    audit.record(
        db,
        "profile.create",
        actor=user,
        target=f"profile:{body.name}",
        address=client_address(request),
        cpu=body.cpu,
        memory_mib=body.memory_mib,
        gpu=body.gpu,
    )
    db.commit()
    return _profile_out(row)


class ProfileUpdate(InputModel):
    """Only the fields given change. A size is given whole: cpu and memory_mib together."""

    cpu: float | None = Field(None, gt=0, le=resources.MAX_CPU_MILLIS / 1000)
    memory_mib: int | None = Field(None, ge=64, le=64 * 1024 * 1024)
    gpu: int | None = Field(None, ge=0, le=resources.MAX_GPU)
    is_default: StrictBool | None = None

    @model_validator(mode="after")
    def _something(self) -> ProfileUpdate:
        # An empty change would still be audited as one: refuse it instead.
        if all(v is None for v in (self.cpu, self.memory_mib, self.gpu, self.is_default)):
            raise ValueError("give at least one of cpu, memory_mib, gpu, is_default")
        return self


@router.patch("/resource-profiles/{name}", response_model=ProfileOut)
def update_profile(
    name: Name, body: ProfileUpdate, request: Request, db: Db, user: CurrentUser
) -> ProfileOut:
    """Resize a profile or make it the default (site admins only). Running workloads keep
    the size they started with."""
    require_site_admin(user)
    current = resources.get_profile(db, name)
    sized = body.cpu is not None or body.memory_mib is not None or body.gpu is not None
    wanted = None
    if sized:
        wanted = resources.Resources(
            current.cpu_millis if body.cpu is None else round(body.cpu * 1000),
            current.memory_bytes if body.memory_mib is None else body.memory_mib * 1024**2,
            current.gpu if body.gpu is None else body.gpu,
        )
    row = resources.update_profile(db, name, wanted, body.is_default)
    audit.record(
        db,
        "profile.update",
        actor=user,
        target=f"profile:{name}",
        address=client_address(request),
        **body.model_dump(exclude_none=True),
    )
    db.commit()
    return _profile_out(row)


@router.delete("/resource-profiles/{name}", status_code=204)
def delete_profile(name: Name, request: Request, db: Db, user: CurrentUser) -> Response:
    require_site_admin(user)
    resources.delete_profile(db, name)
    audit.record(
        db,
        "profile.delete",
        actor=user,
        target=f"profile:{name}",
        address=client_address(request),
    )
    db.commit()
    return Response(status_code=204)


class QuotaIn(InputModel):
    cpu: float = Field(gt=0, le=resources.MAX_CPU_MILLIS / 1000)
    memory_mib: int = Field(ge=64, le=64 * 1024 * 1024)
    gpu: int = Field(0, ge=0, le=resources.MAX_GPU)


class QuotaOut(BaseModel):
    cpu: float
    memory_mib: int
    gpu: int
    used_cpu: float | None = None
    used_memory_mib: int | None = None


def _quota_out(quota: resources.Resources, used: resources.Resources | None = None) -> QuotaOut:
    return QuotaOut(
        cpu=quota.cpu_millis / 1000,
        memory_mib=quota.memory_bytes // 1024**2,
        gpu=quota.gpu,
        used_cpu=None if used is None else used.cpu_millis / 1000,
        used_memory_mib=None if used is None else used.memory_bytes // 1024**2,
    )


class QuotaOverrideOut(BaseModel):
    kind: Literal["user", "team"]
    name: str
    cpu: float
    memory_mib: int
    gpu: int


@router.get("/quotas", response_model=PageOut[QuotaOverrideOut])
def list_quotas(db: Db, user: CurrentUser, limit: Limit = 50, cursor: Cursor = None) -> object:
    """The users and teams with a quota of their own (site admins only); everyone else has
    the site default."""
    require_site_admin(user)
    page = resources.list_quotas(db, limit, cursor)
    items = [
        QuotaOverrideOut(
            kind=o.kind, name=o.name, **_quota_out(o.resources).model_dump(exclude_none=True)
        )
        for o in page.items
    ]
    return PageOut[QuotaOverrideOut](items=items, next_cursor=page.next_cursor)


@router.get("/quotas/default", response_model=QuotaOut)
def get_default_quota(ctx: Ctx, user: CurrentUser) -> QuotaOut:
    """The quota of every user without one of their own (set in the server's settings)."""
    return _quota_out(resources.default_user_quota(ctx.settings))


def _user_for_quota(db: Db, caller: User, username: str) -> User:
    """A user may read their own quota; site admins anyone's."""
    if caller.username != username:
        require_site_admin(caller)
    return identity.get_user(db, username)


@router.get("/quotas/users/{username}", response_model=QuotaOut)
def get_user_quota(username: Name, ctx: Ctx, db: Db, user: CurrentUser) -> QuotaOut:
    """A user's quota (default: 4 vCPU, 8 GiB) and what their workloads use now."""
    target = _user_for_quota(db, user, username)
    quota = resources.user_quota(db, ctx.settings, target)
    return _quota_out(quota, resources.user_usage(db, target))


def _set_quota(
    db: Db, caller: User, request: Request, subject: User | Team, label: str, body: QuotaIn
) -> QuotaOut:
    require_site_admin(caller)
    wanted = resources.Resources(round(body.cpu * 1000), body.memory_mib * 1024**2, body.gpu)
    resources.set_quota(db, subject, wanted)
    audit.record(
        db,
        "quota.set",
        actor=caller,
        target=label,
        address=client_address(request),
        cpu=body.cpu,
        memory_mib=body.memory_mib,
        gpu=body.gpu,
    )
    db.commit()
    return _quota_out(wanted)


@router.put("/quotas/users/{username}", response_model=QuotaOut)
def set_user_quota(
    username: Name, body: QuotaIn, request: Request, db: Db, user: CurrentUser
) -> QuotaOut:
    require_site_admin(user)
    target = identity.get_user(db, username)
    return _set_quota(db, user, request, target, f"user:{username}", body)


@router.put("/quotas/teams/{name}", response_model=QuotaOut)
def set_team_quota(
    name: Name, body: QuotaIn, request: Request, db: Db, user: CurrentUser
) -> QuotaOut:
    require_site_admin(user)
    team = identity.get_team(db, name)
    return _set_quota(db, user, request, team, f"team:{name}", body)


def _remove_quota(
    db: Db, caller: User, request: Request, subject: User | Team, label: str
) -> Response:
    require_site_admin(caller)
    resources.remove_quota(db, subject)
    audit.record(db, "quota.remove", actor=caller, target=label, address=client_address(request))
    db.commit()
    return Response(status_code=204)


@router.delete("/quotas/users/{username}", status_code=204)
def remove_user_quota(username: Name, request: Request, db: Db, user: CurrentUser) -> Response:
    """The user goes back to the site default."""
    require_site_admin(user)
    target = identity.get_user(db, username)
    return _remove_quota(db, user, request, target, f"user:{username}")


@router.delete("/quotas/teams/{name}", status_code=204)
def remove_team_quota(name: Name, request: Request, db: Db, user: CurrentUser) -> Response:
    require_site_admin(user)
    team = identity.get_team(db, name)
    return _remove_quota(db, user, request, team, f"team:{name}")
