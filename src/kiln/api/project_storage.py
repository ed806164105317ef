"""A project's disk usage and quota.

``GET .../usage``: what the project's tree takes and where its limits are (viewers and up).
``PUT .../quota``: a site admin sets the project's quota; its filesystem grows at once (or
shrinks, which needs the project's workloads stopped: ext4 shrinks offline).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from kiln.api.deps import Ctx, Db, ProjectAccess, ViewProject, client_address
from kiln.api.schemas import InputModel
from kiln.domain import audit
from kiln.domain.authz import require_site_admin
from kiln.domain.storage import has_live_workload
from kiln.storage.store import ProjectStore
from kiln.storage.volumes import margin_bytes

router = APIRouter(prefix="/projects", tags=["projects"])

MIN_QUOTA_BYTES = 16 * 1024**2


class UsagePublic(BaseModel):
    used_bytes: int = Field(
        description="What the project's files take on disk, .git included (allocated blocks)."
    )
    quota_bytes: int = Field(description="The file API and git pushes refuse writes past this.")
    limit_bytes: int | None = Field(
        description=(
            "The hard limit for workloads: the quota plus a margin of max(256 MiB, 5 %); "
            "null where this server cannot enforce one (then workloads are not bounded)."
        )
    )
    enforced_for_workloads: bool


class QuotaUpdate(InputModel):
    quota_bytes: int | None = Field(
        ge=MIN_QUOTA_BYTES,
        le=2**50,
        description="Bytes; null returns the project to the site's default quota.",
    )


def _usage(store: ProjectStore, access: ProjectAccess) -> UsagePublic:
    quota = access.project.quota_bytes or store.default_quota
    usage = store.usage(access.project.id)
    return UsagePublic(
        used_bytes=usage.used_bytes,
        quota_bytes=quota,
        limit_bytes=None if usage.size_bytes is None else quota + margin_bytes(quota),
        enforced_for_workloads=usage.size_bytes is not None,
    )


@router.get("/{owner}/{project}/usage", response_model=UsagePublic)
def get_usage(access: ViewProject, ctx: Ctx) -> UsagePublic:
    """Disk usage of the project (O(1): read from its filesystem, never by a walk)."""
    return _usage(ctx.store, access)


@router.put("/{owner}/{project}/quota", response_model=UsagePublic)
def set_quota(
    body: QuotaUpdate, access: ViewProject, request: Request, ctx: Ctx, db: Db
) -> UsagePublic:
    """Site admins only. A higher quota applies at once; a lower one needs the project's
    sessions, jobs and other workloads stopped, and no more files than the new quota."""
    require_site_admin(access.user)
    quota = body.quota_bytes or ctx.settings.storage.project_quota_bytes
    live = has_live_workload(db, access.project.id)
    ctx.store.resize(access.project.id, quota, offline_ok=not live)
    access.project.quota_bytes = body.quota_bytes
    audit.record(
        db,
        "project.quota",
        actor=access.user,
        target=f"project:{access.project.owner_name}/{access.project.slug}",
        address=client_address(request),
        quota_bytes=body.quota_bytes,
    )
    db.commit()
    return _usage(ctx.store, access)
