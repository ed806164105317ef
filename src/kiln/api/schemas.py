"""Response and request shapes shared by several routers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")


class InputModel(BaseModel):
    """Base of request bodies. No text field may hold a NUL: nobody means one, and PostgreSQL
    cannot store it. (Use ``StrictBool`` for flags: lax parsing reads "no" as False.)"""

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value


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
