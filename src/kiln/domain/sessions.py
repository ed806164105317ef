"""Interactive sessions: a ``Workload`` of kind ``session`` run by the runner.

Lifecycle (every change through ``kiln.scheduling.states`` as a compare-and-set):

1. ``create_session`` writes the row (``queued``) and its first timeline event; the caller
   commits with the audit line, so an acknowledged session is durable before any runner call.
2. ``launch`` claims it (``starting``), asks the runner for a sandbox (empty command: the
   runner keeps the sandbox alive and terminals are Exec'd into it) and records ``running``
   with the runner's times, or ``failed`` with the runner's reason. A runner that cannot be
   reached fails the session at once, with that reason: a fast, clear failure.
3. ``refresh`` asks the runner about live sessions and records how they ended.
4. ``stop_session`` records the stop's cause first (``stopping``), then stops the sandbox.

A session runs on a runtime and offers its editors (``session_editors``). An editor served
over HTTP (JupyterLab) is the sandbox's main process; such a session stays ``starting`` after
its sandbox starts, until ``refresh`` finds the editor answering on its port (``running``,
"jupyterlab ready"), or stops it as a failed start when it never does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import ResourceProfile, Runtime, Workload, WorkloadEvent
from kiln.domain import session_editors as editors
from kiln.domain import transitions
from kiln.domain.control import WorkloadControl
from kiln.domain.errors import InvalidInput, KilnError, NotFound
from kiln.domain.projects import list_env
from kiln.domain.resources import Resources, quota_wait_reason
from kiln.domain.workload_tokens import session_env as token_env
from kiln.rpc import runner_pb2 as pb
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    Event,
    IllegalTransition,
    StopCause,
    WorkloadState,
    outcome,
    refusal,
    stop_event,
)
from kiln.settings import Settings

KIND = "session"
EDITORS = editors.KNOWN_EDITORS  # each runtime offers some of them (Runtime.editors)
DEFAULT_CPU_MILLIS = 1000
DEFAULT_MEMORY_BYTES = 2 * 1024**3
_ENDED = {pb.WORKLOAD_STATE_SUCCEEDED, pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_STOPPED}


def runner_id(workload: Workload) -> str:
    """The runner's id for the session: stable, so a start retried after a lost reply is
    idempotent on the runner's side."""
    return f"session-{workload.id}"


def _what(workload: Workload) -> str:
    return f"session {workload.id}"


# ---- reading -------------------------------------------------------------------------------


def get_session(db: Session, project: Project, session_id: str) -> Workload:
    """The project's session ``session_id``; another project's id is simply not found."""
    row = db.get(Workload, session_id[:32]) if session_id.isascii() else None
    if row is None or row.kind != KIND or row.project_id != project.id:
        raise NotFound(f"session {session_id[:40]!r} not found in this project")
    return row


def timelines(db: Session, ids: list[str]) -> dict[str, list[WorkloadEvent]]:
    """Each workload's events, oldest first, in one query."""
    result: dict[str, list[WorkloadEvent]] = {i: [] for i in ids}
    if ids:
        query = (
            select(WorkloadEvent)
            .where(WorkloadEvent.workload_id.in_(ids))
            .order_by(WorkloadEvent.id)
        )
        for event in db.scalars(query):
            result[event.workload_id].append(event)
    return result


