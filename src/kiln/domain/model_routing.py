"""What the model router reads from the database: where a model's calls may go.

A call goes only to replicas of the model's *serving* deployment that the runner found
ready (``model_replicas.ready``) and whose workload runs with an endpoint. The router caches
this for about a second (``kiln.serving.router``), so a switch of deployments, a replica that
became ready and one that stopped are seen within that time.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.model_models import Model, ModelReplica
from kiln.db.workload_models import Workload
from kiln.scheduling.states import WorkloadState


@dataclass(frozen=True)
class Route:
    """The ready replicas of a model's serving deployment, as (replica id, host:port), and
    how many calls each takes at once."""

    model_id: int
    capacity: int
    replicas: tuple[tuple[str, str], ...]


def route(db: Session, model_id: int) -> Route | None:
    """None when the model is gone (deleted); an empty route when nothing is ready."""
    model = db.get(Model, model_id)
    if model is None or model.deleted_at is not None:
        return None
    if model.serving_deployment_id is None:
        return Route(model.id, model.concurrency, ())
    rows = db.execute(
        select(Workload.id, Workload.endpoint)
        .join(ModelReplica, ModelReplica.workload_id == Workload.id)
        .where(
            ModelReplica.deployment_id == model.serving_deployment_id,
            ModelReplica.ready.is_(True),
            Workload.state == WorkloadState.RUNNING.value,
            Workload.endpoint != "",
        )
        .order_by(ModelReplica.slot)
    )
    return Route(model.id, model.concurrency, tuple((wid, endpoint) for wid, endpoint in rows))
