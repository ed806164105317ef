"""ORM models of applications (long-running web apps on their own subdomain) and of the
site's settings that admins change at run time.

An application is what a user configured and whether it should run (``desired``); each time
it runs, that is a ``Workload`` of kind ``application`` (an *instance*), which follows the one
workload state machine. ``workload_id`` is the instance that serves (or is on its way to);
``next_workload_id`` a replacement starting beside it (a restart or an update), which takes
over once it answers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base, UTCDateTime, utcnow


class Application(Base):
    __tablename__ = "applications"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_applications_project_id_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    # One DNS label under the content domain, unique on the whole site.
    subdomain: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(String(2000), default="")
    script: Mapped[str] = mapped_column(String(1024))
    runtime_id: Mapped[int | None] = mapped_column(
        ForeignKey("runtimes.id", ondelete="SET NULL"), nullable=True
    )
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("resource_profiles.id", ondelete="SET NULL"), nullable=True
    )
    cpu_millis: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # Reachable without signing in, while the site's setting allows public applications.
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    desired: Mapped[str] = mapped_column(String(16), default="running")  # running | stopped
    workload_id: Mapped[str | None] = mapped_column(
        ForeignKey("workloads.id", ondelete="SET NULL"), nullable=True
    )
    next_workload_id: Mapped[str | None] = mapped_column(
        ForeignKey("workloads.id", ondelete="SET NULL"), nullable=True
    )
    # Crashes in a row (reset once an instance stays up); the next start waits until
    # ``restart_at`` (exponential back-off).
    crashes: Mapped[int] = mapped_column(Integer, default=0)
    restart_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Why it is not serving, in words, and the last lines its last crashed instance printed.
    status_message: Mapped[str] = mapped_column(String(1000), default="")
    last_output: Mapped[str] = mapped_column(Text, default="")
    created_by_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class SiteSetting(Base):
    """A site-wide setting an admin changes while Kiln runs (``kiln.domain.site_settings``
    names them and their defaults)."""

    __tablename__ = "site_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
