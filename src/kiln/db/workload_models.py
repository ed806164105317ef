"""ORM models of the application tier: runtimes, resource profiles, quotas, workloads
(sessions, job runs, workers, ...), jobs and their runs.

States are the strings of ``kiln.scheduling.states.State``; every change of ``state`` goes
through that state machine as a compare-and-set (``UPDATE ... WHERE state IN (...)``).
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
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, UTCDateTime, utcnow

AUTOINCREMENT = {"sqlite_autoincrement": True}


class Runtime(Base):
    """A runtime: the built-in one derived from the host's Python, or an unpacked OCI image."""

    __tablename__ = "runtimes"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    source: Mapped[str] = mapped_column(String(16))  # builtin|oci-archive|docker-archive|registry
    digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # A runtime from Kiln's registry: the repository and manifest digest it was unpacked from
    # (the registry's garbage collector keeps whatever a runtime points at).
    image_repository: Mapped[str | None] = mapped_column(String(255), nullable=True)
    image_digest: Mapped[str | None] = mapped_column(String(140), nullable=True)
    rootfs_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    editors: Mapped[list[str]] = mapped_column(JSON, default=list)  # "terminal", "jupyterlab"
    python_version: Mapped[str] = mapped_column(String(32), default="")
    env: Mapped[list[list[str]]] = mapped_column(JSON, default=list)  # the image's Env, in order
    description: Mapped[str] = mapped_column(String(500), default="")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ResourceProfile(Base):
    """What a workload may use, chosen from a list the site admin defines (vCPU in
    thousandths, so 0.5 vCPU is 500)."""

    __tablename__ = "resource_profiles"
    __table_args__ = (
        CheckConstraint("cpu_millis > 0 AND memory_bytes > 0 AND gpu >= 0", name="positive"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    cpu_millis: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    gpu: Mapped[int] = mapped_column(Integer, default=0)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Quota(Base):
    """A per-user or per-team ceiling on what running workloads use together. Users without a
    row get the site default (CML's: 2 vCPU, 8 GiB)."""

    __tablename__ = "quotas"
    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (team_id IS NULL)", name="one_subject"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, unique=True
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), nullable=True, unique=True
    )
    cpu_millis: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    gpu: Mapped[int] = mapped_column(Integer, default=0)


class Workload(Base):
    """One process tree the runner runs: a session, a job run's attempt, a worker, ...

    ``id`` is random and URL-safe: it names the session's own origin ``<id>.<domain>``.
    ``runtime_state`` is the runtime's opaque JSON for re-attaching after a runner restart.
    """

    __tablename__ = "workloads"
    __table_args__ = (
        Index("ix_workloads_state", "state"),
        Index("ix_workloads_project_id_kind", "project_id", "kind"),
        Index("ix_workloads_user_id_state", "user_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # session | job_run | worker | ...
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("workloads.id", ondelete="CASCADE"), nullable=True, index=True
    )
    runtime_id: Mapped[int | None] = mapped_column(
        ForeignKey("runtimes.id", ondelete="SET NULL"), nullable=True
    )
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("resource_profiles.id", ondelete="SET NULL"), nullable=True
    )
    cpu_millis: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    gpu: Mapped[int] = mapped_column(Integer, default=0)
    command: Mapped[list[str]] = mapped_column(JSON, default=list)
    editor: Mapped[str] = mapped_column(String(16), default="")  # sessions: terminal|jupyterlab
    state: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str] = mapped_column(String(500), default="")
    stop_cause: Mapped[str] = mapped_column(String(16), default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    endpoint: Mapped[str] = mapped_column(String(200), default="")
    # A session's web UI ports (CDSW_APP_PORT, CDSW_READONLY_PORT): port -> host:port.
    ports: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    runtime_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WorkloadEvent(Base):
    """The start timeline (queued → sandbox started → editor ready) and every later change,
    so a slow or failed start is never a mystery."""

    __tablename__ = "workload_events"
    __table_args__ = AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workload_id: Mapped[str] = mapped_column(
        ForeignKey("workloads.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(1000), default="")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_jobs_project_id_name"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    script: Mapped[str] = mapped_column(String(1024))
    arguments: Mapped[list[str]] = mapped_column(JSON, default=list)
    runtime_id: Mapped[int | None] = mapped_column(
        ForeignKey("runtimes.id", ondelete="SET NULL"), nullable=True
    )
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("resource_profiles.id", ondelete="SET NULL"), nullable=True
    )
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    schedule: Mapped[str | None] = mapped_column(String(200), nullable=True)  # 5-field cron
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    catch_up: Mapped[str] = mapped_column(String(8), default="once")  # once | all | skip
    # Slots before this moment are never due: set when a schedule is created or changed.
    schedule_anchor: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    timeout_minutes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    retry_backoff_seconds: Mapped[int] = mapped_column(Integer, default=30)
    max_concurrent_runs: Mapped[int] = mapped_column(Integer, default=1)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    notify_on: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The number of the job's newest run: runs are numbered #1, #2, ... per job (as CML and
    # Airflow do), each taken from this counter (``kiln.domain.jobs.next_run_number``).
    last_run_number: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class JobDependency(Base):
    """``child`` runs after ``parent`` succeeds. Cycles are refused by
    ``kiln.scheduling.jobgraph.check_new_edge`` before a row is written."""

    __tablename__ = "job_dependencies"

    child_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class JobRun(Base):
    """One run of a job. ``(job_id, scheduled_for)`` is unique, so each schedule slot runs
    exactly once whatever the runners do; manual and dependent runs have no slot (NULLs are
    distinct). Retries happen inside one run (``attempt``, ``not_before``).

    ``id`` is site-wide (it names the run in URLs); ``number`` counts the job's own runs from 1,
    which is what people call a run ("run #3 of train")."""

    __tablename__ = "job_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "scheduled_for", name="uq_job_runs_job_id_scheduled_for"),
        UniqueConstraint("job_id", "number", name="uq_job_runs_job_id_number"),
        Index("ix_job_runs_state", "state"),
        AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    workload_id: Mapped[str | None] = mapped_column(
        ForeignKey("workloads.id", ondelete="SET NULL"), nullable=True
    )
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    trigger: Mapped[str] = mapped_column(String(16))  # manual | schedule | dependency
    triggered_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    parent_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("job_runs.id", ondelete="SET NULL"), nullable=True
    )
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str] = mapped_column(Text, default="")
    stop_cause: Mapped[str] = mapped_column(String(16), default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SessionHandoff(Base):
    """A redeemed hand-off token (by its nonce) of the session proxy: the token that carries a
    signed-in user from the UI's origin to a session's own origin works once, even with
    several web workers. Rows are purged once the token would have expired anyway."""

    __tablename__ = "session_handoffs"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class WorkloadToken(Base):
    """The API token a workload holds (a session's ``KILN_WORKERS_TOKEN``): only its SHA-256
    is kept, like an API key's. It is good only while its workload is live and only for
    what ``scope`` names (``workers``: the Workers API of the workload's own project)."""

    __tablename__ = "workload_tokens"

    workload_id: Mapped[str] = mapped_column(
        ForeignKey("workloads.id", ondelete="CASCADE"), primary_key=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
