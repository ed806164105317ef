"""The Workers API (CML's), called from inside a session by ``kiln.sdk.workers``.

Every route takes the session's workers token (``Authorization: Bearer $KILN_WORKERS_TOKEN``)
and nothing else; the token is refused on every other route. It acts for the session's project,
as the user who started the session (who must still be a contributor there), only while the
session runs, and it sees only that session's workers: another session's worker is not found.

- ``POST /api/v1/workers`` launches ``n`` workers: 201 with them, each ``running``, or
  ``failed`` with the runner's reason. A request that cannot be granted (bad count, script
  outside the project, both script and code, more than every profile or the quota) is a 4xx
  and starts nothing.
- ``GET /api/v1/workers[?id=…]`` lists the session's workers (or those), checked with the
  runner first; ``GET /api/v1/workers/{id}`` one of them.
- ``DELETE /api/v1/workers[?id=…]`` stops them (no id: every live one); ``DELETE
  /api/v1/workers/{id}`` one. Stopping an ended worker changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from kiln.api.deps import Ctx, Db, WorkersCaller
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel
from kiln.db.workload_models import Workload
from kiln.domain import workers as domain
from kiln.runner.client import runner_client
from kiln.scheduling.states import TERMINAL_STATES, StopCause, WorkloadState

router = APIRouter(prefix="/workers", tags=["workers"])

Ids = Annotated[
    list[str] | None,
    Query(alias="id", description="Worker ids (repeat the parameter); none: all of them."),
]


class WorkersLaunch(InputModel):
    n: int = Field(strict=True, description=f"How many, 1-{domain.MAX_PER_LAUNCH}.")
    cpu: float = Field(description="vCPU per worker (fractions allowed).")
    memory: float = Field(description="GiB per worker.")
    nvidia_gpu: int = Field(0, strict=True, description="GPUs per worker (none here: 0).")
    kernel: str = Field("python3", max_length=40)
    script: str | None = Field(None, max_length=4096, description="A file in the project.")
    code: str | None = Field(
        None, max_length=domain.MAX_CODE_BYTES, description="Python source, run with -c."
    )
    args: list[str] = Field(default_factory=list, description="Arguments of the script.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Added to the project's environment."
    )

    def to_request(self) -> domain.LaunchRequest:
        return domain.LaunchRequest(
            n=self.n,
            cpu=self.cpu,
            memory=self.memory,
            gpu=self.nvidia_gpu,
            kernel=self.kernel,
            script=self.script,
            code=self.code,
            args=tuple(self.args),
            env=dict(self.env),
        )


class WorkerPublic(BaseModel):
    id: str
    session: str
    state: str
    reason: str
    exit_code: int | None
    cpu: float = Field(description="vCPU")
    memory: float = Field(description="GiB")
    command: list[str]
    ip_address: str | None = Field(
        description="Where other workloads reach it; null on the local runtime (no network)."
    )
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class WorkersOut(BaseModel):
    workers: list[WorkerPublic]


def _public(row: Workload) -> WorkerPublic:
    return WorkerPublic(
        id=row.id,
        session=row.parent_id or "",
        state=row.state,
        reason=row.reason,
        exit_code=row.exit_code,
        cpu=row.cpu_millis / 1000,
        memory=row.memory_bytes / 1024**3,
        command=list(row.command),
        ip_address=None,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
    )


def _out(rows: list[Workload]) -> WorkersOut:
    return WorkersOut(workers=[_public(r) for r in rows])


@router.post("", status_code=201, response_model=WorkersOut)
def launch_workers(
    body: WorkersLaunch, caller: WorkersCaller, request: Request, ctx: Ctx, db: Db
) -> WorkersOut:
    """Launch workers of the calling session; 201 with them as started."""
    session, access = caller.session, caller.access
    project_dir = ctx.store.project_dir(access.project.id)
    rows = domain.create_workers(
        db, ctx.settings, project_dir, session, access.user, body.to_request()
    )
    ids = [r.id for r in rows]
    commit_audited(db, access, request, "workers.launch", session=session.id, workers=ids)
    client = runner_client(request.app.state, ctx.settings)
    for row in rows:
        env = domain.worker_env(db, access.project, session, row, body.env)
        domain.start_worker(db, client, access.project, session, row, env)
    return _out(rows)


@router.get("", response_model=WorkersOut)
def list_workers(
    caller: WorkersCaller, request: Request, ctx: Ctx, db: Db, ids: Ids = None
) -> WorkersOut:
    """The calling session's workers (or those named), oldest first."""
    rows = domain.list_workers(db, caller.session, ids)
    client = runner_client(request.app.state, ctx.settings)
    for row in rows:
        domain.refresh(db, client, row)
    return _out(rows)


@router.get("/{worker_id}", response_model=WorkerPublic)
def get_worker(
    worker_id: str, caller: WorkersCaller, request: Request, ctx: Ctx, db: Db
) -> WorkerPublic:
    (row,) = domain.list_workers(db, caller.session, [worker_id])
    domain.refresh(db, runner_client(request.app.state, ctx.settings), row)
    return _public(row)


def _stop(
    caller: WorkersCaller, request: Request, ctx: Ctx, db: Db, ids: list[str] | None
) -> list[Workload]:
    session = caller.session
    rows = domain.list_workers(db, session, ids)
    if ids is None:
        rows = [r for r in rows if WorkloadState(r.state) not in TERMINAL_STATES]
    client = runner_client(request.app.state, ctx.settings)
    for row in rows:
        domain.stop_worker(db, client, row, StopCause.REQUESTED, f"session {session.id}")
    commit_audited(
        db, caller.access, request, "workers.stop", session=session.id, workers=[r.id for r in rows]
    )
    return rows


@router.delete("", response_model=WorkersOut)
def stop_workers(
    caller: WorkersCaller, request: Request, ctx: Ctx, db: Db, ids: Ids = None
) -> WorkersOut:
    """Stop the named workers, or every live one; answers with their final states."""
    return _out(_stop(caller, request, ctx, db, ids))


@router.delete("/{worker_id}", response_model=WorkerPublic)
def stop_worker(
    worker_id: str, caller: WorkersCaller, request: Request, ctx: Ctx, db: Db
) -> WorkerPublic:
    return _public(_stop(caller, request, ctx, db, [worker_id])[0])
