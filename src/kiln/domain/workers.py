"""The Workers API (CML's): a running session launches workers — more sandboxes of its project
running ``python3 SCRIPT [ARGS]`` or ``python3 -c CODE`` — lists, awaits and stops them.

A worker is a ``Workload`` of kind ``worker`` whose ``parent_id`` is its session. The runner
starts it with ``parent_workload_id`` (the session's runner id) and stops it when the session
ends, whoever ends it, also across runner restarts (``kiln.runner.family``): a worker never
outlives its session. The rows follow: ``settle_children`` records how a session's workers
ended once the session did; ``settle_orphans`` does it for every such session (the
reconciler's pass).

A launch is checked as a whole before any row is written — count, kernel, script or code,
arguments, environment, resources against the resource profiles and the user's quota — so a
bad request starts nothing. Once acknowledged, each worker starts on its own: one the runner
refuses is a worker in state ``failed`` with the reason, as for sessions.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain import jobs, sessions
from kiln.domain.control import WorkloadControl
from kiln.domain.errors import Conflict, InvalidInput, KilnError, NotFound
from kiln.domain.projects import list_env
from kiln.domain.resources import (
    Resources,
    check_request_fits_a_profile,
    quota_wait_reason,
    user_quota,
)
from kiln.domain.transitions import move
from kiln.rpc import runner_pb2 as pb
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    Event,
    IllegalTransition,
    StopCause,
    WorkloadState,
    stop_event,
)
from kiln.settings import Settings

KIND = "worker"
MAX_PER_LAUNCH = 32
MAX_LIVE_PER_SESSION = 64
MAX_LISTED = 500  # a session's newest workers; older ones are still in the database
MAX_CODE_BYTES = 64 * 1024  # well under Linux's 128 KiB limit for one argument
KERNELS = ("python3",)  # CML also knows r and scala; Kiln's runtimes are Python
# A worker still queued this long after its launch was left behind by a web process that
# stopped between acknowledging and starting it: it will never start.
START_GRACE = dt.timedelta(minutes=2)
_ENDED = {pb.WORKLOAD_STATE_SUCCEEDED, pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_STOPPED}
_NOT_OVER = [s.value for s in PENDING_STATES | LIVE_STATES]
# A session in these states takes its workers with it.
ENDING = TERMINAL_STATES | {WorkloadState.STOPPING}


@dataclass(frozen=True)
class LaunchRequest:
    """``launch_workers(n, cpu, memory, nvidia_gpu, kernel, script | code, env, args)``."""

    n: int
    cpu: float  # vCPU
    memory: float  # GiB, as in CML
    gpu: int = 0
    kernel: str = "python3"
    script: str | None = None
    code: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def runner_id(worker: Workload) -> str:
    return f"worker-{worker.id}"


def _what(worker: Workload) -> str:
    return f"worker {worker.id}"


# ---- checking a launch ---------------------------------------------------------------------


def _resources(db: Session, request: LaunchRequest) -> Resources:
    """One worker's share, refused when no resource profile is that large."""
    for name, value in (("cpu", request.cpu), ("memory", request.memory)):
        if not math.isfinite(value) or value <= 0:
            raise InvalidInput(f"{name} must be a positive number")
    if request.gpu != 0:
        raise InvalidInput("nvidia_gpu: this site has no GPUs for workers; ask for 0")
    wanted = Resources(round(request.cpu * 1000), round(request.memory * 1024**3)).check()
    check_request_fits_a_profile(db, wanted)
    return wanted


def _quota(
    db: Session, settings: Settings, user: User, total: Resources, n: int, project: Project | None
) -> None:
    """All ``n`` must fit the owner's quota now: a worker launch does not wait for room."""
    quota = user_quota(db, settings, user)
    if not total.fits(quota):
        raise InvalidInput(
            f"{n} worker(s) need {total.cpu_millis / 1000:g} vCPU and "
            f"{total.memory_bytes / 1024**3:.2f} GiB together, more than {user.username}'s "
            f"whole quota ({quota.cpu_millis / 1000:g} vCPU, {quota.memory_bytes / 1024**3:.1f} "
            "GiB); ask for fewer or smaller workers"
        )
    waiting = quota_wait_reason(db, settings, user, total, project)
    if waiting is not None:
        now = waiting.removeprefix("waiting for quota: ")
        raise Conflict(f"not started, no room in the quota now ({now}); stop something first")


