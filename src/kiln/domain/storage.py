"""Rules about project storage that need the database."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.workload_models import Workload
from kiln.runner.states import LIVE_STATES

LIVE = [s.value for s in LIVE_STATES]


def has_live_workload(db: Session, project_id: int) -> bool:
    """Whether anything of the project runs (or is about to): its filesystem is in use."""
    query = select(Workload.id).where(Workload.project_id == project_id, Workload.state.in_(LIVE))
    return db.scalar(query.limit(1)) is not None
