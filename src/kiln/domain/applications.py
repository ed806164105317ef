"""Applications: a project's long-running web apps, each on its own subdomain.

An application is a script in the project (``.py`` or ``.sh``, like a job's) that serves HTTP
on ``127.0.0.1:$CDSW_APP_PORT`` (also ``$PORT``), with a runtime, a resource profile and an
environment (site < project < application). It is reachable at
``https://{subdomain}.{content domain}/`` through Kiln's proxy (``kiln.apps.proxy``), by the
project's viewers and up, or by anyone while it is public *and* the site allows public
applications (``kiln.domain.site_settings``).

The web tier stores what the user wants (``desired``: running or stopped) and, for a start,
restart or update, the instance that should run (a queued ``Workload`` of kind
``application``); the runner's reconciler (``kiln.runner.applications``) starts instances,
watches them, restarts crashed ones with back-off and swaps a replacement in once it answers.
Every check here runs before anything is written, so a refused request writes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.db.app_models import Application
from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import ResourceProfile, Runtime, Workload
from kiln.domain import session_editors as editors
from kiln.domain import transitions
from kiln.domain.authz import visible_projects_clause
from kiln.domain.errors import Conflict, InvalidInput, NotFound, about_field
from kiln.domain.jobs import check_env, check_script, interpreter
from kiln.domain.names import check_display_name
from kiln.domain.sessions import add_event, profile_resources
from kiln.runtimes.catalog import EDITOR_TERMINAL
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    Event,
    StopCause,
    WorkloadState,
)

KIND = "application"
APP_PORT = 8100  # CDSW_APP_PORT (and PORT) inside an application's sandbox
RUNNING, STOPPED = "running", "stopped"

# Subdomains Kiln or a later part of it answers itself, or that people expect to mean the
# site: refused for applications. ``modelservice`` is where model serving will live.
RESERVED_SUBDOMAINS = frozenset(
    {
        "admin",
        "api",
        "app",
        "apps",
        "assets",
        "auth",
        "cdn",
        "docs",
        "git",
        "kiln",
        "localhost",
        "login",
        "mail",
        "modelservice",
        "models",
        "registry",
        "static",
        "status",
        "www",
    }
)
# Prefixes of the proxy's own names: a session's web UI ports are ``app-{session id}`` and
# ``read-only-{session id}`` (CML's), ``public-`` is CML's third; ``xn--`` is punycode, where a
# look-alike of another app's name could hide.
RESERVED_PREFIXES = ("app-", "read-only-", "public-", "modelservice-", "xn--")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Session ids (``secrets.token_hex(8)``) name their editor's origin: never an application's.
SESSION_ID_SHAPE = re.compile(r"[0-9a-f]{16}")


def check_subdomain(value: str) -> str:
    """One DNS label for ``{subdomain}.{content domain}``: lower case, at most 63 letters,
    digits and inner hyphens, none of Kiln's own names."""
    if not _LABEL.fullmatch(value):
        raise InvalidInput(
            f"subdomain {value[:80]!r} is not valid: use 1-63 lower-case letters, digits and "
            "'-' (not first or last), one DNS label without dots"
        )
    if value in RESERVED_SUBDOMAINS:
        raise InvalidInput(f"subdomain {value!r} is reserved for Kiln")
    if value.startswith(RESERVED_PREFIXES) or value[2:4] == "--":
        raise InvalidInput(
            f"subdomain {value!r} is reserved: names starting with "
            f"{', '.join(RESERVED_PREFIXES)} (or with '--' as 3rd and 4th character) are "
            "Kiln's own"
        )
    if SESSION_ID_SHAPE.fullmatch(value):
        raise InvalidInput(
            f"subdomain {value!r} looks like a session id (16 hex digits), which name "
            "sessions' own addresses; choose a name"
        )
    return value


# ---- what a user sets ----------------------------------------------------------------------