def _command(project_dir: Path, request: LaunchRequest) -> list[str]:
    if request.kernel not in KERNELS:
        raise InvalidInput(f"kernel {request.kernel[:40]!r}: workers run {', '.join(KERNELS)}")
    if (request.script is None) == (request.code is None):
        raise InvalidInput("give either script (a file in the project) or code, not both")
    if request.code is not None:
        if not request.code.strip():
            raise InvalidInput("code is empty")
        if len(request.code.encode()) > MAX_CODE_BYTES:
            raise InvalidInput(
                f"code is longer than {MAX_CODE_BYTES // 1024} KiB; put it in a script"
            )
        if request.args:
            raise InvalidInput("args go with a script, not with code")
        return ["python3", "-c", request.code]
    script = jobs.check_script(project_dir, request.script or "")
    if len(request.args) > jobs.MAX_ARGUMENTS:
        raise InvalidInput(f"at most {jobs.MAX_ARGUMENTS} args")
    if any(len(a) > jobs.MAX_ARGUMENT_LENGTH for a in request.args):
        raise InvalidInput(f"each arg is at most {jobs.MAX_ARGUMENT_LENGTH} characters")
    return [*jobs.interpreter(script), script, *request.args]


def _live_children(db: Session, session: Workload) -> int:
    count = db.scalar(
        select(func.count())
        .select_from(Workload)
        .where(Workload.parent_id == session.id, Workload.state.in_(_NOT_OVER))
    )
    return int(count or 0)


def create_workers(
    db: Session,
    settings: Settings,
    project_dir: Path,
    session: Workload,
    user: User,
    request: LaunchRequest,
) -> list[Workload]:
    """``n`` queued workers of ``session`` (flushed; the caller commits, then starts each).
    Raises a 4xx and writes nothing when any part of the request is wrong."""
    if session.state != WorkloadState.RUNNING:
        raise Conflict(f"session {session.id} is {session.state}; workers need it running")
    if not 1 <= request.n <= MAX_PER_LAUNCH:
        raise InvalidInput(f"n must be between 1 and {MAX_PER_LAUNCH}")
    live = _live_children(db, session)
    if live + request.n > MAX_LIVE_PER_SESSION:
        raise Conflict(
            f"a session runs at most {MAX_LIVE_PER_SESSION} workers at once; it has {live}"
        )
    command = _command(project_dir, request)
    jobs.check_env(request.env)
    each = _resources(db, request)
    total = Resources(each.cpu_millis * request.n, each.memory_bytes * request.n)
    _quota(db, settings, user, total, request.n, db.get(Project, session.project_id))
    now = utcnow()
    rows = []
    for _ in range(request.n):
        row = Workload(
            id=secrets.token_hex(8),
            kind=KIND,
            project_id=session.project_id,
            user_id=session.user_id,
            parent_id=session.id,
            cpu_millis=each.cpu_millis,
            memory_bytes=each.memory_bytes,
            command=command,
            state=WorkloadState.QUEUED,
            created_at=now,
        )
        db.add(row)
        rows.append(row)
    db.flush()
    for row in rows:
        sessions.add_event(db, row, f"queued by session {session.id}", at=now)
    db.flush()
    return rows


# ---- starting ------------------------------------------------------------------------------


def worker_env(
    db: Session, project: Project, session: Workload, worker: Workload, extra: dict[str, str]
) -> dict[str, str]:
    """project < the launch's ``env`` < CML's own variables (they describe the worker)."""
    env = {v.name: v.value for v in list_env(db, project)}
    env.update(extra)
    env.update(
        {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": str(project.id),
            "CDSW_ENGINE_ID": worker.id,
            "CDSW_MASTER_ID": session.id,
            "KILN_PROJECT": f"{project.owner_name}/{project.slug}",
            "KILN_WORKER_ID": worker.id,
            "KILN_SESSION_ID": session.id,
        }
    )
    return env


