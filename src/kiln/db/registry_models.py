"""ORM models of the OCI registry's metadata. The bytes live in the blob store
(``kiln.build.registry.storage``); these rows say which repository may see which blob,
which manifests and tags a repository holds, and what each manifest points at.

A blob is stored once whatever the number of repositories holding it (``registry_blobs``);
``registry_blob_links`` makes it visible in one repository (pushed, mounted or named by a
manifest there). Garbage collection removes links no manifest of their repository names
(after a grace period), then blobs no repository links.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, UTCDateTime, utcnow

DIGEST_LENGTH = 140  # "sha512:" + 128 hex


class RegistryRepository(Base):
    """``{owner}/{project}/{name}`` (``project_id`` set) or ``runtimes/{name}``."""

    __tablename__ = "registry_repositories"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegistryBlob(Base):
    """A verified blob in the store (its bytes are at the store's path for ``digest``)."""

    __tablename__ = "registry_blobs"

    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegistryBlobLink(Base):
    """``digest`` is visible in ``repository_id``. ``touched_at`` is when it was last pushed,
    mounted or named by a manifest push: the garbage collector's grace period counts from
    there, and a manifest push touches the links it needs so the collector cannot take them
    from under it."""

    __tablename__ = "registry_blob_links"
    __table_args__ = (Index("ix_registry_blob_links_digest", "digest"),)

    repository_id: Mapped[int] = mapped_column(
        ForeignKey("registry_repositories.id", ondelete="CASCADE"), primary_key=True
    )
    digest: Mapped[str] = mapped_column(
        ForeignKey("registry_blobs.digest", ondelete="CASCADE"), primary_key=True
    )
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegistryManifest(Base):
    """A manifest (image manifest or index) in one repository; its bytes are kept here, as
    pushed (they are small, and their digest covers these exact bytes)."""

    __tablename__ = "registry_manifests"
    __table_args__ = (
        UniqueConstraint("repository_id", "digest", name="uq_registry_manifests_repository_id"),
        Index("ix_registry_manifests_subject", "repository_id", "subject_digest"),
        Index("ix_registry_manifests_digest", "digest"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repository_id: Mapped[int] = mapped_column(
        ForeignKey("registry_repositories.id", ondelete="CASCADE")
    )
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    media_type: Mapped[str] = mapped_column(String(255))
    artifact_type: Mapped[str] = mapped_column(String(255), default="")
    subject_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH), nullable=True)
    annotations: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegistryManifestRef(Base):
    """What a manifest names: blobs (config, layers) or child manifests (an index's)."""

    __tablename__ = "registry_manifest_refs"
    __table_args__ = (Index("ix_registry_manifest_refs_digest", "digest"),)

    manifest_id: Mapped[int] = mapped_column(
        ForeignKey("registry_manifests.id", ondelete="CASCADE"), primary_key=True
    )
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "blob" | "manifest"


class RegistryTag(Base):
    __tablename__ = "registry_tags"
    __table_args__ = (Index("ix_registry_tags_manifest_id", "manifest_id"),)

    repository_id: Mapped[int] = mapped_column(
        ForeignKey("registry_repositories.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    manifest_id: Mapped[int] = mapped_column(
        ForeignKey("registry_manifests.id", ondelete="CASCADE")
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
