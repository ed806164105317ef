"""Site settings that site admins change while Kiln runs (``kiln.domain.site_settings``):
every signed-in user may read them (they shape what users can do), only admins change them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool

from kiln.api.deps import Ctx, CurrentUser, Db, client_address
from kiln.api.schemas import InputModel
from kiln.domain import audit, site_settings
from kiln.domain.authz import require_site_admin

router = APIRouter(tags=["site settings"])


class SiteSettingsOut(BaseModel):
    public_applications: bool = Field(
        description=site_settings.DEFINITIONS[site_settings.PUBLIC_APPLICATIONS].description
    )


class SiteSettingsUpdate(InputModel):
    public_applications: StrictBool | None = None


@router.get("/site-settings", response_model=SiteSettingsOut)
def get_site_settings(user: CurrentUser, db: Db) -> dict[str, Any]:
    return site_settings.get_all(db)


@router.patch("/site-settings", response_model=SiteSettingsOut)
def update_site_settings(
    body: SiteSettingsUpdate, request: Request, ctx: Ctx, db: Db, user: CurrentUser
) -> dict[str, Any]:
    """Change settings (site admins). Turning public applications off takes every public
    application off the public web within seconds."""
    require_site_admin(user)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    result = site_settings.update(db, changes)
    audit.record(
        db,
        "site.settings",
        actor=user,
        target="site",
        address=client_address(request),
        **changes,
    )
    db.commit()
    return result
