"""A model's builds: its immutable versions (``kiln.domain.model_builds``). Contributors and
up start them; viewers and up read them. Each carries its source-to-image build (state,
steps, image); its log is the build's (``.../builds/{build.number}/logs``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from kiln.api.builds import BuildPublic, build_public
from kiln.api.deps import Ctx, Db, ViewProject, WriteProject
from kiln.api.models import MODEL, Name
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.builder.client import builder_client
from kiln.db.models import Project
from kiln.domain import model_builds as domain
from kiln.domain.model_builds import ModelBuildRow
from kiln.domain.models import get_model
from kiln.domain.sessions import usernames
from kiln.settings import Settings

router = APIRouter(tags=["models"])

BUILDS = MODEL + "/builds"
Number = Annotated[int, Path(ge=1, description="The build's number within the model.")]


class ModelBuildCreate(InputModel):
    commit: str | None = Field(
        None,
        max_length=200,
        description="A commit, branch or tag; default: the project's files as they are now.",
    )
    comment: str = Field("", max_length=domain.MAX_COMMENT, description="What changed.")


class ModelBuildPublic(BaseModel):
    number: int
    model: str
    file: str
    function: str
    comment: str
    created_by: str | None
    created_at: dt.datetime
    build: BuildPublic = Field(description="The source-to-image build: state, steps, image.")


def _publish(
    db: Db, settings: Settings, project: Project, model: str, rows: list[ModelBuildRow]
) -> list[ModelBuildPublic]:
    users = usernames(db, {v.created_by_id for v, _, _ in rows} | {w.user_id for _, _, w in rows})
    return [
        ModelBuildPublic(
            number=version.number,
            model=model,
            file=version.file,
            function=version.function,
            comment=version.comment,
            created_by=users.get(version.created_by_id) if version.created_by_id else None,
            created_at=version.created_at,
            build=build_public(build, workload, project, users, settings),
        )
        for version, build, workload in rows
    ]


@router.post(BUILDS, status_code=201, response_model=ModelBuildPublic)
def create_model_build(
    name: Name,
    access: WriteProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    body: ModelBuildCreate | None = None,
) -> ModelBuildPublic:
    """Build the model into an image (contributors and up): the project's code and
    dependencies with the model server, which the image runs."""
    body = body or ModelBuildCreate()
    model = get_model(db, access.project, name)
    row = domain.create_model_build(
        db, ctx.settings, access.project, model, access.user, body.commit, body.comment
    )
    commit_audited(db, access, request, "model.build", model=model.name, build=row[0].number)
    builder_client(request.app.state, ctx.settings).wake()
    return _publish(db, ctx.settings, access.project, model.name, [row])[0]


@router.get(BUILDS, response_model=PageOut[ModelBuildPublic])
def list_model_builds(
    name: Name,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageOut[ModelBuildPublic]:
    """The model's builds, newest first."""
    model = get_model(db, access.project, name)
    page = domain.list_model_builds(db, model, limit, cursor)
    items = _publish(db, ctx.settings, access.project, model.name, page.items)
    return PageOut(items=items, next_cursor=page.next_cursor)


@router.get(BUILDS + "/{number}", response_model=ModelBuildPublic)
def get_model_build(
    name: Name, number: Number, access: ViewProject, ctx: Ctx, db: Db
) -> ModelBuildPublic:
    model = get_model(db, access.project, name)
    row = domain.get_model_build(db, model, number)
    return _publish(db, ctx.settings, access.project, model.name, [row])[0]
