"""The runtime catalog, admin-defined resource profiles, and per-user / per-team quotas."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.db.models import Project, Team, User
from kiln.db.workload_models import Quota, ResourceProfile, Runtime, Workload
from kiln.domain.errors import Conflict, InvalidInput, NotFound
from kiln.domain.names import check_slug
from kiln.domain.pagination import Page, paginate
from kiln.runtimes.catalog import RuntimeImage, builtin_runtime
from kiln.scheduling.states import LIVE_STATES
from kiln.settings import Settings

MIN_MEMORY_BYTES = 64 * 1024**2
MAX_CPU_MILLIS = 256_000
MAX_GPU = 64


# ---- runtimes -----------------------------------------------------------------------------


def _runtime_row(image: RuntimeImage, name: str, description: str = "") -> Runtime:
    return Runtime(
        name=name,
        source=image.source,
        digest=image.digest,
        rootfs_path=None if image.rootfs is None else str(image.rootfs),
        editors=list(image.editors),
        python_version=image.python_version or "",
        env=[list(pair) for pair in image.env],
        description=description,
        size_bytes=image.size_bytes or 0,
    )


def ensure_builtin_runtime(db: Session) -> Runtime:
    """The built-in runtime (the host's Python, nothing to download) is always in the catalog;
    it is the default until an admin picks another.

    Every service and request may be the first to list it (a new site's first session and
    its builder registering the base image, at once): the insert is a savepoint, and losing
    that race means reading the row the winner committed, never a unique-key error."""
    image = builtin_runtime()
    row = db.scalar(select(Runtime).where(Runtime.name == image.name))
    if row is None:
        made = _runtime_row(image, image.name, "The host's own Python; needs no download.")
        made.is_default = db.scalar(select(func.count()).select_from(Runtime)) == 0
        try:
            with db.begin_nested():
                db.add(made)
            return made
        except IntegrityError:
            row = db.scalar(select(Runtime).where(Runtime.name == image.name))
            if row is None:  # not a lost race after all: a real integrity problem
                raise
    # Listed already: the host's Python may have been upgraded since.
    row.python_version = image.python_version or ""
    row.editors = list(image.editors)
    db.flush()
    return row


def add_image_runtime(
    db: Session,
    settings: Settings,
    archive: Path,
    name: str,
    description: str = "",
    progress: Callable[[int, int, str], None] | None = None,
) -> Runtime:
    """Unpack an OCI or docker image archive into the cache and list it under ``name``."""
    from kiln.build.oci.cache import load_image_archive

    check_slug(name, "runtime name")
    if db.scalar(select(Runtime.id).where(Runtime.name == name)) is not None:
        raise Conflict(f"a runtime named {name!r} already exists")
    if not archive.is_file():
        raise InvalidInput(f"{archive} is not a file")
    image = load_image_archive(archive, settings.runtimes_dir, name=name, progress=progress)
    # Only now, after the unpack (seconds to minutes), does this transaction write: a row it
    # held uncommitted meanwhile would keep every other "first" listing of the catalog waiting.
    ensure_builtin_runtime(db)  # first in the catalog, and the default until an admin says
    row = _runtime_row(image, name, description)
    db.add(row)
    try:
        db.flush()
    except IntegrityError as exc:
        raise Conflict(f"a runtime named {name!r} already exists") from exc
    return row


def add_registry_runtime(
    db: Session,
    settings: Settings,
    image: str,
    name: str | None = None,
    description: str = "",
    progress: Callable[[int, int, str], None] | None = None,
) -> Runtime:
    """Unpack an image from Kiln's registry (``runtimes/python:3.12``) into the cache and
    list it under ``name`` (default: from the image, ``python-3.12``). The runtime records
    the manifest digest it was unpacked from, which the registry then keeps."""
    from kiln.build.oci.registry_source import load_registry_image, parse_image_ref
    from kiln.build.registry.errors import RegistryError
    from kiln.build.registry.service import Registry

    try:
        ref = parse_image_ref(image)
    except RegistryError as exc:
        raise InvalidInput(f"image {image[:200]!r}: {exc.detail}") from None
    name = name or default_runtime_name(ref.repository, ref.reference)
    check_slug(name, "runtime name")
    if db.scalar(select(Runtime.id).where(Runtime.name == name)) is not None:
        raise Conflict(f"a runtime named {name!r} already exists")
    try:
        unpacked, manifest_digest = load_registry_image(
            Registry.for_settings(settings),
            db,
            ref,
            settings.runtimes_dir,
            name=name,
            progress=progress,
        )
    except RegistryError as exc:
        raise NotFound(f"image {ref} is not in the registry: {exc.detail}") from None
    ensure_builtin_runtime(db)  # after the unpack, as in add_image_runtime
    row = _runtime_row(unpacked, name, description)
    row.image_repository, row.image_digest = ref.repository, manifest_digest
    db.add(row)
    try:
        db.flush()
    except IntegrityError as exc:
        raise Conflict(f"a runtime named {name!r} already exists") from exc
    return row


def default_runtime_name(repository: str, reference: str) -> str:
    """``runtimes/python`` + ``3.12`` → ``python-3.12``; by digest: ``python-<12 hex>``."""
    base = repository.rsplit("/", 1)[-1]
    suffix = reference.partition(":")[2][:12] if ":" in reference else reference
    text = f"{base}-{suffix}" if suffix != "latest" else base
    return re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9._-]+", "-", text.lower()))[:64].strip("._-")


def list_runtimes(db: Session) -> list[Runtime]:
    return list(db.scalars(select(Runtime).order_by(Runtime.id)))


def get_runtime(db: Session, name: str) -> Runtime:
    row = db.scalar(select(Runtime).where(Runtime.name == name))
    if row is None:
        raise NotFound(f"runtime {name!r} not found")
    return row


def default_runtime(db: Session) -> Runtime:
    row = db.scalar(select(Runtime).where(Runtime.is_default))
    return row if row is not None else ensure_builtin_runtime(db)


def set_default_runtime(db: Session, name: str) -> Runtime:
    """Make ``name`` the runtime new sessions get when they name none (only one is)."""
    row = get_runtime(db, name)
    for other in db.scalars(select(Runtime).where(Runtime.is_default, Runtime.id != row.id)):
        other.is_default = False
    row.is_default = True
    db.flush()
    return row


# ---- resource profiles --------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    cpu_millis: int
    memory_bytes: int
    gpu: int = 0

    def check(self) -> Resources:
        if not 1 <= self.cpu_millis <= MAX_CPU_MILLIS:
            raise InvalidInput(f"cpu must be between 0.001 and {MAX_CPU_MILLIS // 1000} vCPU")
        if self.memory_bytes < MIN_MEMORY_BYTES:
            raise InvalidInput(f"memory must be at least {MIN_MEMORY_BYTES // 1024**2} MiB")
        if not 0 <= self.gpu <= MAX_GPU:
            raise InvalidInput(f"gpu must be between 0 and {MAX_GPU}")
        return self

    def fits(self, other: Resources) -> bool:
        return (
            self.cpu_millis <= other.cpu_millis
            and self.memory_bytes <= other.memory_bytes
            and self.gpu <= other.gpu
        )

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_millis + other.cpu_millis,
            self.memory_bytes + other.memory_bytes,
            self.gpu + other.gpu,
        )


def _clear_default_profile(db: Session) -> None:
    """At most one profile is the default: the one a new session gets when it names none."""
    for other in db.scalars(select(ResourceProfile).where(ResourceProfile.is_default)):
        other.is_default = False


def create_profile(
    db: Session, name: str, resources: Resources, is_default: bool = False
) -> ResourceProfile:
    check_slug(name, "profile name")
    resources.check()
    if db.scalar(select(ResourceProfile.id).where(ResourceProfile.name == name)) is not None:
        raise Conflict(f"a resource profile named {name!r} already exists")
    if is_default:
        _clear_default_profile(db)
    row = ResourceProfile(
        name=name,
        cpu_millis=resources.cpu_millis,
        memory_bytes=resources.memory_bytes,
        gpu=resources.gpu,
        is_default=is_default,
    )
    db.add(row)
    db.flush()
    return row


def list_profiles(db: Session) -> list[ResourceProfile]:
    return list(db.scalars(select(ResourceProfile).order_by(ResourceProfile.cpu_millis)))


def get_profile(db: Session, name: str) -> ResourceProfile:
    row = db.scalar(select(ResourceProfile).where(ResourceProfile.name == name))
    if row is None:
        raise NotFound(f"resource profile {name!r} not found")
    return row


def update_profile(
    db: Session, name: str, resources: Resources | None, is_default: bool | None
) -> ResourceProfile:
    """Change a profile's size and/or whether it is the default. Workloads already started
    keep the size they were given; only new ones get the new size."""
    row = get_profile(db, name)
    if resources is not None:
        resources.check()
        row.cpu_millis, row.memory_bytes, row.gpu = (
            resources.cpu_millis,
            resources.memory_bytes,
            resources.gpu,
        )
    if is_default and not row.is_default:
        _clear_default_profile(db)
    if is_default is not None:
        row.is_default = is_default
    db.flush()
    return row


def delete_profile(db: Session, name: str) -> None:
    db.delete(get_profile(db, name))


def check_request_fits_a_profile(db: Session, request: Resources) -> None:
    """A request above every profile can never be granted: refuse it at once."""
    profiles = list_profiles(db)
    if profiles and not any(
        request.fits(Resources(p.cpu_millis, p.memory_bytes, p.gpu)) for p in profiles
    ):
        raise InvalidInput(
            "the request is larger than every resource profile "
            f"({', '.join(p.name for p in profiles)}); ask an admin for a bigger profile"
        )


# ---- quotas -------------------------------------------------------------------------------


def default_user_quota(settings: Settings) -> Resources:
    r = settings.runner
    return Resources(r.user_quota_cpu_millis, r.user_quota_memory_bytes, r.user_quota_gpu)


def set_quota(db: Session, subject: User | Team, resources: Resources) -> Quota:
    resources.check()
    column = Quota.user_id if isinstance(subject, User) else Quota.team_id
    row = db.scalar(select(Quota).where(column == subject.id))
    if row is None:
        row = Quota(
            user_id=subject.id if isinstance(subject, User) else None,
            team_id=subject.id if isinstance(subject, Team) else None,
            cpu_millis=0,
            memory_bytes=0,
        )
        db.add(row)
    row.cpu_millis, row.memory_bytes, row.gpu = (
        resources.cpu_millis,
        resources.memory_bytes,
        resources.gpu,
    )
    db.flush()
    return row


@dataclass(frozen=True)
class QuotaOverride:
    """A quota that replaces the site default for one user or team."""

    kind: Literal["user", "team"]
    name: str
    resources: Resources


def list_quotas(db: Session, limit: int, cursor: str | None) -> Page[QuotaOverride]:
    """Every per-user and per-team quota, oldest first, a page at a time."""
    page = paginate(db, select(Quota), Quota.id, limit, cursor)
    user_ids = [q.user_id for q in page.items if q.user_id is not None]
    team_ids = [q.team_id for q in page.items if q.team_id is not None]
    users = {
        i: n for i, n in db.execute(select(User.id, User.username).where(User.id.in_(user_ids)))
    }
    teams = {i: n for i, n in db.execute(select(Team.id, Team.name).where(Team.id.in_(team_ids)))}
    items = [
        QuotaOverride(
            "user" if q.user_id is not None else "team",
            users[q.user_id] if q.user_id is not None else teams[q.team_id or 0],
            Resources(q.cpu_millis, q.memory_bytes, q.gpu),
        )
        for q in page.items
    ]
    return Page(items, page.next_cursor)


def remove_quota(db: Session, subject: User | Team) -> None:
    """Drop a user's or team's own quota; a user goes back to the site default."""
    column = Quota.user_id if isinstance(subject, User) else Quota.team_id
    row = db.scalar(select(Quota).where(column == subject.id))
    if row is None:
        kind = "user" if isinstance(subject, User) else "team"
        name = subject.username if isinstance(subject, User) else subject.name
        raise NotFound(f"{kind} {name!r} has no quota of its own")
    db.delete(row)
    db.flush()


def user_quota(db: Session, settings: Settings, user: User) -> Resources:
    row = db.scalar(select(Quota).where(Quota.user_id == user.id))
    if row is None:
        return default_user_quota(settings)
    return Resources(row.cpu_millis, row.memory_bytes, row.gpu)


def _usage(db: Session, *where: ColumnElement[bool]) -> Resources:
    """What live workloads (starting, running, stopping) matching ``where`` hold now. Queued
    and waiting ones hold nothing yet: they are what waits for this room."""
    cpu, memory, gpu = db.execute(
        select(
            func.coalesce(func.sum(Workload.cpu_millis), 0),
            func.coalesce(func.sum(Workload.memory_bytes), 0),
            func.coalesce(func.sum(Workload.gpu), 0),
        ).where(Workload.state.in_([s.value for s in LIVE_STATES]), *where)
    ).one()
    return Resources(int(cpu), int(memory), int(gpu))


def _user_scope(user: User) -> ColumnElement[bool]:
    return Workload.user_id == user.id


def _team_scope(team_id: int) -> ColumnElement[bool]:
    return Workload.project_id.in_(select(Project.id).where(Project.owner_team_id == team_id))


def user_usage(db: Session, user: User) -> Resources:
    """What the user's live workloads hold now, in every project."""
    return _usage(db, _user_scope(user))


def team_usage(db: Session, team_id: int) -> Resources:
    """What live workloads in the team's projects hold now, whoever started them."""
    return _usage(db, _team_scope(team_id))


QUOTA_WAIT_PREFIX = "waiting for quota:"


@dataclass(frozen=True, eq=False)
class QuotaWait:
    """Why a workload of ``request`` cannot start now: the ceiling it hits (``who``'s quota,
    ``used`` of it already) and which live workloads count against it (``scope``)."""

    who: str  # "alice", or "team lab"
    used: Resources
    quota: Resources
    request: Resources
    scope: ColumnElement[bool]

    @property
    def reason(self) -> str:
        used, quota, request = self.used, self.quota, self.request
        return (
            f"{QUOTA_WAIT_PREFIX} {self.who} uses {used.cpu_millis / 1000:g} of "
            f"{quota.cpu_millis / 1000:g} vCPU and {used.memory_bytes / 1024**3:.1f} of "
            f"{quota.memory_bytes / 1024**3:.1f} GiB; this needs "
            f"{request.cpu_millis / 1000:g} vCPU and {request.memory_bytes / 1024**3:.1f} GiB"
        )


def quota_wait(
    db: Session,
    settings: Settings,
    user: User,
    request: Resources,
    project: Project | None = None,
) -> QuotaWait | None:
    """The ceiling a new workload of ``request`` hits now, or None when it fits.

    Two ceilings apply: the user's own quota (or the site default), and, for a project a
    team owns, that team's quota when the team has one (teams without one have no ceiling
    of their own: their members' quotas still bound them)."""
    quota, used = user_quota(db, settings, user), user_usage(db, user)
    if not (used + request).fits(quota):
        return QuotaWait(user.username, used, quota, request, _user_scope(user))
    if project is not None and project.owner_team_id is not None:
        row = db.scalar(select(Quota).where(Quota.team_id == project.owner_team_id))
        if row is not None:
            team_quota = Resources(row.cpu_millis, row.memory_bytes, row.gpu)
            team_used = team_usage(db, project.owner_team_id)
            if not (team_used + request).fits(team_quota):
                scope = _team_scope(project.owner_team_id)
                who = f"team {project.owner_name}"
                return QuotaWait(who, team_used, team_quota, request, scope)
    return None


def quota_wait_reason(
    db: Session,
    settings: Settings,
    user: User,
    request: Resources,
    project: Project | None = None,
) -> str | None:
    """Why a new workload of ``request`` must wait for room (see ``quota_wait``), or None."""
    wait = quota_wait(db, settings, user, request, project)
    return wait.reason if wait is not None else None


def quota_holders(db: Session, wait: QuotaWait) -> list[Workload]:
    """The live workloads that hold the quota ``wait`` is waiting on, biggest first."""
    query = (
        select(Workload)
        .where(Workload.state.in_([s.value for s in LIVE_STATES]), wait.scope)
        .order_by(Workload.cpu_millis.desc(), Workload.created_at)
    )
    return list(db.scalars(query))
