"""Runtimes, resource profiles and quotas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from kiln.api.deps import Ctx, CurrentUser, Db, client_address
from kiln.api.schemas import InputModel
from kiln.db.models import Team, User
from kiln.db.workload_models import ResourceProfile, Runtime
from kiln.domain import audit, identity, resources
from kiln.domain.authz import require_site_admin

router = APIRouter(tags=["runtimes and resources"])

Name = Annotated[str, Path(max_length=64)]


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


@router.get("/runtimes", response_model=list[RuntimeOut])
def list_runtimes(db: Db, user: CurrentUser) -> list[Runtime]:
    """The runtime catalog. The built-in runtime (the host's Python) is always there."""
    resources.ensure_builtin_runtime(db)
    db.commit()
    return resources.list_runtimes(db)


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


def _user_for_quota(db: Db, caller: User, username: str) -> User:
    """A user may read their own quota; site admins anyone's."""
    if caller.username != username:
        require_site_admin(caller)
    return identity.get_user(db, username)


@router.get("/quotas/users/{username}", response_model=QuotaOut)
def get_user_quota(username: Name, ctx: Ctx, db: Db, user: CurrentUser) -> QuotaOut:
    """A user's quota (CML's default: 2 vCPU, 8 GiB) and what their workloads use now."""
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
