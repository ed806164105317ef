"""ORM models of models (CML's nouns): a model, its builds (immutable versions), its
deployments (a build with replicas, profile and environment), their replicas, and the model
API keys callers send.

A replica *is* a workload (``workloads`` row of kind ``replica``): state, reason, times,
resources and the deploying user live there, so replicas follow the one state machine and
count against quotas like sessions. Rules live in ``kiln.domain.models``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, UTCDateTime, utcnow

AUTOINCREMENT = {"sqlite_autoincrement": True}


class Model(Base):
    """A Python function of a project served as an endpoint.

    ``access_key_hash`` is the SHA-256 of the model's access key (CML's ``accessKey``): the
    key is shown once, when made or rotated, and names the model in a call. The deployment
    that receives calls is ``serving_deployment_id`` (no foreign key: a deployment row
    references its model, and a cycle of foreign keys would make deletes and SQLite's table
    rebuilds awkward; ``kiln.domain.models`` keeps it pointing at one of the model's own).
    """

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_models_project_id_name"),
        CheckConstraint("concurrency >= 1", name="concurrency_positive"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))  # URL-safe, unique in the project
    description: Mapped[str] = mapped_column(String(2000), default="")
    file: Mapped[str] = mapped_column(String(1024))  # relative to the project's root
    function: Mapped[str] = mapped_column(String(200))
    base_image: Mapped[str] = mapped_column(String(300), default="")  # "": the site's default
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("resource_profiles.id", ondelete="SET NULL"), nullable=True
    )
    serving_mode: Mapped[str] = mapped_column(String(16), default="threads")  # | processes
    concurrency: Mapped[int] = mapped_column(Integer, default=4)  # calls at once per replica
    access_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    access_key_prefix: Mapped[str] = mapped_column(String(16))
    allow_unauthenticated: Mapped[bool] = mapped_column(Boolean, default=False)
    # A sample request (any JSON value; NULL: none), CML's "Example Input": it fills the test
    # widget and the call snippets. none_as_null: Python None is SQL NULL, not JSON 'null'.
    example_input: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    serving_deployment_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ModelBuild(Base):
    """An immutable version of a model: the S2I build (``builds``) whose image serves it,
    numbered within the model, with the file and function it was built for."""

    __tablename__ = "model_builds"
    __table_args__ = (
        UniqueConstraint("model_id", "number", name="uq_model_builds_model_id_number"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    build_id: Mapped[str] = mapped_column(
        ForeignKey("builds.workload_id", ondelete="CASCADE"), index=True
    )
    file: Mapped[str] = mapped_column(String(1024))
    function: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str] = mapped_column(String(500), default="")
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelDeployment(Base):
    """A model build running with ``replicas`` replicas. States: ``deploying`` (replicas
    starting) → ``serving`` (the model's calls go here) → ``draining`` (replaced: calls in
    flight finish) → ``stopped``; or ``failed`` (with ``reason``). Rollback is a new
    deployment of an older build."""

    __tablename__ = "model_deployments"
    __table_args__ = (
        UniqueConstraint("model_id", "number", name="uq_model_deployments_model_id_number"),
        CheckConstraint("replicas >= 0", name="replicas_not_negative"),
        Index("ix_model_deployments_state", "state"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    model_build_id: Mapped[int] = mapped_column(
        ForeignKey("model_builds.id", ondelete="CASCADE"), index=True
    )
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("resource_profiles.id", ondelete="SET NULL"), nullable=True
    )
    cpu_millis: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    gpu: Mapped[int] = mapped_column(Integer, default=0)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="deploying")
    reason: Mapped[str] = mapped_column(String(1000), default="")
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    serving_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ModelReplica(Base):
    """One replica of a deployment: its workload, its slot (0 .. replicas-1; a replica that
    crashed is replaced by a new workload in the same slot) and whether it is ready."""

    __tablename__ = "model_replicas"

    workload_id: Mapped[str] = mapped_column(
        ForeignKey("workloads.id", ondelete="CASCADE"), primary_key=True
    )
    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("model_deployments.id", ondelete="CASCADE"), index=True
    )
    slot: Mapped[int] = mapped_column(Integer)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ModelApiKey(Base):
    """A key for *calling* models (``Authorization: Bearer kilnm_...``), per user, several
    per user, with an expiry; it opens no other door (and a regular API key does not call
    models). Only its SHA-256 is stored."""

    __tablename__ = "model_api_keys"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