@dataclass
class AppSpec:
    """Everything a user sets on an application; checked as a whole before any write."""

    name: str
    subdomain: str
    script: str
    description: str = ""
    runtime: str | None = None
    profile: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    public: bool = False

    def updated(self, changes: dict[str, Any]) -> AppSpec:
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise InvalidInput(f"unknown application field(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


# A change of these restarts a running application (the new instance runs them).
RESTARTING_FIELDS = frozenset({"script", "runtime", "profile", "env"})


def spec_of(db: Session, app: Application) -> AppSpec:
    runtime = db.get(Runtime, app.runtime_id) if app.runtime_id else None
    profile = db.get(ResourceProfile, app.profile_id) if app.profile_id else None
    return AppSpec(
        name=app.name,
        subdomain=app.subdomain,
        script=app.script,
        description=app.description,
        runtime=runtime.name if runtime else None,
        profile=profile.name if profile else None,
        env=dict(app.env),
        public=app.public,
    )


def _check(db: Session, project_dir: Path, spec: AppSpec, app: Application | None) -> str:
    """Every field; returns the normalised script path. Errors name their field."""
    with about_field("name"):
        check_display_name(spec.name, "application name")
    with about_field("subdomain"):
        check_subdomain(spec.subdomain)
        taken = db.scalar(select(Application.id).where(Application.subdomain == spec.subdomain))
        if taken is not None and (app is None or taken != app.id):
            raise Conflict(f"subdomain {spec.subdomain!r} is taken by another application")
    with about_field("description"):
        if len(spec.description) > 2000:
            raise InvalidInput("description is longer than 2000 characters")
    with about_field("env"):
        check_env(spec.env)
    with about_field("runtime"):
        editors.choose_runtime(db, spec.runtime, EDITOR_TERMINAL)
    with about_field("profile"):
        profile_resources(db, spec.profile)
    with about_field("script"):
        if app is not None and spec.script == app.script:
            return app.script
        return check_script(project_dir, spec.script)


def _check_unique_name(db: Session, project: Project, name: str, app_id: int | None) -> None:
    other = db.scalar(
        select(Application.id).where(Application.project_id == project.id, Application.name == name)
    )
    if other is not None and other != app_id:
        raise Conflict(f"this project already has an application named {name!r}", "name")


def _apply(db: Session, app: Application, spec: AppSpec, script: str) -> None:
    app.name = spec.name.strip()
    app.subdomain = spec.subdomain
    app.description = spec.description
    app.script = script
    app.runtime_id = editors.choose_runtime(db, spec.runtime, EDITOR_TERMINAL).id
    app.profile_id, app.cpu_millis, app.memory_bytes = profile_resources(db, spec.profile)
    app.env = dict(spec.env)
    app.public = spec.public


def _flush_unique(db: Session, app: Application) -> None:
    """Flush; a subdomain or name taken by a concurrent request is the 409 it would have
    been had that request come first."""
    try:
        with db.begin_nested():
            db.flush()
    except IntegrityError:
        raise Conflict(
            f"subdomain {app.subdomain!r} or name {app.name!r} was just taken by another "
            "application",
            "subdomain",
        ) from None


# ---- create, change, delete ----------------------------------------------------------------


def create_application(
    db: Session, project: Project, project_dir: Path, user: User, spec: AppSpec
) -> Application:
    """A new application, wanted running, with its first instance queued (flushed; the
    caller commits with the audit record and wakes the runner)."""
    script = _check(db, project_dir, spec, None)
    _check_unique_name(db, project, spec.name.strip(), None)
    app = Application(project_id=project.id, created_by_id=user.id, desired=RUNNING)
    _apply(db, app, spec, script)
    db.add(app)
    _flush_unique(db, app)
    queue_instance(db, app, replacing=False)
    return app


def update_application(
    db: Session, project: Project, project_dir: Path, app: Application, changes: dict[str, Any]
) -> bool:
    """Apply ``changes`` (flushed). True when a running application restarts for them: a
    new instance is queued and takes over once it answers."""
    spec = spec_of(db, app).updated(changes)
    script = _check(db, project_dir, spec, app)
    _check_unique_name(db, project, spec.name.strip(), app.id)
    before = spec_of(db, app)
    _apply(db, app, spec, script)
    app.updated_at = utcnow()
    _flush_unique(db, app)
    changed = {name for name in RESTARTING_FIELDS if getattr(before, name) != getattr(spec, name)}
    if changed and app.desired == RUNNING:
        restart(db, app)
        return True
    return False


def delete_application(db: Session, app: Application) -> list[Workload]:
    """Delete the application (flushed); returns its live instances, recorded as stopping,
    for the caller to stop once this is committed."""
    live = stop_instances(db, app, "the application was deleted")
    db.delete(app)
    db.flush()
    return live


# ---- desired state -------------------------------------------------------------------------


def start(db: Session, app: Application) -> None:
    """Want it running; an application already running is left alone."""
    app.desired = RUNNING
    app.crashes, app.restart_at, app.status_message = 0, None, ""
    instance = current_instance(db, app)
    if instance is None or WorkloadState(instance.state) not in PENDING_STATES | LIVE_STATES:
        queue_instance(db, app, replacing=False)
    db.flush()


def restart(db: Session, app: Application) -> None:
    """A fresh instance: beside the serving one, which keeps serving until the new one
    answers; a stopped application simply starts."""
    if app.desired != RUNNING:
        start(db, app)
        return
    app.crashes, app.restart_at, app.status_message = 0, None, ""
    pending = next_instance(db, app)
    if pending is not None and WorkloadState(pending.state) in PENDING_STATES | LIVE_STATES:
        # A replacement is on its way already: it will run what is stored now only if it has
        # not started; start over with a new one.
        stop_pending(db, pending, "replaced by a newer restart")
    serving = current_instance(db, app)
    if serving is not None and WorkloadState(serving.state) in PENDING_STATES:
        stop_pending(db, serving, "replaced by a restart before it started")
    replacing = serving is not None and WorkloadState(serving.state) in LIVE_STATES
    queue_instance(db, app, replacing=replacing)


def stop(db: Session, app: Application, by: User) -> list[Workload]:
    """Want it stopped (flushed). Returns the live instances, recorded as stopping, which
    the caller stops once committed (the runner's reconciler finishes what it cannot)."""
    app.desired = STOPPED
    app.restart_at, app.status_message = None, f"stopped by {by.username}"
    return stop_instances(db, app, f"stopped by {by.username}")


def stop_instances(db: Session, app: Application, reason: str) -> list[Workload]:
    live = []
    for instance in (next_instance(db, app), current_instance(db, app)):
        if instance is None:
            continue
        state = WorkloadState(instance.state)
        if state in PENDING_STATES:
            stop_pending(db, instance, reason)
        elif state in (WorkloadState.STARTING, WorkloadState.RUNNING):
            what = instance_name(instance)
            transitions.move(
                db,
                instance,
                Event.STOP,
                what,
                stop_cause=StopCause.REQUESTED.value,
                reason=reason[:500],
            )
            add_event(db, instance, reason)
            live.append(instance)
        elif state == WorkloadState.STOPPING:
            live.append(instance)
    db.flush()
    return live


def stop_pending(db: Session, instance: Workload, reason: str) -> None:
    transitions.move(
        db,
        instance,
        Event.CANCEL,
        instance_name(instance),
        reason=reason[:500],
        ended_at=utcnow(),
        stop_cause=StopCause.REQUESTED.value,
    )
    add_event(db, instance, reason)


# ---- instances -----------------------------------------------------------------------------


def instance_name(instance: Workload) -> str:
    return f"application instance {instance.id}"


def runner_id(instance: Workload | str) -> str:
    """The runner's id for an instance: stable, so a retried start is idempotent."""
    return f"app-{instance if isinstance(instance, str) else instance.id}"


def current_instance(db: Session, app: Application) -> Workload | None:
    return db.get(Workload, app.workload_id) if app.workload_id else None


def next_instance(db: Session, app: Application) -> Workload | None:
    return db.get(Workload, app.next_workload_id) if app.next_workload_id else None


def queue_instance(db: Session, app: Application, *, replacing: bool) -> Workload:
    """A queued instance of ``app`` as it is stored now: the serving one when nothing
    serves, else its replacement (``next_workload_id``), which takes over once it answers.
    Runs as (and counts against the quota of) the user who created the application."""
    instance = Workload(
        id=secrets.token_hex(8),
        kind=KIND,
        project_id=app.project_id,
        user_id=app.created_by_id,
        profile_id=app.profile_id,
        runtime_id=app.runtime_id,
        cpu_millis=app.cpu_millis,
        memory_bytes=app.memory_bytes,
        command=[*interpreter(app.script), app.script],
        state=WorkloadState.QUEUED,
        created_at=utcnow(),
    )
    db.add(instance)
    db.flush()
    note = " (a restart: the running instance serves meanwhile)" if replacing else ""
    add_event(db, instance, f"queued{note}", at=instance.created_at)
    if replacing:
        app.next_workload_id = instance.id
    else:
        app.workload_id = instance.id
    db.flush()
    return instance


def take_over(db: Session, app: Application, instance: Workload) -> Workload | None:
    """Make the ready replacement ``instance`` the serving one (a compare-and-set on
    ``next_workload_id``); returns the instance it replaces, to be stopped."""
    old = current_instance(db, app)
    result = db.execute(
        update(Application)
        .where(Application.id == app.id, Application.next_workload_id == instance.id)
        .values(workload_id=instance.id, next_workload_id=None)
        .execution_options(synchronize_session=False)
    )
    db.refresh(app)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        return None
    return old


# ---- reading -------------------------------------------------------------------------------


def get_application(db: Session, project: Project, ref: str) -> Application:
    """A project's application by name or id; another project's is not found."""
    row: Application | None
    if ref.isascii() and ref.isdigit() and len(ref) < 12:
        row = db.get(Application, int(ref))
    else:
        row = db.scalar(
            select(Application).where(
                Application.project_id == project.id, Application.name == ref[:100]
            )
        )
    if row is None or row.project_id != project.id:
        raise NotFound(f"application {ref[:100]!r} not found in this project")
    return row


def by_subdomain(db: Session, subdomain: str) -> Application | None:
    if not _LABEL.fullmatch(subdomain):
        return None
    return db.scalar(select(Application).where(Application.subdomain == subdomain))


def list_applications(db: Session, project: Project) -> list[Application]:
    query = (
        select(Application).where(Application.project_id == project.id).order_by(Application.name)
    )
    return list(db.scalars(query))


def visible_applications(db: Session, user: User) -> list[tuple[Application, Project]]:
    """Every application ``user`` may open (viewers and up of its project), by project."""
    query = (
        select(Application, Project)
        .join(Project, Project.id == Application.project_id)
        .where(visible_projects_clause(user))
        .order_by(Project.owner_name, Project.slug, Application.name)
    )
    return [(a, p) for a, p in db.execute(query).all()]


def instances(db: Session, apps: list[Application]) -> dict[str, Workload]:
    """The current and next instances of ``apps``, by id, in one query."""
    ids = {i for a in apps for i in (a.workload_id, a.next_workload_id) if i}
    if not ids:
        return {}
    return {w.id: w for w in db.scalars(select(Workload).where(Workload.id.in_(ids)))}


# ---- status --------------------------------------------------------------------------------

CRASH_LOOP = 3  # crashes in a row from which an application is shown as crash-looping


@dataclass(frozen=True)
class AppStatus:
    """What an application is doing, in one word and one sentence (for badges, the API, and
    the proxy's page when it cannot serve)."""

    state: str  # running, starting, waiting, crashed, crash-looping, stopping, stopped
    message: str
    serving: bool  # an instance answers requests now
    restarting: bool = False  # a replacement is starting beside the serving instance


def describe(
    app: Application, current: Workload | None, pending: Workload | None, now: dt.datetime
) -> AppStatus:
    live = PENDING_STATES | LIVE_STATES
    current_state = WorkloadState(current.state) if current is not None else None
    pending_live = pending is not None and WorkloadState(pending.state) in live
    if current_state == WorkloadState.RUNNING:
        if app.desired == STOPPED:
            return AppStatus("stopping", "stopping", serving=True)
        note = app.status_message if not pending_live else "restarting: a new instance starts"
        return AppStatus("running", note, serving=True, restarting=pending_live)
    if app.desired == STOPPED:
        if current_state in live or pending_live:
            return AppStatus("stopping", "stopping", serving=False)
        return AppStatus("stopped", app.status_message or "stopped", serving=False)
    if current_state == WorkloadState.WAITING and current is not None:
        return AppStatus("waiting", current.reason or "waiting for room in the quota", False)
    if current_state in live:
        return AppStatus("starting", "starting: waiting for the app to answer", False)
    if app.crashes:
        wait = ""
        if app.restart_at is not None:
            seconds = max(0.0, (app.restart_at - now).total_seconds())
            wait = f"; next start in {seconds:.0f} s" if seconds >= 1 else "; starting again"
        if app.crashes >= CRASH_LOOP:
            text = f"crash-looping: it ended {app.crashes} times in a row; last: "
            return AppStatus("crash-looping", f"{text}{app.status_message}{wait}", False)
        return AppStatus("crashed", f"it ended: {app.status_message}{wait}", False)
    return AppStatus("starting", "starting", serving=False)
