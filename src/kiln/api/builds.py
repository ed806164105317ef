"""Builds: turn a project into an OCI image (contributors and up start and cancel; viewers
and up read builds and their logs).

Starting answers **201 with the queued build** as soon as it is durable; the builder claims it
(the web tier wakes it; it also looks every few seconds). A build is numbered within its
project (``.../builds/7``). Logs are streamed from the builder: ``?follow=true`` keeps the
response open until the build ends, ``?offset=N`` resumes after the first N bytes.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StrictBool

from kiln.api.deps import Ctx, Db, ViewProject, WriteProject
from kiln.api.logs import empty_log, stream_chunks
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.builder.client import builder_client
from kiln.db.build_models import Build
from kiln.db.models import Project
from kiln.db.workload_models import Workload
from kiln.domain import builds as domain
from kiln.domain.sessions import usernames
from kiln.scheduling.states import WorkloadState, is_terminal
from kiln.settings import Settings

router = APIRouter(prefix="/projects", tags=["builds"])

BUILDS = "/{owner}/{project}/builds"
BUILD = BUILDS + "/{number}"
Number = Annotated[int, Path(ge=1, description="The build's number in the project.")]


class BuildCreate(InputModel):
    commit: str | None = Field(
        None,
        max_length=200,
        description="A commit, branch or tag to build; default: the project's files as they "
        "are now (a snapshot of the working tree, honouring .gitignore).",
    )
    base: str | None = Field(
        None, max_length=300, description="Base runtime image (runtimes/...); default: the site's."
    )
    no_cache: StrictBool = Field(
        False, description="Install the dependencies again even if they did not change."
    )
    command: list[Annotated[str, Field(max_length=domain.MAX_COMMAND_ARG)]] | None = Field(
        None, max_length=domain.MAX_COMMAND_ARGS, description="The image's Cmd; default python3."
    )


class StepPublic(BaseModel):
    name: str
    status: str  # running, done, cached, skipped, failed
    detail: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    duration_seconds: float | None


class ImagePublic(BaseModel):
    registry: str
    repository: str
    tags: list[str]
    digest: str
    reference: str  # registry/repository@digest: what podman pull takes


class BuildPublic(BaseModel):
    number: int
    id: str
    project: str
    state: str
    reason: str
    attempt: int
    started_by: str | None
    source_commit: str | None
    commit: str | None
    base: str
    base_digest: str | None
    no_cache: bool
    command: list[str]
    dependencies_cached: bool | None
    layers: dict[str, Any]
    steps: list[StepPublic]
    image: ImagePublic | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    duration_seconds: float | None


def registry_host(settings: Settings) -> str:
    """Where users pull built images from (host[:port])."""
    if settings.builder.registry_url:
        return urlsplit(settings.builder.registry_url).netloc
    return f"{settings.domain}:{settings.web.port}"


def _time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _step(step: dict[str, Any]) -> StepPublic:
    started, ended = _time(step.get("started_at")), _time(step.get("ended_at"))
    return StepPublic(
        name=str(step.get("name", "")),
        status=str(step.get("status", "")),
        detail=str(step.get("detail", "")),
        started_at=started,
        ended_at=ended,
        duration_seconds=(ended - started).total_seconds() if started and ended else None,
    )


def build_public(
    build: Build, workload: Workload, project: Project, users: dict[int, str], settings: Settings
) -> BuildPublic:
    image = None
    if build.image_digest:
        host = registry_host(settings)
        image = ImagePublic(
            registry=host,
            repository=build.repository,
            tags=list(build.tags),
            digest=build.image_digest,
            reference=f"{host}/{build.repository}@{build.image_digest}",
        )
    duration = None
    if workload.started_at and workload.ended_at:
        duration = (workload.ended_at - workload.started_at).total_seconds()
    return BuildPublic(
        number=build.number,
        id=build.workload_id,
        project=f"{project.owner_name}/{project.slug}",
        state=workload.state,
        reason=workload.reason,
        attempt=build.attempt,
        started_by=users.get(workload.user_id) if workload.user_id else None,
        source_commit=build.source_commit or None,
        commit=build.commit or None,
        base=build.base_image,
        base_digest=build.base_digest or None,
        no_cache=build.no_cache,
        command=list(build.command),
        dependencies_cached=build.dependencies_cached,
        layers=dict(build.layers or {}),
        steps=[_step(s) for s in build.steps or []],
        image=image,
        created_at=workload.created_at,
        started_at=workload.started_at,
        ended_at=workload.ended_at,
        duration_seconds=duration,
    )


def _publish(
    db: Db, ctx: Ctx, project: Project, rows: list[tuple[Build, Workload]]
) -> list[BuildPublic]:
    users = usernames(db, {w.user_id for _, w in rows})
    return [build_public(b, w, project, users, ctx.settings) for b, w in rows]


@router.post(BUILDS, status_code=201, response_model=BuildPublic)
def create_build(
    body: BuildCreate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> BuildPublic:
    """Queue a build of the project (contributors and up); answers with the queued build."""
    req = domain.BuildRequest(
        commit=body.commit,
        base=body.base,
        no_cache=body.no_cache,
        command=tuple(body.command) if body.command is not None else None,
    )
    build, workload = domain.create_build(db, ctx.settings, access.project, access.user, req)
    commit_audited(
        db,
        access,
        request,
        "build.create",
        build=build.number,
        commit=body.commit or "working tree",
    )
    builder_client(request.app.state, ctx.settings).wake()
    return _publish(db, ctx, access.project, [(build, workload)])[0]


@router.get(BUILDS, response_model=PageOut[BuildPublic])
def list_builds(
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageOut[BuildPublic]:
    """The project's builds, newest first."""
    page = domain.list_builds(db, access.project, limit, cursor)
    return PageOut(
        items=_publish(db, ctx, access.project, page.items), next_cursor=page.next_cursor
    )


@router.get(BUILD, response_model=BuildPublic)
def get_build(number: Number, access: ViewProject, ctx: Ctx, db: Db) -> BuildPublic:
    row = domain.get_build(db, access.project, number)
    return _publish(db, ctx, access.project, [row])[0]


@router.post(BUILD + "/cancel", response_model=BuildPublic)
def cancel_build(
    number: Number, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> BuildPublic:
    """Cancel a build (contributors and up): a queued one ends at once, a running one is
    ``stopping`` until the builder has stopped it. 409 when it already ended."""
    build, workload = domain.get_build(db, access.project, number)
    domain.cancel_build(db, build, workload, access.user)
    commit_audited(db, access, request, "build.cancel", build=build.number)
    builder_client(request.app.state, ctx.settings).wake()
    return _publish(db, ctx, access.project, [(build, workload)])[0]


@router.get(BUILD + "/logs", response_class=StreamingResponse)
def build_logs(
    number: Number,
    access: ViewProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    follow: bool = False,
) -> StreamingResponse:
    """The build's log as text (one log across its attempts); ``follow`` streams it live."""
    build, workload = domain.get_build(db, access.project, number)
    # No builder ever took it (its first attempt, unclaimed): there is no log anywhere, also
    # once it ended (cancelled while queued), so no builder needs to answer.
    never_ran = build.attempt == 1 and not build.claimed_by
    if never_ran and (not follow or is_terminal(WorkloadState(workload.state))):
        return empty_log()
    client = builder_client(request.app.state, ctx.settings)
    client.ping()  # a builder that is down is a 503, before the 200 starts
    return stream_chunks(client.logs(build.workload_id, offset, follow))