def start_worker(
    db: Session,
    control: WorkloadControl,
    project: Project,
    session: Workload,
    worker: Workload,
    env: dict[str, str],
) -> None:
    """Claim the queued worker and have the runner start it; commits each step. A runner
    problem never raises: the worker ends ``failed`` with the reason."""
    spec = pb.WorkloadSpec(
        workload_id=runner_id(worker),
        kind=pb.WORKLOAD_KIND_WORKER,
        project_id=project.id,
        user_id=worker.user_id or 0,
        command=worker.command,
        env=env,
        resources=pb.Resources(cpu=worker.cpu_millis / 1000, memory_bytes=worker.memory_bytes),
        parent_workload_id=sessions.runner_id(session),
        labels={"worker": worker.id, "session": session.id, "project": str(project.id)},
    )
    try:
        move(db, worker, Event.CLAIM, _what(worker))
    except IllegalTransition:
        db.rollback()  # stopped while queued: nothing to start
        return
    sessions.add_event(db, worker, "asking the runner for a sandbox")
    db.commit()  # no transaction stays open while the runner works
    try:
        status = control.start(spec)
    except KilnError as exc:
        _fail(db, worker, f"could not start: {exc.detail}")
        return
    try:
        if status.state in _ENDED:  # a short worker may be done already
            sessions.record_end(db, worker, status)
        else:
            started = utcnow()
            if status.HasField("started_at"):
                started = status.started_at.ToDatetime(tzinfo=dt.UTC)
            move(db, worker, Event.READY, _what(worker), started_at=started)
            sessions.add_event(db, worker, "running", at=started)
        db.commit()
    except IllegalTransition:
        db.rollback()  # stopped meanwhile: the stop records the end
        db.refresh(worker)


def _fail(db: Session, worker: Workload, reason: str) -> None:
    try:
        move(db, worker, Event.FAIL, _what(worker), reason=reason[:500], ended_at=utcnow())
    except IllegalTransition:
        db.rollback()
        return
    sessions.add_event(db, worker, reason)
    db.commit()


# ---- looking -------------------------------------------------------------------------------


def list_workers(db: Session, session: Workload, ids: list[str] | None = None) -> list[Workload]:
    """The session's workers, oldest first (the newest ``MAX_LISTED``), or exactly ``ids``:
    an id that is not one of this session's workers is not found."""
    query = select(Workload).where(Workload.parent_id == session.id, Workload.kind == KIND)
    if ids is not None:
        if len(ids) > MAX_LISTED:
            raise InvalidInput(f"name at most {MAX_LISTED} workers at once")
        wanted = list(dict.fromkeys(i[:32] for i in ids))
        rows = list(db.scalars(query.where(Workload.id.in_(wanted))))
        missing = set(wanted) - {r.id for r in rows}
        if missing:
            raise NotFound(f"no worker {sorted(missing)[0][:40]!r} in this session")
        order = {worker_id: n for n, worker_id in enumerate(wanted)}
        return sorted(rows, key=lambda r: order[r.id])
    newest = query.order_by(Workload.created_at.desc(), Workload.id.desc()).limit(MAX_LISTED)
    return list(reversed(list(db.scalars(newest))))


def refresh(db: Session, control: WorkloadControl, worker: Workload) -> None:
    """Bring a worker's state up to date with the runner; a runner that cannot be reached
    changes nothing (the next look tries again)."""
    state = WorkloadState(worker.state)
    if state == WorkloadState.QUEUED and utcnow() - worker.created_at > START_GRACE:
        _fail(db, worker, "its start was interrupted (the web tier stopped); launch it again")
        return
    if state not in LIVE_STATES:
        return
    db.commit()  # no transaction stays open while the runner answers
    try:
        status = control.status(runner_id(worker))
    except NotFound:
        if state != WorkloadState.STARTING:
            _fail(db, worker, "the runner has no record of this worker")
        return
    except KilnError:
        return
    try:
        if status.state in _ENDED:
            sessions.record_end(db, worker, status)
        elif status.state == pb.WORKLOAD_STATE_RUNNING and state == WorkloadState.STARTING:
            move(db, worker, Event.READY, _what(worker), started_at=utcnow())
            sessions.add_event(db, worker, "running")
        db.commit()
    except IllegalTransition:
        db.rollback()
        db.refresh(worker)


# ---- stopping ------------------------------------------------------------------------------


def stop_worker(
    db: Session,
    control: WorkloadControl,
    worker: Workload,
    cause: StopCause,
    who: str,
    *,
    wait: bool = True,
) -> None:
    """Stop one worker; one that already ended is left as it is. The cause is recorded
    (``stopping``) before the runner is asked, so the end reads "stopped", not "failed".
    ``RunnerUnavailable`` (503) when the runner cannot be reached: stopping again finishes.

    ``wait=False`` only records the cause and looks: for a worker the runner is stopping by
    itself (its session ended), so a caller that must not block does not wait for it.
    Another actor moving the worker meanwhile (a start, the reconciler) is not an error: the
    stop looks again at where it is now."""
    for _ in range(3):
        try:
            _stop_once(db, control, worker, cause, who, wait)
            return
        except IllegalTransition:
            db.rollback()
            db.refresh(worker)


