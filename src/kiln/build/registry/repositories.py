"""Repositories in the database: which project a repository name belongs to, creating the row
on first push, and how much registry storage a project uses (for its quota)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import SQLCoreOperations

from kiln.build.registry.errors import NameUnknown
from kiln.build.registry.names import RepositoryName, oci_component
from kiln.db.models import Project
from kiln.db.registry_models import (
    RegistryBlob,
    RegistryBlobLink,
    RegistryManifest,
    RegistryRepository,
)


def find_repository(db: Session, name: str) -> RegistryRepository | None:
    return db.scalar(select(RegistryRepository).where(RegistryRepository.name == name))


def find_project(db: Session, owner: str, project: str) -> Project | None:
    """The project whose OCI form (``names.oci_component``) is ``owner/project``. A name
    that needs no mapping wins over one that maps to the same form."""
    exact = db.scalar(select(Project).where(Project.owner_name == owner, Project.slug == project))
    if exact is not None:
        return exact

    # Mapped names differ from their OCI form only in separator runs: compare with every
    # separator dropped in SQL, then exactly in Python.
    def bare(column: SQLCoreOperations[str]) -> ColumnElement[str]:
        return func.replace(func.replace(func.replace(column, "_", ""), ".", ""), "-", "")

    def bare_text(text: str) -> str:
        return text.replace("_", "").replace(".", "").replace("-", "")

    candidates = db.scalars(
        select(Project).where(
            bare(Project.owner_name) == bare_text(owner), bare(Project.slug) == bare_text(project)
        )
    )
    for row in candidates:
        if oci_component(row.owner_name) == owner and oci_component(row.slug) == project:
            return row
    return None


def ensure_repository(db: Session, name: RepositoryName) -> RegistryRepository:
    """The repository row, created on first push (a project's must name a project)."""
    row = find_repository(db, name.name)
    if row is not None:
        return row
    project_id = None
    if not name.is_runtime:
        assert name.owner is not None and name.project is not None
        project = find_project(db, name.owner, name.project)
        if project is None:
            raise NameUnknown(f"repository {name.name} is unknown")
        project_id = project.id
    row = RegistryRepository(name=name.name, project_id=project_id)
    try:
        with db.begin_nested():
            db.add(row)
    except IntegrityError:  # created meanwhile by a concurrent push
        existing = find_repository(db, name.name)
        assert existing is not None
        return existing
    return row


def registry_usage_bytes(db: Session, project_id: int) -> int:
    """Bytes of registry storage ``project_id`` uses: every blob visible in its repositories
    (once, however many of them hold it) and their manifests. A blob shared with another
    project counts for both: each could be the last to hold it."""
    repositories = select(RegistryRepository.id).where(RegistryRepository.project_id == project_id)
    blob_digests = select(RegistryBlobLink.digest).where(
        RegistryBlobLink.repository_id.in_(repositories)
    )
    blobs = db.scalar(
        select(func.coalesce(func.sum(RegistryBlob.size), 0)).where(
            RegistryBlob.digest.in_(blob_digests)
        )
    )
    manifests = db.scalar(
        select(func.coalesce(func.sum(RegistryManifest.size), 0)).where(
            RegistryManifest.repository_id.in_(repositories)
        )
    )
    return int(blobs or 0) + int(manifests or 0)
