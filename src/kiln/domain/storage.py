"""Rules about project storage that need the database."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.models import Project
from kiln.db.workload_models import Workload, WorkloadEvent
from kiln.runner.states import LIVE_STATES
from kiln.settings import Settings
from kiln.storage.store import ProjectStore

LIVE = [s.value for s in LIVE_STATES]


def has_live_workload(db: Session, project_id: int) -> bool:
    """Whether anything of the project runs (or is about to): its filesystem is in use."""
    query = select(Workload.id).where(Workload.project_id == project_id, Workload.state.in_(LIVE))
    return db.scalar(query.limit(1)) is not None


def format_bytes(size: int) -> str:
    """``10 GiB``, ``300 MiB``, ``512 KiB``: binary units, one decimal where it matters."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return (
                f"{value:.0f} {unit}"
                if value >= 100 or value == int(value)
                else f"{value:.1f} {unit}"
            )
    return f"{size} bytes"


def project_quota(project: Project, settings: Settings) -> int:
    return project.quota_bytes or settings.storage.project_quota_bytes


def over_quota_note(db: Session, store: ProjectStore, settings: Settings, project_id: int) -> str:
    """A sentence for a run or session whose project is over its disk quota, else ""."""
    project = db.get(Project, project_id)
    if project is None:
        return ""
    quota = project_quota(project, settings)
    try:
        usage = store.usage(project_id)
    except OSError:
        return ""
    if usage.used_bytes < quota:
        return ""
    what = (
        "writes fail with 'No space left on device'"
        if usage.size_bytes
        else "files API refuses writes"
    )
    return (
        f"project over its {format_bytes(quota)} disk quota "
        f"(it uses {format_bytes(usage.used_bytes)}): {what} until files are deleted"
    )


def warn_live_workloads_over_quota(db: Session, store: ProjectStore, settings: Settings) -> int:
    """Tell each live workload's timeline, once, that its project is over its quota (a
    session's writes fail then, and its user should know why). Returns how many were told."""
    told = 0
    live = db.scalars(select(Workload).where(Workload.state.in_(LIVE))).all()
    notes: dict[int, str] = {}
    for workload in live:
        if workload.project_id not in notes:
            notes[workload.project_id] = over_quota_note(db, store, settings, workload.project_id)
        note = notes[workload.project_id]
        if not note:
            continue
        last = db.scalar(
            select(WorkloadEvent.message)
            .where(WorkloadEvent.workload_id == workload.id)
            .order_by(WorkloadEvent.id.desc())
            .limit(1)
        )
        if last is not None and last.startswith("project over its"):
            continue
        db.add(WorkloadEvent(workload_id=workload.id, state=workload.state, message=note[:1000]))
        told += 1
    if told:
        db.commit()
    return told
