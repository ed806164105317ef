"""A model deployment's replicas: workloads of kind ``replica`` running the model server on
the model build's own image.

The runner's model keeper (``kiln.runner.models``) decides when a replica is queued, started
and stopped; this module says what a replica *is*: its runner id, the command and
environment it starts with, the readiness probe, and the rows that record it (a
``workloads`` row for the one state machine, quotas and logs, and a ``model_replicas`` row
for its deployment, slot, restart count and readiness).
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.build.serving_layer import MODEL_PORT
from kiln.db.model_models import Model, ModelBuild, ModelDeployment, ModelReplica
from kiln.db.models import Project, utcnow
from kiln.db.workload_models import Workload
from kiln.domain.errors import NotFound
from kiln.domain.model_builds import serving_command
from kiln.domain.projects import list_env
from kiln.domain.sessions import add_event
from kiln.scheduling.states import TERMINAL_STATES, WorkloadState

KIND = "replica"
PORT = MODEL_PORT
READY_PATH = "/_kiln/ready"
PROBE_TIMEOUT = 1.0
_REPLICA_ID = re.compile(r"^[0-9A-Za-z_-]{1,32}$")  # a workload id


def runner_id(replica: Workload | str) -> str:
    """The runner's id for a replica: stable, so a retried start is idempotent; the prefix
    routes a replica's exit to the keeper (the reconciler's light pass)."""
    return f"replica-{replica if isinstance(replica, str) else replica.id}"


def replica_name(replica: Workload) -> str:
    return f"model replica {replica.id}"


def command(model: Model, build: ModelBuild, drain_seconds: float) -> tuple[str, ...]:
    """The model server for the file and function the build was made for, with the model's
    concurrency as it is now; on SIGTERM it lets calls in flight finish for at most
    ``drain_seconds`` (the runner's grace before SIGKILL must be longer)."""
    drain = ("--drain-seconds", f"{drain_seconds:g}")
    return (*serving_command(model, build.file, build.function), *drain)


def replica_env(
    db: Session, project: Project, model: Model, deployment: ModelDeployment, replica: Workload
) -> dict[str, str]:
    """project < deployment < the variables that describe this replica (CML's names beside
    Kiln's). The image's own ``Env`` goes under all of them (the caller adds it)."""
    env = {v.name: v.value for v in list_env(db, project)}
    env.update(deployment.env)
    env.update(
        {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": str(project.id),
            "CDSW_ENGINE_ID": replica.id,
            "CDSW_MODEL_ID": str(model.id),
            "CDSW_MODEL_NAME": model.name,
            "KILN_PROJECT": f"{project.owner_name}/{project.slug}",
            "KILN_MODEL": model.name,
            "KILN_MODEL_DEPLOYMENT": str(deployment.number),
            "KILN_REPLICA_ID": replica.id,
            "KILN_MODEL_PORT": str(PORT),
        }
    )
    return env


def queue_replica(
    db: Session, deployment: ModelDeployment, project_id: int, slot: int, restarts: int
) -> tuple[Workload, ModelReplica]:
    """A queued replica in ``slot`` (flushed): runs as, and counts against the quota of, the
    user who deployed."""
    workload = Workload(
        id=secrets.token_hex(8),
        kind=KIND,
        project_id=project_id,
        user_id=deployment.created_by_id,
        profile_id=deployment.profile_id,
        cpu_millis=deployment.cpu_millis,
        memory_bytes=deployment.memory_bytes,
        gpu=deployment.gpu,
        command=[],
        state=WorkloadState.QUEUED,
        created_at=utcnow(),
    )
    db.add(workload)
    db.flush()
    row = ModelReplica(
        workload_id=workload.id, deployment_id=deployment.id, slot=slot, restarts=restarts
    )
    db.add(row)
    note = f" (restart {restarts} of slot {slot})" if restarts else f" (slot {slot})"
    add_event(db, workload, f"queued for deployment {deployment.number}{note}", at=utcnow())
    db.flush()
    return workload, row


def replicas_of(db: Session, deployment_id: int) -> list[tuple[ModelReplica, Workload]]:
    """Every replica the deployment ever had, oldest first (a slot's restarts follow it)."""
    rows = db.execute(
        select(ModelReplica, Workload)
        .join(Workload, Workload.id == ModelReplica.workload_id)
        .where(ModelReplica.deployment_id == deployment_id)
        .order_by(Workload.created_at, Workload.id)
    )
    return [(replica, workload) for replica, workload in rows]


def is_ready(endpoint: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Is the model server at ``endpoint`` ready? Only a 200 on ``/_kiln/ready`` counts: the
    server answers 503 while it imports the user's file."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return False
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", READY_PATH, headers={"User-Agent": "kiln-probe"})
        response = connection.getresponse()
        response.read(65536)
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def resolved(rootfs: Path) -> str:
    """The image root as the runner wants it named: resolved (it refuses symlinked paths)."""
    return str(rootfs.resolve())


# ---- what users see of replicas (the API's and the UI's) -------------------------------------


@dataclass(frozen=True)
class SlotView:
    """A slot's newest replica as users see it, with the exit before it (a crashed replica
    is replaced by a new workload in its slot: ``previous`` is the one that ended last)."""

    replica: ModelReplica
    workload: Workload
    deployment: ModelDeployment
    previous: Workload | None

    @property
    def ready_since(self) -> dt.datetime | None:
        """When it became ready, while it is ready now (``ready_at`` means "ready once")."""
        return self.replica.ready_at if self.replica.ready else None

    @property
    def last_exit(self) -> Workload | None:
        """The slot's most recent exit: this replica's own when it ended, else the one it
        replaced."""
        if WorkloadState(self.workload.state) in TERMINAL_STATES:
            return self.workload
        return self.previous


def slot_views(db: Session, deployments: list[ModelDeployment]) -> list[SlotView]:
    """The newest replica of each slot of ``deployments`` (in their order, by slot). Of an
    active deployment only the slots it wants, and ended slots above its count that are
    still stopping; of an ended one every slot's last replica (a failed deployment's show
    why it failed)."""
    views: list[SlotView] = []
    for deployment in deployments:
        newest: dict[int, tuple[ModelReplica, Workload]] = {}
        before: dict[int, Workload] = {}
        for replica, workload in replicas_of(db, deployment.id):  # oldest first
            if replica.slot in newest:
                before[replica.slot] = newest[replica.slot][1]
            newest[replica.slot] = (replica, workload)
        active = deployment.state in ("deploying", "serving")
        for slot in sorted(newest):
            replica, workload = newest[slot]
            ended = WorkloadState(workload.state) in TERMINAL_STATES
            if active and slot >= deployment.replicas and ended:
                continue  # scaled away
            views.append(SlotView(replica, workload, deployment, before.get(slot)))
    return views


def model_slot_views(db: Session, model: Model) -> list[SlotView]:
    """The replicas a model has now: those of its deployments that are deploying, serving or
    draining, or that still have a replica that has not ended; newest deployment first."""
    live = (
        select(ModelReplica.deployment_id)
        .join(Workload, Workload.id == ModelReplica.workload_id)
        .where(Workload.state.not_in([s.value for s in TERMINAL_STATES]))
    )
    deployments = list(
        db.scalars(
            select(ModelDeployment)
            .where(
                ModelDeployment.model_id == model.id,
                ModelDeployment.state.in_(("deploying", "serving", "draining"))
                | ModelDeployment.id.in_(live),
            )
            .order_by(ModelDeployment.number.desc())
        )
    )
    return slot_views(db, deployments)


def get_replica(db: Session, model: Model, replica_id: str) -> SlotView:
    """Any replica the model's deployments ever had (an earlier one of a slot too: its log
    says why it ended); ``NotFound`` for an id that is not one of them."""
    row = None
    if _REPLICA_ID.match(replica_id):
        row = db.execute(
            select(ModelReplica, Workload, ModelDeployment)
            .join(Workload, Workload.id == ModelReplica.workload_id)
            .join(ModelDeployment, ModelDeployment.id == ModelReplica.deployment_id)
            .where(ModelReplica.workload_id == replica_id, ModelDeployment.model_id == model.id)
        ).first()
    if row is None:
        raise NotFound(f"model {model.name} has no replica {replica_id[:40]!r}")
    replica, workload, deployment = row
    previous = db.scalar(
        select(Workload)
        .join(ModelReplica, ModelReplica.workload_id == Workload.id)
        .where(
            ModelReplica.deployment_id == deployment.id,
            ModelReplica.slot == replica.slot,
            Workload.created_at < workload.created_at,
        )
        .order_by(Workload.created_at.desc(), Workload.id.desc())
        .limit(1)
    )
    return SlotView(replica, workload, deployment, previous)
