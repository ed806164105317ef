"""A model's deployments: which build runs, with how many replicas, what profile and what
environment. This module writes the *desired* state; the runner's model keeper (designed in
docs/architecture.md, *Models*) makes the replicas match it, level-triggered.

States of a deployment::

    deploying ──(all replicas ready; the keeper switches the model to it)──► serving
        │                                                                     │
        └──(a replica cannot start: import error, no image)──► failed         │
    serving ──(another deployment took over, or the model was stopped)──► draining ──► stopped
    deploying ──(replaced by a newer deploy before it was ready)──► stopped

A new deployment never touches the serving one: the old one keeps answering until the new
one's replicas are all ready (zero-downtime redeploy). Rollback is a new deployment of an
older build. Deploying, scaling and stopping take the operator role (``Action.operate``:
running what contributors built), like starting existing jobs.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.db.model_models import Model, ModelBuild, ModelDeployment
from kiln.db.models import User, utcnow
from kiln.db.workload_models import ResourceProfile, Workload
from kiln.domain.errors import Conflict, InvalidInput, NotFound, about_field
from kiln.domain.jobs import check_env
from kiln.domain.model_builds import get_model_build
from kiln.domain.pagination import MAX_ROW_ID, Page, decode_cursor, encode_cursor
from kiln.domain.sessions import profile_resources
from kiln.scheduling.states import WorkloadState
from kiln.settings import Settings

DEPLOYING, SERVING, DRAINING, STOPPED, FAILED = (
    "deploying",
    "serving",
    "draining",
    "stopped",
    "failed",
)
ACTIVE = (DEPLOYING, SERVING)
MAX_ENV_VARS = 100


def _check_replicas(settings: Settings, replicas: int) -> int:
    ceiling = settings.models.max_replicas
    if not 1 <= replicas <= ceiling:
        raise InvalidInput(f"replicas must be 1 to {ceiling}", "replicas")
    return replicas


def _deployable_build(db: Session, model: Model, number: int | None) -> ModelBuild:
    """The model build to deploy: the one named, else the newest that succeeded. Its image
    must exist: a build still running or one that failed is refused, saying so."""
    if number is None:
        row = db.execute(
            select(ModelBuild)
            .join(Workload, Workload.id == ModelBuild.build_id)
            .where(
                ModelBuild.model_id == model.id,
                Workload.state == WorkloadState.SUCCEEDED.value,
            )
            .order_by(ModelBuild.number.desc())
            .limit(1)
        ).first()
        if row is None:
            raise Conflict(
                f"model {model.name} has no successful build yet: build it first "
                f"(POST .../models/{model.name}/builds)"
            )
        return row[0]
    try:
        version, build, workload = get_model_build(db, model, number)
    except NotFound as exc:
        raise InvalidInput(exc.detail, "build") from None
    if workload.state != WorkloadState.SUCCEEDED.value:
        raise Conflict(
            f"build {number} of model {model.name} is {workload.state}, not succeeded: "
            "only a finished build has an image to deploy",
            "build",
        )
    if not build.image_digest:
        raise Conflict(
            f"build {number} of model {model.name} succeeded but recorded no image: "
            "build the model again",
            "build",
        )
    return version


def create_deployment(
    db: Session,
    settings: Settings,
    model: Model,
    user: User,
    *,
    build: int | None = None,
    replicas: int = 1,
    profile: str | None = None,
    env: dict[str, str] | None = None,
) -> ModelDeployment:
    """A new deployment, ``deploying`` (flushed; the caller commits and wakes the runner).
    A deployment of this model that was still ``deploying`` is replaced (stopped); the
    serving one keeps serving until the new one is ready."""
    _check_replicas(settings, replicas)
    variables = dict(env or {})
    with about_field("env"):
        if len(variables) > MAX_ENV_VARS:
            raise InvalidInput(f"at most {MAX_ENV_VARS} environment variables per deployment")
        check_env(variables)
    with about_field("profile"):
        chosen = profile if profile is not None else _profile_name(db, model)
        profile_id, cpu_millis, memory_bytes = profile_resources(db, chosen)
    version = _deployable_build(db, model, build)
    now = utcnow()
    db.execute(
        update(ModelDeployment)
        .where(ModelDeployment.model_id == model.id, ModelDeployment.state == DEPLOYING)
        .values(state=STOPPED, reason="replaced by a newer deployment", ended_at=now)
    )
    number = (
        db.scalar(
            select(func.max(ModelDeployment.number)).where(ModelDeployment.model_id == model.id)
        )
        or 0
    ) + 1
    deployment = ModelDeployment(
        model_id=model.id,
        number=number,
        model_build_id=version.id,
        replicas=replicas,
        profile_id=profile_id,
        cpu_millis=cpu_millis,
        memory_bytes=memory_bytes,
        gpu=0,
        env=variables,
        state=DEPLOYING,
        reason="",
        created_by_id=user.id,
        created_at=now,
    )
    db.add(deployment)
    try:
        db.flush()
    except IntegrityError:  # another deploy of this model took the number first
        db.rollback()
        raise Conflict(
            "another deployment of this model started at the same moment; retry"
        ) from None
    return deployment


def _profile_name(db: Session, model: Model) -> str | None:
    row = db.get(ResourceProfile, model.profile_id) if model.profile_id else None
    return row.name if row is not None else None


def current_deployment(db: Session, model: Model) -> ModelDeployment | None:
    """The deployment a scale applies to: the newest one deploying, else the serving one."""
    return db.scalar(
        select(ModelDeployment)
        .where(ModelDeployment.model_id == model.id, ModelDeployment.state.in_(ACTIVE))
        .order_by(ModelDeployment.number.desc())
        .limit(1)
    )


def scale(db: Session, settings: Settings, model: Model, replicas: int) -> ModelDeployment:
    """Change the number of replicas while the model serves (the keeper starts or drains
    replicas one by one). 409 when nothing is deployed."""
    _check_replicas(settings, replicas)
    deployment = current_deployment(db, model)
    if deployment is None:
        raise Conflict(f"model {model.name} is not deployed: deploy it first")
    deployment.replicas = replicas
    return deployment


def stop(db: Session, model: Model, by: User) -> list[ModelDeployment]:
    """Stop serving: every active deployment drains (calls in flight finish) and stops; the
    endpoint answers 503 from now on. 409 when nothing is deployed."""
    active = list(
        db.scalars(
            select(ModelDeployment).where(
                ModelDeployment.model_id == model.id, ModelDeployment.state.in_(ACTIVE)
            )
        )
    )
    if not active:
        raise Conflict(f"model {model.name} is not deployed")
    for deployment in active:
        deployment.state = DRAINING if deployment.state == SERVING else STOPPED
        deployment.reason = f"stopped by {by.username}"
        if deployment.state == STOPPED:
            deployment.ended_at = utcnow()
    model.serving_deployment_id = None
    return active


def get_deployment(db: Session, model: Model, number: int) -> ModelDeployment:
    if not 1 <= number <= MAX_ROW_ID:
        raise NotFound(f"deployment {number} of model {model.name} not found")
    row = db.scalar(
        select(ModelDeployment).where(
            ModelDeployment.model_id == model.id, ModelDeployment.number == number
        )
    )
    if row is None:
        raise NotFound(f"model {model.name} has no deployment {number}")
    return row


def list_deployments(
    db: Session, model: Model, limit: int, cursor: str | None
) -> Page[ModelDeployment]:
    """The model's deployments, newest first: its deployment history."""
    query = select(ModelDeployment).where(ModelDeployment.model_id == model.id)
    if cursor:
        query = query.where(ModelDeployment.number < decode_cursor(cursor))
    rows = list(db.scalars(query.order_by(ModelDeployment.number.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].number) if more and rows else None)


def build_numbers(db: Session, deployments: list[ModelDeployment]) -> dict[int, int]:
    """Model build id -> its number, for showing deployments."""
    ids = {d.model_build_id for d in deployments}
    if not ids:
        return {}
    query = select(ModelBuild.id, ModelBuild.number).where(ModelBuild.id.in_(ids))
    return {build_id: number for build_id, number in db.execute(query)}
