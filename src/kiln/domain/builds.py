"""Source-to-image builds, as the web tier writes and reads them.

A build is a ``Workload`` of kind ``build`` (state, reason, times, resources, who started it)
plus a ``Build`` row (its number in the project, what to build, its steps and results). The
web tier validates and stores *queued* builds and records cancels; the builder
(``kiln.builder``) claims them, runs them and records every step. Every check here runs
before anything is written, so a refused request writes nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.build.registry.names import project_repository
from kiln.build.registry_client import Reference
from kiln.build.snapshot import check_committish
from kiln.db.build_models import Build
from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import transitions
from kiln.domain.errors import InvalidInput, NotFound
from kiln.domain.pagination import MAX_ROW_ID, Page, decode_cursor, encode_cursor
from kiln.scheduling.states import Event, IllegalTransition, StopCause, WorkloadState, stop_event
from kiln.settings import Settings

KIND = "build"
RUNTIME_REPOSITORIES = "runtimes/"  # where bases come from: site-admin controlled
MAX_COMMAND_ARGS = 64
MAX_COMMAND_ARG = 1024
IMAGE_NAME = "build"  # {owner}/{project}/build:<number>


@dataclass(frozen=True)
class BuildRequest:
    commit: str | None = None  # None: the working tree as it is now
    base: str | None = None  # None: the site's default base
    no_cache: bool = False
    command: tuple[str, ...] | None = None  # the image's Cmd; None: python3
    serving: bool = False  # a model's build: the model server's layer goes in too


def image_repository(project: Project) -> str:
    """The registry repository of a project's built images: ``owner/project/build`` in the
    registry's spelling of Kiln names (``names.oci_component``), so Kiln's own registry
    finds the project (its quota and its collaborators) from the name."""
    return project_repository(project.owner_name, project.slug, IMAGE_NAME)


def _check(request: BuildRequest, settings: Settings) -> tuple[str | None, str, list[str]]:
    commit = check_committish(request.commit) if request.commit else None
    base = request.base or settings.builder.base_image
    try:
        ref = Reference.parse(base)
    except ValueError as exc:
        raise InvalidInput(f"base: {exc}") from None
    if not ref.repository.startswith(RUNTIME_REPOSITORIES):
        raise InvalidInput(
            f"base {base[:300]!r}: builds start from a runtime image (runtimes/...), "
            f"for example {settings.builder.base_image}"
        )
    command = list(request.command) if request.command is not None else ["python3"]
    if not command or len(command) > MAX_COMMAND_ARGS:
        raise InvalidInput(f"command: 1 to {MAX_COMMAND_ARGS} arguments")
    if any(not arg or len(arg) > MAX_COMMAND_ARG or "\0" in arg for arg in command):
        raise InvalidInput(
            f"command: each argument is 1 to {MAX_COMMAND_ARG} characters, without NUL"
        )
    return commit, str(ref), command


def create_build(
    db: Session, settings: Settings, project: Project, user: User, request: BuildRequest
) -> tuple[Build, Workload]:
    """A queued build (flushed; the caller commits, then wakes the builder)."""
    commit, base, command = _check(request, settings)
    repository = image_repository(project)
    number = (
        db.scalar(select(func.max(Build.number)).where(Build.project_id == project.id)) or 0
    ) + 1
    b = settings.builder
    workload = Workload(
        id=secrets.token_hex(8),
        kind=KIND,
        project_id=project.id,
        user_id=user.id,
        cpu_millis=b.cpu_millis,
        memory_bytes=b.memory_bytes,
        command=command,
        state=WorkloadState.QUEUED,
        created_at=utcnow(),
    )
    build = Build(
        workload_id=workload.id,
        project_id=project.id,
        number=number,
        source_commit=commit or "",
        base_image=base,
        no_cache=request.no_cache,
        command=command,
        serving=request.serving,
        repository=repository,
        tags=[str(number), "latest"],
        steps=[],
        layers={},
    )
    db.add(workload)
    db.flush()
    db.add(build)
    try:
        db.flush()
    except IntegrityError:  # another build of this project took the number first
        db.rollback()
        raise InvalidInput(
            "another build of this project was started at the same moment; retry"
        ) from None
    return build, workload


def get_build(db: Session, project: Project, number: int) -> tuple[Build, Workload]:
    if not 1 <= number <= MAX_ROW_ID:
        raise NotFound(f"build {number} not found")
    # One statement for both rows: on PostgreSQL each statement reads its own snapshot, and
    # two would let a build that ends in between show "succeeded" without its image.
    row = db.execute(
        select(Build, Workload)
        .join(Workload, Workload.id == Build.workload_id)
        .where(Build.project_id == project.id, Build.number == number)
    ).first()
    if row is None:
        raise NotFound(f"{project.owner_name}/{project.slug} has no build {number}")
    return row[0], row[1]


def list_builds(
    db: Session, project: Project, limit: int, cursor: str | None
) -> Page[tuple[Build, Workload]]:
    """The project's builds, newest first."""
    query = (
        select(Build, Workload)
        .join(Workload, Workload.id == Build.workload_id)
        .where(Build.project_id == project.id)
    )
    if cursor:
        query = query.where(Build.number < decode_cursor(cursor))
    rows = [(b, w) for b, w in db.execute(query.order_by(Build.number.desc()).limit(limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1][0].number) if more and rows else None)


def cancel_build(db: Session, build: Build, workload: Workload, by: User) -> bool:
    """Cancel a build: a queued one ends ``stopped`` at once; a running one becomes
    ``stopping`` and its builder stops it. Returns True when the builder has work to do. 409
    when it already ended."""
    what = f"build {build.number}"
    for attempt in range(2):
        event = stop_event(WorkloadState(workload.state), what)
        if event is None:
            return True  # already stopping
        values: dict[str, Any] = {
            "stop_cause": StopCause.REQUESTED.value,
            "reason": f"cancelled by {by.username}",
        }
        if event is Event.CANCEL:
            values.update(reason=f"cancelled by {by.username} before it started", ended_at=utcnow())
        try:
            transitions.move(db, workload, event, what, **values)
        except IllegalTransition:
            if attempt:
                raise
            continue  # a builder claimed it meanwhile (``move`` re-read it): stop it instead
        return event is Event.STOP
    return False  # not reached
