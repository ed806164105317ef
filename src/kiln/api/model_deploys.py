"""A model's deployments (``kiln.domain.model_deploys``): deploy a build, scale, stop, and
the deployment history. Operators and up deploy, scale and stop (running what contributors
built); viewers read. Each answer is the desired state, durable; the runner's model keeper
starts and stops replicas to match it (the web tier wakes the runner)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field, StrictInt

from kiln.api.deps import Ctx, Db, OperateProject, ViewProject
from kiln.api.models import MODEL, Name
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.db.model_models import ModelDeployment
from kiln.domain import model_deploys as domain
from kiln.domain.models import get_model
from kiln.domain.sessions import profile_names, usernames
from kiln.runner.client import runner_client
from kiln.settings import Settings

router = APIRouter(tags=["models"])

DEPLOYMENTS = MODEL + "/deployments"
Number = Annotated[int, Path(ge=1, description="The deployment's number within the model.")]


class DeploymentCreate(InputModel):
    build: StrictInt | None = Field(
        None, ge=1, description="The model build to deploy; default: the newest successful one."
    )
    replicas: StrictInt = Field(1, ge=1, description="How many replicas serve the model.")
    profile: str | None = Field(
        None, max_length=64, description="Resource profile of each replica; default: the model's."
    )
    env: dict[str, Annotated[str, Field(max_length=10_000)]] = Field(
        default_factory=dict, description="Environment of the replicas (over the project's)."
    )


class Scale(InputModel):
    replicas: StrictInt = Field(ge=1, description="The new number of replicas.")


class DeploymentPublic(BaseModel):
    number: int
    model: str
    build: int
    state: str
    reason: str
    replicas: int
    profile: str | None
    cpu_millis: int
    memory_bytes: int
    env: dict[str, str]
    created_by: str | None
    created_at: dt.datetime
    serving_at: dt.datetime | None
    ended_at: dt.datetime | None


def _publish(db: Db, model: str, rows: list[ModelDeployment]) -> list[DeploymentPublic]:
    users = usernames(db, {d.created_by_id for d in rows})
    profiles = profile_names(db, {d.profile_id for d in rows})
    builds = domain.build_numbers(db, rows)
    return [
        DeploymentPublic(
            number=d.number,
            model=model,
            build=builds[d.model_build_id],
            state=d.state,
            reason=d.reason,
            replicas=d.replicas,
            profile=profiles.get(d.profile_id) if d.profile_id else None,
            cpu_millis=d.cpu_millis,
            memory_bytes=d.memory_bytes,
            env=dict(d.env),
            created_by=users.get(d.created_by_id) if d.created_by_id else None,
            created_at=d.created_at,
            serving_at=d.serving_at,
            ended_at=d.ended_at,
        )
        for d in rows
    ]


def _wake(request: Request, settings: Settings) -> None:
    runner_client(request.app.state, settings).wake()


@router.post(DEPLOYMENTS, status_code=201, response_model=DeploymentPublic)
def deploy(
    name: Name, body: DeploymentCreate, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> DeploymentPublic:
    """Deploy a build of the model (operators and up). The serving deployment keeps
    answering until this one's replicas are all ready. Rollback: deploy an older build."""
    model = get_model(db, access.project, name)
    deployment = domain.create_deployment(
        db,
        ctx.settings,
        model,
        access.user,
        build=body.build,
        replicas=body.replicas,
        profile=body.profile,
        env=body.env,
    )
    public = _publish(db, model.name, [deployment])[0]
    commit_audited(
        db,
        access,
        request,
        "model.deploy",
        model=model.name,
        deployment=deployment.number,
        build=public.build,
        replicas=deployment.replicas,
    )
    _wake(request, ctx.settings)
    return public


@router.get(DEPLOYMENTS, response_model=PageOut[DeploymentPublic])
def list_deployments(
    name: Name,
    access: ViewProject,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageOut[DeploymentPublic]:
    """The model's deployment history, newest first."""
    model = get_model(db, access.project, name)
    page = domain.list_deployments(db, model, limit, cursor)
    return PageOut(items=_publish(db, model.name, page.items), next_cursor=page.next_cursor)


@router.get(DEPLOYMENTS + "/{number}", response_model=DeploymentPublic)
def get_deployment(name: Name, number: Number, access: ViewProject, db: Db) -> DeploymentPublic:
    model = get_model(db, access.project, name)
    return _publish(db, model.name, [domain.get_deployment(db, model, number)])[0]


@router.post(MODEL + "/scale", response_model=DeploymentPublic)
def scale(
    name: Name, body: Scale, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> DeploymentPublic:
    """Change the number of replicas while the model serves (operators and up)."""
    model = get_model(db, access.project, name)
    deployment = domain.scale(db, ctx.settings, model, body.replicas)
    commit_audited(db, access, request, "model.scale", model=model.name, replicas=body.replicas)
    _wake(request, ctx.settings)
    return _publish(db, model.name, [deployment])[0]


@router.post(MODEL + "/stop", response_model=list[DeploymentPublic])
def stop(
    name: Name, access: OperateProject, request: Request, ctx: Ctx, db: Db
) -> list[DeploymentPublic]:
    """Stop serving the model (operators and up): calls in flight finish, then its
    replicas stop; the endpoint answers 503 until the next deploy."""
    model = get_model(db, access.project, name)
    stopped = domain.stop(db, model, access.user)
    commit_audited(db, access, request, "model.stop", model=model.name)
    _wake(request, ctx.settings)
    return _publish(db, model.name, stopped)