def _stop_once(
    db: Session,
    control: WorkloadControl,
    worker: Workload,
    cause: StopCause,
    who: str,
    wait: bool,
) -> None:
    if WorkloadState(worker.state) in TERMINAL_STATES:
        return
    event = stop_event(WorkloadState(worker.state), _what(worker))
    if event is Event.CANCEL:
        move(db, worker, Event.CANCEL, _what(worker), reason=cause.reason, ended_at=utcnow())
        sessions.add_event(db, worker, f"{cause.reason} before it started")
        db.commit()
        return
    if event is Event.STOP:
        move(db, worker, Event.STOP, _what(worker), stop_cause=cause.value)
        sessions.add_event(db, worker, f"stop requested by {who}")
    db.commit()
    try:
        if wait:
            status = control.stop(runner_id(worker), reason=f"{cause.reason} ({who})")
        else:
            status = control.status(runner_id(worker))
    except NotFound:  # the runner never had it (its start failed half-way)
        move(db, worker, Event.STOPPED, _what(worker), reason=cause.reason, ended_at=utcnow())
        sessions.add_event(db, worker, cause.reason)
        db.commit()
        return
    if status.state in _ENDED:
        sessions.record_end(db, worker, status)
        db.commit()


def settle_children(
    db: Session, control: WorkloadControl, session: Workload, *, wait: bool = True
) -> None:
    """Once a session is ending or has ended, stop its workers and record how they ended.

    The runner stops them by itself (``kiln.runner.family``); here the rows catch up. A worker
    that ended on its own before keeps its own outcome; the others end "stopped: its parent
    session ended". A runner that cannot be reached leaves them for the next call; so does
    ``wait=False`` for a worker still on its way out (``stopping`` until the next call)."""
    if WorkloadState(session.state) not in ENDING:
        return
    children = db.scalars(
        select(Workload).where(Workload.parent_id == session.id, Workload.state.in_(_NOT_OVER))
    )
    for worker in list(children):
        try:
            if _ended_by_itself(db, control, worker):
                continue
            who = f"session {session.id}"
            stop_worker(db, control, worker, StopCause.PARENT_ENDED, who, wait=wait)
        except IllegalTransition:
            db.rollback()  # a concurrent request recorded it first
        except KilnError:
            db.rollback()  # the runner is out of reach: the next call finishes it


def _ended_by_itself(db: Session, control: WorkloadControl, worker: Workload) -> bool:
    """Record the worker's own ending if it exited (succeeded or failed) on its own."""
    if WorkloadState(worker.state) not in (WorkloadState.STARTING, WorkloadState.RUNNING):
        return False
    db.commit()
    try:
        status = control.status(runner_id(worker))
    except NotFound:
        return False
    if status.state not in (pb.WORKLOAD_STATE_SUCCEEDED, pb.WORKLOAD_STATE_FAILED):
        return False
    sessions.record_end(db, worker, status)
    db.commit()
    return True


def settle_orphans(db: Session, control: WorkloadControl) -> None:
    """``settle_children`` (without waiting) for every ending or ended session that still has
    workers on the books: the reconciler's pass, so that rows (and the quota they hold)
    follow a session however it ended — idle, lifetime, its sandbox dying, a runner restart."""
    parents = select(Workload.parent_id).where(Workload.kind == KIND, Workload.state.in_(_NOT_OVER))
    ended = db.scalars(
        select(Workload).where(
            Workload.id.in_(parents),
            Workload.state.in_([s.value for s in ENDING]),
        )
    )
    for session in list(ended):
        settle_children(db, control, session, wait=False)
    # Left queued by a web process that stopped between acknowledging and starting them:
    # they would hold their quota until their session ends.
    stale = db.scalars(
        select(Workload).where(
            Workload.kind == KIND,
            Workload.state == WorkloadState.QUEUED,
            Workload.created_at < utcnow() - START_GRACE,
        )
    )
    for worker in list(stale):
        refresh(db, control, worker)
