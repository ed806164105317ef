"""State changes of workloads and job runs as compare-and-sets in the database.

Every change of ``state`` goes through ``kiln.scheduling.states``: ``UPDATE ... SET state =
target WHERE id = :id AND state IN (sources)``. Of two actors racing (a user's cancel and the
runner's "it ended"), one updates the row and the other gets the state machine's refusal
(a 409 with a clean message), never a silent overwrite.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from kiln.db.workload_models import JobRun, Workload
from kiln.scheduling.states import Event, WorkloadState, refusal, sources, target


def move(db: Session, row: JobRun | Workload, event: Event, what: str, **values: Any) -> None:
    """The compare-and-set of ``event`` on ``row`` (flushed, not committed); ``row`` is
    refreshed. Raises ``IllegalTransition`` when another actor moved it first."""
    model = type(row)
    result = db.execute(
        update(model)
        .where(model.id == row.id, model.state.in_(sources(event)))
        .values(state=target(event), **values)
        .execution_options(synchronize_session=False)
    )
    db.refresh(row)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise refusal(WorkloadState(row.state), event, what)


def finish(db: Session, row: JobRun | Workload, event: Event, what: str, **values: Any) -> None:
    """Record an ending. The endings of a deliberate stop (stopped, timed out) leave
    ``stopping``; one the runner's own deadline caused was never marked so: mark it first."""
    if event in (Event.STOPPED, Event.TIME_OUT) and row.state != WorkloadState.STOPPING:
        move(db, row, Event.STOP, what)
    move(db, row, event, what, **values)
