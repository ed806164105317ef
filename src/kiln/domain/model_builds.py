"""A model's builds: its immutable versions.

A model build is a source-to-image build (``kiln.domain.builds``: a ``builds`` row and its
``workloads`` row, run by the builder) with the model server's layer in the image
(``builds.serving``) and the server as the image's command, plus a ``model_builds`` row that
numbers it within the model and remembers the file and function it was built for. The image
therefore serves the model by itself; a deployment runs it as replicas.
"""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.build.serving_layer import server_command
from kiln.db.build_models import Build
from kiln.db.model_models import Model, ModelBuild
from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import builds
from kiln.domain.errors import Conflict, InvalidInput, NotFound
from kiln.domain.pagination import MAX_ROW_ID, Page, decode_cursor, encode_cursor
from kiln.settings import Settings

MAX_COMMENT = 500


def model_command(model: Model) -> tuple[str, ...]:
    """How the model server runs for this model as it is now (a new build's image command)."""
    return serving_command(model, model.file, model.function)


def serving_command(model: Model, file: str, function: str) -> tuple[str, ...]:
    """The model server for ``file``'s ``function``: the model's concurrency as threads of
    one process, or as that many processes of one thread each."""
    if model.serving_mode == "processes":
        return server_command(file, function, threads=1, processes=model.concurrency)
    return server_command(file, function, threads=model.concurrency, processes=1)


def create_model_build(
    db: Session,
    settings: Settings,
    project: Project,
    model: Model,
    user: User,
    commit: str | None = None,
    comment: str = "",
) -> tuple[ModelBuild, Build, Workload]:
    """Queue a build of the model (flushed; the caller commits, then wakes the builder)."""
    if len(comment) > MAX_COMMENT or any(ord(c) < 0x20 and c not in "\t" for c in comment):
        raise InvalidInput(
            f"comment: at most {MAX_COMMENT} characters, without control characters", "comment"
        )
    request = builds.BuildRequest(
        commit=commit,
        base=model.base_image or None,
        command=model_command(model),
        serving=True,
    )
    build, workload = builds.create_build(db, settings, project, user, request)
    number = (
        db.scalar(select(func.max(ModelBuild.number)).where(ModelBuild.model_id == model.id)) or 0
    ) + 1
    version = ModelBuild(
        model_id=model.id,
        number=number,
        build_id=build.workload_id,
        file=model.file,
        function=model.function,
        comment=comment,
        created_by_id=user.id,
        created_at=utcnow(),
    )
    db.add(version)
    try:
        db.flush()
    except IntegrityError:  # another build of this model took the number first
        db.rollback()
        raise Conflict(
            "another build of this model was started at the same moment; retry"
        ) from None
    return version, build, workload


ModelBuildRow = tuple[ModelBuild, Build, Workload]


def _joined(model: Model) -> Select[ModelBuild, Build, Workload]:
    return (
        select(ModelBuild, Build, Workload)
        .join(Build, Build.workload_id == ModelBuild.build_id)
        .join(Workload, Workload.id == Build.workload_id)
        .where(ModelBuild.model_id == model.id)
    )


def get_model_build(db: Session, model: Model, number: int) -> ModelBuildRow:
    if not 1 <= number <= MAX_ROW_ID:
        raise NotFound(f"build {number} of model {model.name} not found")
    row = db.execute(_joined(model).where(ModelBuild.number == number)).first()
    if row is None:
        raise NotFound(f"model {model.name} has no build {number}")
    return row[0], row[1], row[2]


def list_model_builds(
    db: Session, model: Model, limit: int, cursor: str | None
) -> Page[ModelBuildRow]:
    """The model's builds, newest first."""
    query = _joined(model)
    if cursor:
        query = query.where(ModelBuild.number < decode_cursor(cursor))
    found = db.execute(query.order_by(ModelBuild.number.desc()).limit(limit + 1)).all()
    rows = [(m, b, w) for m, b, w in found]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1][0].number) if more and rows else None)
