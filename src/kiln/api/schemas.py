"""Response and request shapes shared by several routers."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    username: str
    full_name: str
    email: str
    is_site_admin: bool
    is_active: bool
    created_at: datetime


class PageOut(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= to get the next page; null on the last page."
    )
