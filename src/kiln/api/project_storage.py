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
from kiln.domain.errors import Conflict
from kiln.domain.storage import has_live_workload, project_quota, project_usage
from kiln.storage.volumes import limit_bytes

router = APIRouter(prefix="/projects", tags=["projects"])

MIN_QUOTA_BYTES = 16 * 1024**2


class UsagePublic(BaseModel):
    used_bytes: int = Field(
        description="Everything that counts against the quota: files_bytes + images_bytes."
    )
    files_bytes: int = Field(
        description="What the project's files take on disk, .git included (allocated blocks)."
    )
    images_bytes: int = Field(description="The project's images in Kiln's registry.")
    quota_bytes: int = Field(
        description="The file API, git pushes and image pushes refuse writes past this."
    )
    limit_bytes: int | None = Field(
        description=(
            "The hard limit for what workloads write into the files: the quota plus a margin "
            "of max(256 MiB, 5 %); null where this server cannot enforce one (then workloads "
            "are not bounded)."
        )
    )
    enforced_for_workloads: bool


class QuotaUpdate(InputModel):
    quota_bytes: int | None = Field(
        ge=MIN_QUOTA_BYTES,
        le=2**50,
        description="Bytes; null returns the project to the site's default quota.",
    )


def _usage(ctx: Ctx, db: Db, access: ProjectAccess) -> UsagePublic:
    quota = project_quota(access.project, ctx.settings)
    usage = project_usage(db, ctx.store, access.project.id)
    return UsagePublic(
        used_bytes=usage.used_bytes,
        files_bytes=usage.files_bytes,
        images_bytes=usage.images_bytes,
        quota_bytes=quota,
        limit_bytes=None if usage.files_limit_bytes is None else limit_bytes(quota),
        enforced_for_workloads=usage.files_limit_bytes is not None,
    )


@router.get("/{owner}/{project}/usage", response_model=UsagePublic)
def get_usage(access: ViewProject, ctx: Ctx, db: Db) -> UsagePublic:
    """Disk usage of the project (its files' figure is read from their filesystem: O(1),
    never by a walk)."""
    return _usage(ctx, db, access)


@router.put("/{owner}/{project}/quota", response_model=UsagePublic)
def set_quota(
    body: QuotaUpdate, access: ViewProject, request: Request, ctx: Ctx, db: Db
) -> UsagePublic:
    """Site admins only. A higher quota applies at once; a lower one needs the project's
    sessions, jobs and other workloads stopped, and no more files than the new quota."""
    require_site_admin(access.user)
    quota = body.quota_bytes or ctx.settings.storage.project_quota_bytes
    usage = project_usage(db, ctx.store, access.project.id)
    if usage.used_bytes > quota:
        raise Conflict(
            f"the project holds {usage.files_bytes} bytes of files and {usage.images_bytes} "
            f"of images, more than the new quota of {quota}; delete files first"
        )
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
    return _usage(ctx, db, access)
