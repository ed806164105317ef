"""One run of an application (an *instance*: a ``Workload`` of kind ``application``): start
it on the runner, see when it answers, record how it ended.

The runner's reconciler drives these (``kiln.runner.applications``); the web tier uses
``record_end`` when it stops instances itself. An instance is ``starting`` from its sandbox's
start until its app answers HTTP on ``CDSW_APP_PORT`` (any answer at all: a 500 is an app
that listens); past the start deadline it is stopped, saying so with its last output.

Model replicas (kind ``replica``, ``kiln.domain.model_replicas``) are served workloads of
the same shape, so everything below but ``launch`` serves them too: ``served`` says how
each kind is named and reached, and the caller passes the readiness probe (a replica is up
only when its model server says ``/_kiln/ready`` 200).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import update
from sqlalchemy.orm import Session

from kiln.db.app_models import Application
from kiln.db.models import Project, utcnow
from kiln.db.workload_models import Runtime, Workload
from kiln.domain import model_replicas, transitions
from kiln.domain import session_editors as editors
from kiln.domain.applications import APP_PORT, KIND, instance_name, runner_id
from kiln.domain.control import WorkloadControl
from kiln.domain.errors import KilnError, NotFound
from kiln.domain.projects import list_env
from kiln.domain.sessions import add_event
from kiln.rpc import runner_pb2 as pb
from kiln.scheduling.states import Event, IllegalTransition, StopCause, WorkloadState, outcome

ENDED = {pb.WORKLOAD_STATE_SUCCEEDED, pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_STOPPED}
PROBE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Served:
    """How the runner, people and the timeline name one kind of served workload."""

    runner_id: Callable[[Workload], str]
    name: Callable[[Workload], str]
    server: str  # what answers: "the app", "the model server"
    port: int


SERVED = {
    KIND: Served(runner_id, instance_name, "the app", APP_PORT),
    model_replicas.KIND: Served(
        model_replicas.runner_id,
        model_replicas.replica_name,
        "the model server",
        model_replicas.PORT,
    ),
}


def served(instance: Workload) -> Served:
    return SERVED[instance.kind]


def _move(db: Session, instance: Workload, event: Event, **values: object) -> None:
    transitions.move(db, instance, event, served(instance).name(instance), **values)


def app_env(db: Session, project: Project, app: Application, instance: Workload) -> dict[str, str]:
    """project < application < CML's own variables (these describe the instance)."""
    env = {v.name: v.value for v in list_env(db, project)}
    env.update(app.env)
    port = str(APP_PORT)
    env.update(
        {
            "CDSW_PROJECT": project.slug,
            "CDSW_PROJECT_ID": str(project.id),
            "CDSW_ENGINE_ID": instance.id,
            "CDSW_APP_PORT": port,
            "PORT": port,
            "KILN_PROJECT": f"{project.owner_name}/{project.slug}",
            "KILN_APPLICATION": app.name,
        }
    )
    return env


def launch(
    db: Session, client: WorkloadControl, project: Project, app: Application, instance: Workload
) -> None:
    """Claim the queued instance and start its sandbox (commits each step). A runner problem
    ends the instance ``failed`` with the reason; it never raises for one."""
    runtime = db.get(Runtime, instance.runtime_id) if instance.runtime_id is not None else None
    spec = pb.WorkloadSpec(
        workload_id=runner_id(instance),
        kind=pb.WORKLOAD_KIND_APPLICATION,
        project_id=project.id,
        user_id=instance.user_id or 0,
        runtime=editors.runtime_ref(runtime),
        command=list(instance.command),
        port=APP_PORT,
        env={**editors.image_env(runtime), **app_env(db, project, app, instance)},
        resources=pb.Resources(cpu=instance.cpu_millis / 1000, memory_bytes=instance.memory_bytes),
        labels={"application": str(app.id), "project": str(project.id)},
    )
    start_workload(db, client, instance, spec)


def start_workload(
    db: Session, client: WorkloadControl, instance: Workload, spec: pb.WorkloadSpec
) -> None:
    """Claim the queued ``instance`` and start ``spec`` for it (commits each step). A runner
    problem ends the instance ``failed`` with the reason; it never raises for one."""
    kind = served(instance)
    _move(db, instance, Event.CLAIM, reason="")
    add_event(db, instance, "asking the runner for a sandbox")
    db.commit()  # no transaction stays open while the runner works
    try:
        status = client.start(spec)
    except KilnError as exc:
        fail(db, instance, f"could not start: {exc.detail}")
        return
    if status.state in ENDED:
        record_end(db, instance, status)
        db.commit()
        return
    started = _time(status.started_at, status.HasField("started_at")) or utcnow()
    result = db.execute(
        update(Workload)
        .where(Workload.id == instance.id, Workload.state == WorkloadState.STARTING)
        .values(started_at=started, endpoint=editors.endpoint_of(status))
        .execution_options(synchronize_session=False)
    )
    db.refresh(instance)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        db.commit()  # stopped meanwhile: the reconciler's next look stops the sandbox
        return
    add_event(db, instance, "sandbox started", at=started)
    add_event(db, instance, f"waiting for {kind.server} to answer on port {kind.port}")
    db.commit()


def _time(stamp: object, present: bool) -> dt.datetime | None:
    return stamp.ToDatetime(tzinfo=dt.UTC) if present else None  # type: ignore[attr-defined]


def fail(db: Session, instance: Workload, reason: str) -> None:
    _move(db, instance, Event.FAIL, reason=reason[:500], ended_at=utcnow())
    add_event(db, instance, reason)
    db.commit()


