"""A model's replicas (``kiln.domain.model_replicas``): which run, whether they are ready,
how often their slot restarted and why the last one ended, and each replica's console log.
Viewers and up read them; the runner's model keeper starts and stops them (deployments say
how many)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kiln.api.deps import Ctx, Db, ViewProject
from kiln.api.logs import empty_log, stream_log
from kiln.api.model_deploys import DEPLOYMENTS
from kiln.api.model_deploys import Number as DeploymentNumber
from kiln.api.models import MODEL, Name
from kiln.domain import model_replicas as domain
from kiln.domain.model_deploys import build_numbers, get_deployment
from kiln.domain.models import get_model
from kiln.runner.client import runner_client

router = APIRouter(tags=["models"])

REPLICAS = MODEL + "/replicas"
ReplicaId = Annotated[str, Path(max_length=64, description="The replica's id (see the list).")]


class ReplicaPublic(BaseModel):
    id: str
    deployment: int = Field(description="The number of the deployment it belongs to.")
    build: int = Field(description="The model build it runs.")
    slot: int = Field(description="Its place in the deployment, 0 .. replicas-1.")
    state: str = Field(description="queued, waiting, starting, running, stopping, or how it ended.")
    reason: str
    ready: bool = Field(description="Answers calls now (its /_kiln/ready said 200).")
    ready_since: dt.datetime | None = Field(description="Since when it is ready; null: not ready.")
    restarts: int = Field(description="How often its slot was restarted after a crash.")
    exit_code: int | None
    last_exit_reason: str | None = Field(
        description="Why the slot's replica last ended (this one, or the one it replaced)."
    )
    last_exit_at: dt.datetime | None
    previous: str | None = Field(
        description="The replica this one replaced in its slot (its log says why it ended)."
    )
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None


def _publish(db: Db, views: list[domain.SlotView]) -> list[ReplicaPublic]:
    builds = build_numbers(db, list({v.deployment.id: v.deployment for v in views}.values()))
    published = []
    for view in views:
        workload, last = view.workload, view.last_exit
        published.append(
            ReplicaPublic(
                id=workload.id,
                deployment=view.deployment.number,
                build=builds[view.deployment.model_build_id],
                slot=view.replica.slot,
                state=workload.state,
                reason=workload.reason,
                ready=view.replica.ready,
                ready_since=view.ready_since,
                restarts=view.replica.restarts,
                exit_code=workload.exit_code,
                last_exit_reason=(last.reason or last.state) if last is not None else None,
                last_exit_at=last.ended_at if last is not None else None,
                previous=view.previous.id if view.previous is not None else None,
                created_at=workload.created_at,
                started_at=workload.started_at,
                ended_at=workload.ended_at,
            )
        )
    return published


@router.get(REPLICAS, response_model=list[ReplicaPublic])
def list_model_replicas(name: Name, access: ViewProject, db: Db) -> list[ReplicaPublic]:
    """The model's replicas now: one per slot of each deployment that is deploying, serving
    or draining (newest deployment first). A crashed replica stays listed, ended, until the
    new one of its slot starts."""
    model = get_model(db, access.project, name)
    return _publish(db, domain.model_slot_views(db, model))


@router.get(DEPLOYMENTS + "/{number}/replicas", response_model=list[ReplicaPublic])
def list_deployment_replicas(
    name: Name, number: DeploymentNumber, access: ViewProject, db: Db
) -> list[ReplicaPublic]:
    """One deployment's replicas, one per slot: the newest of each (for an ended deployment,
    the last ones it had: a failed deployment's say why)."""
    model = get_model(db, access.project, name)
    deployment = get_deployment(db, model, number)
    return _publish(db, domain.slot_views(db, [deployment]))


@router.get(REPLICAS + "/{replica_id}", response_model=ReplicaPublic)
def get_replica(name: Name, replica_id: ReplicaId, access: ViewProject, db: Db) -> ReplicaPublic:
    """One replica, an earlier one of a slot too."""
    model = get_model(db, access.project, name)
    return _publish(db, [domain.get_replica(db, model, replica_id)])[0]


@router.get(REPLICAS + "/{replica_id}/logs", response_class=StreamingResponse)
def replica_logs(
    name: Name,
    replica_id: ReplicaId,
    access: ViewProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    follow: bool = False,
) -> StreamingResponse:
    """The replica's console as text: what the model server and the model's code printed
    (an import error's traceback too); ``follow`` streams it until the replica ends."""
    model = get_model(db, access.project, name)
    view = domain.get_replica(db, model, replica_id)
    if view.workload.started_at is None:  # never ran: it printed nothing
        return empty_log()
    client = runner_client(request.app.state, ctx.settings)
    return stream_log(client, domain.runner_id(view.workload), offset, follow)
