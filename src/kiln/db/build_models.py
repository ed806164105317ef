"""ORM models of source-to-image builds.

A build *is* a workload (``workloads`` row of kind ``build``): its state, reason, times,
resources and the user who started it live there, so builds follow the one state machine
and count against quotas like sessions and job runs. This table holds what only a build
has: its number in the project, what it was asked to build, its claim by a builder, its
steps, and what it produced.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, UTCDateTime, utcnow


class Build(Base):
    __tablename__ = "builds"
    __table_args__ = (
        UniqueConstraint("project_id", "number", name="uq_builds_project_id_number"),
        Index("ix_builds_claimed_by", "claimed_by"),
    )

    workload_id: Mapped[str] = mapped_column(
        ForeignKey("workloads.id", ondelete="CASCADE"), primary_key=True
    )
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the project
    source_commit: Mapped[str] = mapped_column(String(200), default="")  # "" = working tree
    base_image: Mapped[str] = mapped_column(String(300))
    no_cache: Mapped[bool] = mapped_column(Boolean, default=False)
    command: Mapped[list[str]] = mapped_column(JSON, default=list)
    # A model's build: the image also gets the model server's layer (kiln.build.serving_layer).
    serving: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    claimed_by: Mapped[str] = mapped_column(String(200), default="")
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # [{"name", "status", "detail", "started_at", "ended_at"}] in step order.
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    commit: Mapped[str] = mapped_column(String(64), default="")  # the snapshot's
    base_digest: Mapped[str] = mapped_column(String(80), default="")
    dependency_key: Mapped[str] = mapped_column(String(80), default="")
    dependencies_cached: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    layers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    repository: Mapped[str] = mapped_column(String(300), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    image_digest: Mapped[str] = mapped_column(String(80), default="")  # the manifest's
    config_digest: Mapped[str] = mapped_column(String(80), default="")


class BuildCacheEntry(Base):
    """A dependency layer by its cache key, per project: where the blob is in the registry.
    A build whose key is here (and whose blob is still there) skips the install."""

    __tablename__ = "build_cache"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    layer: Mapped[dict[str, Any]] = mapped_column(JSON)  # kiln.build.layers.Layer.to_json()
    repository: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