def answers(endpoint: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does an HTTP server answer at ``endpoint`` (``host:port``)? Any status counts: an app
    that answers 500 listens (its error page is for people to read)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return False
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", "/", headers={"Host": endpoint, "User-Agent": "kiln-probe"})
        connection.getresponse().read(65536)
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class Look(Enum):
    """What one look at a live instance found."""

    STARTING = "starting"
    READY = "ready"  # answered for the first time: now running
    RUNNING = "running"
    ENDED = "ended"  # recorded terminal (this look or earlier)
    STOPPING = "stopping"
    UNKNOWN = "unknown"  # the runner did not answer: nothing changed


def observe(
    db: Session,
    client: WorkloadControl,
    instance: Workload,
    now: dt.datetime,
    start_seconds: float,
    probe: Callable[[str], bool] = answers,
) -> Look:
    """Bring a live instance up to date with the runner; a starting one becomes running once
    its app answers, or is stopped past ``start_seconds`` (committed)."""
    kind = served(instance)
    state = WorkloadState(instance.state)
    if state not in (WorkloadState.STARTING, WorkloadState.RUNNING, WorkloadState.STOPPING):
        return Look.ENDED if instance.ended_at else Look.STARTING
    db.commit()
    try:
        status = client.status(kind.runner_id(instance))
    except NotFound:
        if state == WorkloadState.STARTING and instance.started_at is None:
            return Look.STARTING  # the start may not have reached the runner yet
        fail(db, instance, "the runner has no record of this instance")
        return Look.ENDED
    except KilnError:
        return Look.UNKNOWN
    if status.state in ENDED:
        record_end(db, instance, status)
        db.commit()
        return Look.ENDED
    if state == WorkloadState.STOPPING:
        return Look.STOPPING
    if state == WorkloadState.RUNNING:
        return Look.RUNNING
    endpoint = editors.endpoint_of(status) or instance.endpoint
    if endpoint and probe(endpoint):
        started = instance.started_at or _time(status.started_at, status.HasField("started_at"))
        _move(db, instance, Event.READY, started_at=started or utcnow(), endpoint=endpoint)
        add_event(db, instance, f"{kind.server} answers: serving")
        db.commit()
        return Look.READY
    started = instance.started_at or instance.created_at
    if (now - started).total_seconds() > start_seconds:
        tail = output_tail(client, instance)
        why = f"{kind.server} did not answer on port {kind.port} within {start_seconds:.0f} s"
        _move(db, instance, Event.STOP, stop_cause=StopCause.START_TIMEOUT.value, reason=why)
        add_event(db, instance, f"{why}; its last output: {tail}" if tail else why)
        db.commit()  # the cause is durable before the kill
        with contextlib.suppress(KilnError, IllegalTransition):
            record_end(db, instance, client.stop(kind.runner_id(instance), "did not answer"))
            db.commit()
        stopping = WorkloadState(instance.state) == WorkloadState.STOPPING
        return Look.STOPPING if stopping else Look.ENDED
    return Look.STARTING


def record_end(db: Session, instance: Workload, status: pb.WorkloadStatus) -> None:
    """Record how an ended instance ended (flushed; the caller commits). A recorded stop
    cause wins over the exit status."""
    cause = StopCause(instance.stop_cause) if instance.stop_cause else None
    if cause is None and status.state == pb.WORKLOAD_STATE_STOPPED:
        cause = StopCause.REQUESTED
    exit_code = status.exit_code if status.HasField("exit_code") else None
    result = outcome(
        None if status.reason == "lost" else exit_code,
        oom_killed=status.reason == "oom",
        stop_cause=cause,
    )
    reason = result.reason
    if cause is not None and instance.reason:
        reason = instance.reason  # "stopped by alice", "did not answer ...": said at the stop
    elif status.reason == "timeout":
        reason = f"the runner ended it: {status.message or 'timeout'}"
    event = result.event
    if event in (Event.STOPPED, Event.TIME_OUT) and instance.state != WorkloadState.STOPPING:
        event = Event.FAIL  # it ended on the runner's side before our stop was recorded
    ended = _time(status.finished_at, status.HasField("finished_at")) or utcnow()
    transitions.move(
        db,
        instance,
        event,
        served(instance).name(instance),
        reason=reason[:500],
        exit_code=exit_code,
        ended_at=ended,
        stop_cause=cause.value if cause else instance.stop_cause,
    )
    add_event(db, instance, reason, at=ended)


def stop_now(db: Session, client: WorkloadControl, instances: Iterable[Workload]) -> None:
    """Stop instances already recorded as stopping, and record their ends (commits). A runner
    that cannot be reached leaves them stopping: the reconciler finishes the job."""
    for instance in instances:
        try:
            status = client.stop(
                served(instance).runner_id(instance), instance.reason or "stopped on request"
            )
        except NotFound:
            with contextlib.suppress(IllegalTransition):
                _move(db, instance, Event.STOPPED, ended_at=utcnow())
                add_event(db, instance, instance.reason or "stopped")
            db.commit()
            continue
        except KilnError:
            continue
        if status.state in ENDED:
            try:
                record_end(db, instance, status)
                db.commit()
            except IllegalTransition:
                db.rollback()  # the reconciler recorded the end first


def output_tail(client: WorkloadControl, instance: Workload, limit: int = 2000) -> str:
    """The last lines the instance printed (best effort: "" when they cannot be read)."""
    logs = getattr(client, "logs", None)
    if logs is None:
        return ""
    data = b""
    with contextlib.suppress(KilnError):
        for chunk in logs(served(instance).runner_id(instance)):
            data = (data + chunk)[-4 * limit :]
    text = data.decode(errors="replace").strip()
    return "\n".join(text.splitlines()[-20:])[-limit:]