def usernames(db: Session, ids: set[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    query = select(User.id, User.username).where(User.id.in_(wanted))
    return {row[0]: row[1] for row in db.execute(query)}


def profile_names(db: Session, ids: set[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    query = select(ResourceProfile.id, ResourceProfile.name).where(ResourceProfile.id.in_(wanted))
    return {row[0]: row[1] for row in db.execute(query)}


@dataclass
class SessionPage:
    items: list[Workload]
    next_cursor: str | None


def _encode_cursor(row: Workload) -> str:
    raw = json.dumps({"at": row.created_at.isoformat(), "id": row.id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    invalid = InvalidInput("cursor is not valid; use the next_cursor of a previous page")
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at, row_id = dt.datetime.fromisoformat(value["at"]), value["id"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise invalid from exc
    if at.tzinfo is None or not isinstance(row_id, str) or not 0 < len(row_id) <= 32:
        raise invalid
    return at, row_id


def list_sessions(db: Session, project: Project, limit: int, cursor: str | None) -> SessionPage:
    """The project's sessions, newest first. Workload ids are random strings, so the cursor
    is the last row's (created_at, id), not an integer id as in the other lists."""
    query: Select[Workload] = select(Workload).where(
        Workload.project_id == project.id, Workload.kind == KIND
    )
    if cursor:
        at, row_id = _decode_cursor(cursor)
        query = query.where(tuple_(Workload.created_at, Workload.id) < tuple_(at, row_id))
    query = query.order_by(Workload.created_at.desc(), Workload.id.desc()).limit(limit + 1)
    rows = list(db.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return SessionPage(rows, _encode_cursor(rows[-1]) if more and rows else None)


def live_sessions(db: Session, project: Project, limit: int) -> list[Workload]:
    """The project's sessions that have not ended (waiting, starting, running, stopping),
    newest first."""
    live = [s.value for s in PENDING_STATES | LIVE_STATES]
    query = (
        select(Workload)
        .where(Workload.project_id == project.id, Workload.kind == KIND, Workload.state.in_(live))
        .order_by(Workload.created_at.desc(), Workload.id.desc())
        .limit(limit)
    )
    return list(db.scalars(query))


# ---- state changes -------------------------------------------------------------------------


def add_event(db: Session, workload: Workload, message: str, at: dt.datetime | None = None) -> None:
    db.add(
        WorkloadEvent(
            workload_id=workload.id, state=workload.state, message=message[:1000], at=at or utcnow()
        )
    )


def move(db: Session, workload: Workload, event: Event, **values: Any) -> None:
    """The compare-and-set of ``event``; raises the state machine's refusal (409) if another
    actor moved the session first."""
    transitions.move(db, workload, event, _what(workload), **values)


def profile_resources(db: Session, profile: str | None) -> tuple[int | None, int, int]:
    """(profile id, vCPU millis, memory bytes): the named profile, else the site's default
    profile, else 1 vCPU / 2 GiB."""
    if profile is not None:
        row = db.scalar(select(ResourceProfile).where(ResourceProfile.name == profile))
        if row is None:
            names = ", ".join(db.scalars(select(ResourceProfile.name).order_by("name")))
            raise InvalidInput(
                f"no resource profile named {profile[:64]!r}; profiles: {names or 'none defined'}"
            )
    else:
        row = db.scalar(
            select(ResourceProfile)
            .where(ResourceProfile.is_default.is_(True))
            .order_by(ResourceProfile.id)
        )
    if row is None:
        return None, DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES
    if row.gpu > 0:
        raise InvalidInput(f"profile {row.name!r} needs GPUs, which this site cannot provide")
    return row.id, row.cpu_millis, row.memory_bytes


def create_session(
    db: Session,
    project: Project,
    user: User,
    editor: str,
    profile: str | None,
    runtime: str | None = None,
) -> Workload:
    """A queued session with its first timeline event (flushed; the caller commits). On the
    named runtime (default: the site's), which must offer ``editor``."""
    runtime_id = editors.choose_runtime(db, runtime, editor).id
    profile_id, cpu_millis, memory_bytes = profile_resources(db, profile)
    workload = Workload(
        id=secrets.token_hex(8),  # lower-case hex: also a valid DNS label for <id>.<domain>
        kind=KIND,
        project_id=project.id,
        user_id=user.id,
        profile_id=profile_id,
        runtime_id=runtime_id,
        cpu_millis=cpu_millis,
        memory_bytes=memory_bytes,
        command=[],
        editor=editor,
        state=WorkloadState.QUEUED,
        created_at=utcnow(),
    )
    db.add(workload)
    db.flush()
    add_event(db, workload, "queued", at=workload.created_at)
    db.flush()
    return workload


def session_env(
    db: Session, project: Project, workload: Workload, site_env: dict[str, str] | None = None
) -> dict[str, str]:
    """site < project < CML's own variables (these describe the session and must be true)."""
    env = dict(site_env or {})
    env.update({v.name: v.value for v in list_env(db, project)})
    env.update(
        {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": str(project.id),
            "CDSW_ENGINE_ID": workload.id,
            "KILN_PROJECT": f"{project.owner_name}/{project.slug}",
            "KILN_SESSION_ID": workload.id,
            "CDSW_APP_PORT": str(editors.CDSW_APP_PORT),
            "CDSW_READONLY_PORT": str(editors.CDSW_READONLY_PORT),
        }
    )
    return env


def _time(stamp: Any, present: bool) -> dt.datetime | None:
    return stamp.ToDatetime(tzinfo=dt.UTC) if present else None


def launch(
    db: Session,
    client: WorkloadControl,
    project: Project,
    workload: Workload,
    site_env: dict[str, str] | None = None,
) -> None:
    """Claim the queued session and start its sandbox; commits each step. Never raises for a
    runner problem: the session ends ``failed`` with the reason instead."""
    runtime = db.get(Runtime, workload.runtime_id) if workload.runtime_id is not None else None
    editor = editors.editor_process(workload.editor)
    spec = pb.WorkloadSpec(
        workload_id=runner_id(workload),
        kind=pb.WORKLOAD_KIND_SESSION,
        project_id=project.id,
        user_id=workload.user_id or 0,
        runtime=editors.runtime_ref(runtime),
        # No command: the runner's session keep-alive; terminals are Exec'd into it.
        command=list(editor.command),
        port=editor.port,
        # Web UIs a user runs inside the session (TensorBoard, a Dash prototype): CML's two
        # ports, reachable at app-<id> and read-only-<id> on the content domain.
        extra_ports=list(editors.WEB_UI_PORTS),
        # The image's own Env at the bottom: site, project and Kiln's variables win.
        env={
            **editors.image_env(runtime),
            **editor.env,
            **session_env(db, project, workload, site_env),
        },
        resources=pb.Resources(cpu=workload.cpu_millis / 1000, memory_bytes=workload.memory_bytes),
        labels={"session": workload.id, "project": str(project.id)},
    )
    try:
        move(db, workload, Event.CLAIM, reason="")  # no longer waiting for quota
    except IllegalTransition:
        db.rollback()  # stopped while queued, by a concurrent request: nothing to start
        return
    add_event(db, workload, "asking the runner for a sandbox")
    # The Workers API's credential, made now (only its hash is kept), durable with the claim.
    spec.env.update(token_env(db, workload))
    db.commit()  # also ends the transaction: none stays open while the runner works
    try:
        status = client.start(spec)
    except KilnError as exc:
        _fail(db, workload, f"could not start: {exc.detail}")
        return
    if status.state in _ENDED:
        record_end(db, workload, status)
        db.commit()
        return
    started = _time(status.started_at, status.HasField("started_at")) or utcnow()
    try:
        if editor.port:  # up, but ready only once the editor answers: ``refresh`` looks
            _sandbox_up(db, workload, started, editors.endpoint_of(status), status)
        else:
            move(
                db,
                workload,
                Event.READY,
                started_at=started,
                last_activity_at=utcnow(),
                ports=editors.ports_of(status),
            )
    except IllegalTransition:
        # A stop arrived while the runner was starting it (its own call to the runner was
        # told to retry): finish that stop here, or the sandbox would outlive the session.
        db.rollback()
        db.refresh(workload)
        if workload.state == WorkloadState.STOPPING:
            with contextlib.suppress(KilnError):
                record_end(db, workload, client.stop(runner_id(workload), "stopped"))
                db.commit()
        return
    add_event(db, workload, "sandbox started", at=started)
    waiting = f"waiting for {workload.editor} to answer on port {editor.port}"
    add_event(db, workload, waiting if editor.port else f"{workload.editor} ready")
    db.commit()


def _sandbox_up(
    db: Session,
    workload: Workload,
    started: dt.datetime,
    endpoint: str,
    status: pb.WorkloadStatus,
) -> None:
    """Record a started sandbox whose editor is not ready yet; it stays ``starting``."""
    result = db.execute(
        update(Workload)
        .where(Workload.id == workload.id, Workload.state == WorkloadState.STARTING)
        .values(
            started_at=started,
            endpoint=endpoint,
            ports=editors.ports_of(status),
            last_activity_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    db.refresh(workload)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise refusal(WorkloadState(workload.state), Event.READY, _what(workload))


def _look_at_editor(
    db: Session, client: WorkloadControl, workload: Workload, status: pb.WorkloadStatus
) -> None:
    """A starting session whose sandbox runs: ``running`` once its editor answers; past the
    deadline, stopped as a failed start, saying why (flushed or committed)."""
    endpoint = editors.endpoint_of(status) or workload.endpoint
    # Until ``launch`` records the sandbox (it may still be on its way back from the runner,
    # or have died), the runner's own start time counts.
    started = workload.started_at or _time(status.started_at, status.HasField("started_at"))
    readiness = editors.poll_editor(workload.editor, endpoint, started, utcnow())
    if readiness is editors.Readiness.READY:
        if workload.started_at is None:  # seen up before ``launch`` said so: say it here
            add_event(db, workload, "sandbox started", at=started)
        move(
            db,
            workload,
            Event.READY,
            started_at=started or utcnow(),
            endpoint=endpoint,
            ports=editors.ports_of(status) or workload.ports,
        )
        add_event(db, workload, f"{workload.editor} ready")
    elif readiness is editors.Readiness.TOO_LATE:
        move(db, workload, Event.STOP, stop_cause=StopCause.START_TIMEOUT.value)
        tail = editors.output_tail(_output(client, workload))
        add_event(db, workload, editors.not_ready_reason(workload.editor, tail))
        db.commit()  # the cause is durable before the kill
        with contextlib.suppress(KilnError):  # a stopping session is stopped again later
            record_end(db, workload, client.stop(runner_id(workload), "did not become ready"))


def _output(client: WorkloadControl, workload: Workload) -> list[bytes]:
    """The session's console output, when this client can read it (best effort)."""
    logs = getattr(client, "logs", None)
    with contextlib.suppress(KilnError):
        return list(logs(runner_id(workload))) if logs else []
    return []


def _fail(db: Session, workload: Workload, reason: str) -> None:
    move(db, workload, Event.FAIL, reason=reason[:500], ended_at=utcnow())
    add_event(db, workload, reason)
    db.commit()


def record_end(db: Session, workload: Workload, status: pb.WorkloadStatus) -> None:
    """Record how an ended workload ended (flushed; the caller commits). The stop cause
    recorded before the kill wins over the exit status (states.outcome)."""
    cause = StopCause(workload.stop_cause) if workload.stop_cause else None
    if cause is None and status.state == pb.WORKLOAD_STATE_STOPPED:
        cause = StopCause.REQUESTED  # stopped on the runner's side by someone on the site
    exit_code = status.exit_code if status.HasField("exit_code") else None
    result = outcome(
        None if status.reason == "lost" else exit_code,
        oom_killed=status.reason == "oom",
        stop_cause=cause,
    )
    reason = result.reason
    if cause is StopCause.REQUESTED and workload.state == WorkloadState.STOPPING:
        reason = workload.reason or reason  # "stopped by alice", written with the stop
    if status.reason == "timeout" and cause is None:
        reason = f"the runner ended it: {status.message or 'timeout'}"
    event = result.event
    if event in (Event.STOPPED, Event.TIME_OUT) and workload.state != WorkloadState.STOPPING:
        # The runner ended it without our stop being recorded first: it ended, unasked.
        event = Event.FAIL
    ended = _time(status.finished_at, status.HasField("finished_at")) or utcnow()
    move(
        db,
        workload,
        event,
        reason=reason[:500],
        exit_code=exit_code,
        ended_at=ended,
        stop_cause=cause.value if cause else workload.stop_cause,
    )
    add_event(db, workload, reason, at=ended)


def refresh(db: Session, client: WorkloadControl, workload: Workload) -> None:
    """Bring a live session's state up to date with the runner. A runner that cannot be
    reached changes nothing: the stored state is shown, and the next look tries again."""
    if WorkloadState(workload.state) not in LIVE_STATES:
        return
    db.commit()  # no transaction stays open while the runner answers
    try:
        status = client.status(runner_id(workload))
    except NotFound:
        if workload.state == WorkloadState.STARTING:
            return  # the start call may simply not have reached the runner yet
        try:
            _fail(db, workload, "the runner has no record of this session")
        except IllegalTransition:
            db.rollback()
        return
    except KilnError:
        return
    try:
        if status.state in _ENDED:
            starting = workload.state == WorkloadState.STARTING
            starting = starting and editors.has_web_editor(workload.editor)
            record_end(db, workload, status)
            if starting and (tail := editors.output_tail(_output(client, workload))):
                add_event(db, workload, f"{workload.editor} ended before it answered: {tail}")
        elif status.state == pb.WORKLOAD_STATE_RUNNING and workload.state == "starting":
            if editors.has_web_editor(workload.editor):  # ready once the editor answers
                _look_at_editor(db, client, workload, status)
            else:
                move(db, workload, Event.READY, started_at=utcnow(), ports=editors.ports_of(status))
                add_event(db, workload, "sandbox started")
        db.commit()
    except IllegalTransition:
        db.rollback()  # a concurrent request recorded it first; show what it recorded
        db.refresh(workload)


def _record_stop(db: Session, workload: Workload, by: User) -> bool:
    """Record the stop request: cancelled outright (True: nothing runs) or ``stopping``.
    The runner's reconciler may move the session at the same moment (claim a waiting one,
    record an end): then look again and act on the new state; an ended one is the 409."""
    for _ in range(3):
        event = stop_event(WorkloadState(workload.state), _what(workload))
        try:
            if event is Event.CANCEL:
                reason = f"stopped by {by.username} before it started"
                move(
                    db,
                    workload,
                    Event.CANCEL,
                    reason=reason,
                    ended_at=utcnow(),
                    stop_cause=StopCause.REQUESTED.value,
                )
                add_event(db, workload, reason)
                db.commit()
                return True
            if event is Event.STOP:
                # Who asked is the reason the session's page gives once it has ended.
                reason = f"stopped by {by.username}"
                move(db, workload, Event.STOP, stop_cause=StopCause.REQUESTED.value, reason=reason)
                add_event(db, workload, f"stop requested by {by.username}")
            return False
        except IllegalTransition:
            db.rollback()
            db.refresh(workload)
    raise refusal(WorkloadState(workload.state), Event.STOP, _what(workload))


def stop_session(db: Session, client: WorkloadControl, workload: Workload, by: User) -> None:
    """Stop a session: record the cause (``stopping``) first, then end the sandbox.

    Raises the state machine's 409 when it already ended, and ``RunnerUnavailable`` (503)
    when the runner cannot be reached: the session then stays ``stopping`` and stopping it
    again finishes the job."""
    if _record_stop(db, workload, by):
        return
    db.commit()  # the intent is durable, and no transaction stays open during the stop
    try:
        status = client.stop(runner_id(workload), reason=f"stopped by {by.username}")
    except NotFound:
        # The runner never had it (it failed before starting, or its records were lost).
        reason = workload.reason or StopCause.REQUESTED.reason  # "stopped by <who>"
        move(db, workload, Event.STOPPED, reason=reason, ended_at=utcnow())
        add_event(db, workload, reason)
        db.commit()
        return
    if status.state in _ENDED:  # StopWorkload returns once it ended; never assume it did
        try:
            record_end(db, workload, status)
            db.commit()
        except IllegalTransition:
            # The runner's reconciler saw the exit and recorded the end first: the stop
            # worked, and the caller gets the session as recorded.
            db.rollback()
            db.refresh(workload)


# ---- quota and activity --------------------------------------------------------------------


def hold_for_quota(db: Session, settings: Settings, workload: Workload, user: User) -> bool:
    """Keep a new session ``waiting`` when it does not fit the user's quota now (commits);
    the runner's reconciler starts it once room frees up. False when it may start."""
    request = Resources(workload.cpu_millis, workload.memory_bytes, workload.gpu)
    reason = quota_wait_reason(db, settings, user, request, db.get(Project, workload.project_id))
    if reason is None:
        return False
    move(db, workload, Event.BLOCK, reason=reason[:500])
    add_event(db, workload, reason)
    db.commit()
    return True


ACTIVITY_WRITE_SECONDS = 30.0  # idle timeouts are minutes: a write per half minute is plenty


class ActivityRecorder:
    """Marks sessions active (terminal input, proxied HTTP and kernel traffic) for the idle
    timeout, writing each session's ``last_activity_at`` at most every 30 s per process."""

    def __init__(self, interval: float = ACTIVITY_WRITE_SECONDS) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, session_id: str) -> bool:
        """True (once per interval) when this activity should be written."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(session_id, -self.interval) < self.interval:
                return False
            self._last[session_id] = now
            if len(self._last) > 10_000:  # forget the oldest: a bounded map
                for key in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    del self._last[key]
            return True

    @staticmethod
    def write(sessions: sessionmaker[Session], session_id: str) -> None:
        with sessions() as db:
            db.execute(
                update(Workload)
                .where(Workload.id == session_id, Workload.state == WorkloadState.RUNNING)
                .values(last_activity_at=utcnow())
            )
            db.commit()


activity = ActivityRecorder()
