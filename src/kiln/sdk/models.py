"""Typed shapes of what the Kiln API returns.

They mirror ``kiln.api`` responses but ignore fields they do not know, so an older SDK keeps
working against a newer server.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class User(_Model):
    username: str
    full_name: str = ""
    email: str = ""
    is_site_admin: bool = False
    is_active: bool = True
    created_at: datetime | None = None


class Project(_Model):
    owner: str
    slug: str
    name: str
    description: str = ""
    visibility: str
    owner_kind: str = "user"
    created_at: datetime
    updated_at: datetime
    role: str | None = None
    git_url: str | None = None

    @property
    def full_name(self) -> str:
        """``owner/slug``, as the CLI and the URLs spell a project."""
        return f"{self.owner}/{self.slug}"


class ApiKey(_Model):
    id: int
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKey):
    key: str
    """The key itself: shown once, the server keeps only its hash."""


class FileEntry(_Model):
    name: str
    type: str
    """``"file"`` or ``"dir"`` (or ``"symlink"``)."""
    size: int | None = None
    modified: datetime | None = None

    @property
    def is_dir(self) -> bool:
        return self.type in ("dir", "directory")


class PathEntry(FileEntry):
    """A file or folder that mkdir or move made; ``path`` is project-relative."""

    path: str


class FileWritten(_Model):
    path: str
    size: int
    modified: datetime | None = None
