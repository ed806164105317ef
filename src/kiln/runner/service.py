"""The runner's gRPC service: the Runner RPCs of ``kiln/rpc/runner.proto`` over a runtime.

``RunnerServicer`` turns protobuf requests into ``WorkloadRuntime`` calls. It owns what the
runtime does not keep: per workload a small JSON record (kind, project, labels, creation time,
why it was stopped, the runtime's opaque re-attach state) under ``records_dir``, written before
the sandbox starts and again once it runs. A restarted runner reads these records and calls
``runtime.load_state`` (``reattach``), so workloads outlive the runner.

Authorization happened before any method here runs (``kiln.rpc.authz``); these methods only
validate input. The caller never names a host path: the project directory is
``projects_root/<project_id>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from kiln.rpc import runner_pb2, runner_pb2_grpc
from kiln.rpc.authz import caller_identity
from kiln.rpc.identity import Service
from kiln.runner import family
from kiln.runner.webaccess import WEB_CLIENT_KINDS, WebAccess
from kiln.runtimes.base import (
    SANDBOX_HOME,
    ExecProcess,
    ExitReason,
    NetworkPolicy,
    Placement,
    StartFailed,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadRuntime,
    WorkloadRuntimeError,
    WorkloadSpec,
    WorkloadStatus,
)
from kiln.storage.volumes import ProjectVolumes

log = logging.getLogger("kiln.runner")

VERSION = "1"
DEFAULT_STOP_GRACE = 10.0
# A session's main process when the caller names none: it only keeps the sandbox alive, the
# user's terminals are Exec'd into it and editors are started by the web tier's command.
DEFAULT_SESSION_COMMAND = ("sleep", "infinity")
DEFAULT_EXEC_SHELL = ("bash", "-l")
# Follow-mode log streams and Exec check this often whether the client went away.
POLL_SECONDS = 0.1
TIMEOUT_REASON = "timeout"
STOP_WAITS_FOR_START = 30.0
_IMAGE_KEY = re.compile(r"[0-9a-f]{64}")  # the cache's directory names: sha256 hex
MAX_TERMINAL_SIDE = 9999  # the kernel's winsize fields are 16-bit; no real terminal is larger

State = runner_pb2.WorkloadState


@dataclass
class Record:
    """What the runner keeps per workload beside the runtime's own state (JSON on disk)."""

    workload_id: str
    kind: int
    project_id: int
    user_id: int
    labels: dict[str, str]
    created_at: float
    deadline: float | None = None  # Unix time after which the workload is stopped (timeout)
    stop_reason: str = ""  # "" (not stopped), "timeout", or the caller's words
    runtime_state: dict[str, Any] | None = None  # None while starting
    lost: str = ""  # why the runtime could not re-attach (the record outlived its sandbox)
    parent_id: str = ""  # workers: the workload it dies with (family.py)
    starting: bool = field(default=False, repr=False)  # in memory only


def _timestamp(seconds: float | None) -> Any:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.UTC)


class RunnerServicer(runner_pb2_grpc.RunnerServicer):
    """Thread-safe: gRPC calls every method from its worker pool."""

    def __init__(
        self,
        runtime: WorkloadRuntime,
        *,
        projects_root: Path,
        records_dir: Path,
        max_log_bytes: int,
        web: WebAccess | None = None,
        runtimes_root: Path | None = None,
        network: NetworkPolicy | None = None,
        volumes: ProjectVolumes | None = None,
        placement: Callable[[runner_pb2.WorkloadSpec], Placement] | None = None,
    ) -> None:
        self.runtime = runtime
        # Runtimes that place workloads by owner (kubernetes): the request's tenant, project
        # and image (kubesite.placement_resolver). None: the local runtime's sandboxes.
        self.placement = placement
        self.projects_root = projects_root.resolve()
        self.volumes = volumes  # the projects' own filesystems (kiln.storage.volumes), if any
        # The runtime cache (settings.runtimes_dir): the only place image roots may come from.
        self.runtimes_root = runtimes_root.resolve() if runtimes_root is not None else None
        self.records_dir = records_dir
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_log_bytes = max_log_bytes
        self.web = web  # how sessions reach the web tier's API (webaccess.py), if at all
        self.network = network or NetworkPolicy()  # every workload's egress policy
        self._orphans = family.OrphanReaper(self.stop)
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        # Called (without arguments) on Wake and whenever a workload ends: the reconciler's
        # nudge, so it reacts at once rather than at its next periodic pass.
        self.on_change: Callable[[], None] = lambda: None
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._enforce_deadlines, daemon=True)
        self._watchdog.name = "runner-deadlines"
        self._watchdog.start()

    # ------------------------------------------------------------ records

    def _record_path(self, workload_id: str) -> Path:
        return self.records_dir / f"{workload_id}.json"

    def _save(self, record: Record) -> None:
        data = asdict(record)
        data.pop("starting")
        path = self._record_path(record.workload_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def reattach(self) -> list[str]:
        """Load every record left by a previous runner and re-attach its workload.

        Returns the ids re-attached. A record whose sandbox is gone (or that was still
        starting when the runner died) stays known, reported as failed with reason ``lost``.
        """
        attached = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                record = Record(**data)
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable workload record %s: %s", path, exc)
                continue
            with self._lock:
                if record.workload_id in self._records:
                    continue
                self._records[record.workload_id] = record
            if record.runtime_state is None:
                record.lost = record.lost or "the runner stopped while starting it"
                continue
            if record.lost:
                continue
            try:
                self.runtime.load_state(record.runtime_state)
            except WorkloadExists:
                pass  # already attached to this runtime instance
            except (WorkloadRuntimeError, ValueError, KeyError) as exc:
                log.error("cannot re-attach workload %s: %s", record.workload_id, exc)
                record.lost = f"could not re-attach after a runner restart: {exc}"
                self._save(record)
                continue
            attached.append(record.workload_id)
        log.info("re-attached %d workload(s): %s", len(attached), ", ".join(attached) or "-")
        return attached

    def close(self) -> None:
        """Stop background work and the runtime's watcher. Workloads keep running."""
        self._closing.set()
        self._watchdog.join()
        self.runtime.close()

    # -------------------------------------------------------------- status

    def _record_or_abort(self, workload_id: str, context: grpc.ServicerContext) -> Record:
        with self._lock:
            record = self._records.get(workload_id)
        if record is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no workload {workload_id!r}")
        return record

    def running(self, record: Record) -> bool:
        """Whether the workload is up now (not starting, lost or ended)."""
        if record.starting or record.lost or record.runtime_state is None:
            return False
        try:
            return self.runtime.status(record.workload_id).running
        except WorkloadNotFound:
            return False

    def status_of(self, record: Record) -> runner_pb2.WorkloadStatus:
        reply = runner_pb2.WorkloadStatus(
            workload_id=record.workload_id,
            kind=record.kind,  # type: ignore[arg-type]
            labels=record.labels,
            created_at=_timestamp(record.created_at),
        )
        if record.starting:
            reply.state = State.WORKLOAD_STATE_STARTING
            return reply
        if record.lost:
            reply.state, reply.reason = State.WORKLOAD_STATE_FAILED, ExitReason.LOST.value
            reply.message = record.lost
            return reply
        try:
            status = self.runtime.status(record.workload_id)
        except WorkloadNotFound:
            reply.state, reply.reason = State.WORKLOAD_STATE_FAILED, ExitReason.LOST.value
            reply.message = "the runtime no longer knows this workload"
            return reply
        self._fill(reply, record, status)
        return reply

    @staticmethod
    def _fill(reply: Any, record: Record, status: WorkloadStatus) -> None:
        for at, text in status.steps:
            step = reply.steps.add(text=text)
            step.at.FromDatetime(_timestamp(at))
        if status.started_at is not None:
            reply.started_at.FromDatetime(_timestamp(status.started_at))
        if status.running:
            reply.state = State.WORKLOAD_STATE_RUNNING
            reply.message = status.message
            if status.endpoint is not None:
                reply.endpoint.host, reply.endpoint.port = (
                    status.endpoint.host,
                    status.endpoint.port,
                )
            for guest, endpoint in status.port_endpoints.items():
                reply.port_endpoints[guest].host = endpoint.host
                reply.port_endpoints[guest].port = endpoint.port
            reply.memory_used_bytes = status.memory_used_bytes or 0
            return
        reply.exit_code = status.exit_code if status.exit_code is not None else 255
        if status.finished_at is not None:
            reply.finished_at.FromDatetime(_timestamp(status.finished_at))
        reply.message = status.message
        if record.stop_reason == TIMEOUT_REASON:
            reply.state, reply.reason = State.WORKLOAD_STATE_FAILED, TIMEOUT_REASON
            reply.message = "stopped: it ran past its time limit"
        elif status.reason is ExitReason.STOPPED or record.stop_reason:
            reply.state, reply.reason = State.WORKLOAD_STATE_STOPPED, ExitReason.STOPPED.value
            reply.message = record.stop_reason or status.message
        elif status.reason is ExitReason.EXITED and reply.exit_code == 0:
            reply.state, reply.reason = State.WORKLOAD_STATE_SUCCEEDED, ExitReason.EXITED.value
        else:
            reply.state = State.WORKLOAD_STATE_FAILED
            reply.reason = (status.reason or ExitReason.LOST).value

    # ---------------------------------------------------------------- RPCs

    def Ping(
        self, request: runner_pb2.PingRequest, context: grpc.ServicerContext
    ) -> runner_pb2.PingReply:
        return runner_pb2.PingReply(
            server_identity=Service.RUNNER.spiffe_id,
            caller_identity=caller_identity(context) or "",
            version=VERSION,
        )

    def Wake(
        self, request: runner_pb2.WakeRequest, context: grpc.ServicerContext
    ) -> runner_pb2.WakeReply:
        self.on_change()
        return runner_pb2.WakeReply()

    def GetStatus(
        self, request: runner_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> runner_pb2.WorkloadStatus:
        return self.status_of(self._record_or_abort(request.workload_id, context))

    def StartWorkload(
        self, request: runner_pb2.StartWorkloadRequest, context: grpc.ServicerContext
    ) -> runner_pb2.WorkloadStatus:
        proto = request.spec
        with self._lock:
            existing = self._records.get(proto.workload_id)
        if existing is not None:  # idempotent: a retry after a lost reply starts nothing
            return self.status_of(existing)
        try:
            spec = self.to_spec(proto)
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if proto.parent_workload_id:
            with self._lock:
                parent = self._records.get(proto.parent_workload_id)
            refused = family.parent_refusal(
                proto.project_id, proto.parent_workload_id, parent, self.running
            )
            if refused:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, refused)
        now = time.time()
        record = Record(
            workload_id=spec.id,
            kind=proto.kind,
            project_id=proto.project_id,
            user_id=proto.user_id,
            labels=dict(proto.labels),
            created_at=now,
            deadline=now + proto.timeout_seconds if proto.timeout_seconds > 0 else None,
            parent_id=proto.parent_workload_id,
            starting=True,
        )
        with self._lock:
            existing = self._records.setdefault(spec.id, record)
        if existing is not record:  # a concurrent start of the same id won the race
            return self.status_of(existing)
        try:
            self._save(record)
            self.runtime.start(spec)
            record.runtime_state = self.runtime.get_state(spec.id)
            record.starting = False
            self._save(record)
        except BaseException as exc:
            self._forget(record, started=record.runtime_state is not None)
            if isinstance(exc, ValueError):
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if isinstance(exc, StartFailed):
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, exc.detail)
            if isinstance(exc, WorkloadExists):
                # The runtime has state for this id that no record names (a runner that died
                # mid-start): refuse rather than adopt a sandbox we know nothing about.
                _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
            raise
        log.info(
            "started workload %s (project %d, user %d)", spec.id, record.project_id, record.user_id
        )
        return self.status_of(record)

    def _forget(self, record: Record, *, started: bool) -> None:
        """Undo a start that failed: nothing may stay behind."""
        if started:
            with contextlib.suppress(WorkloadRuntimeError):
                self.runtime.stop(record.workload_id, grace=0)
                self.runtime.remove(record.workload_id)
        with self._lock:
            self._records.pop(record.workload_id, None)
        self._record_path(record.workload_id).unlink(missing_ok=True)

    def to_spec(self, proto: runner_pb2.WorkloadSpec) -> WorkloadSpec:
        """The runtime's spec for a request; ``ValueError`` names the first bad field."""
        if proto.project_id <= 0:
            raise ValueError("project_id must be a positive project id")
        project_dir = self.projects_root / str(proto.project_id)
        if self.volumes is not None:  # never a workload on an unmounted mount point
            self.volumes.ensure_mounted(proto.project_id)
        # A symlink in the projects root must not point a sandbox at some other host path.
        if project_dir.is_symlink() or not project_dir.is_dir():
            raise ValueError(f"project {proto.project_id} has no files on this runner")
        # A pod's image is its root; the runner's unpacked cache is for sandboxes only.
        runtime_root = self.runtime_root(proto.runtime) if self.placement is None else None
        if proto.resources.gpu > 0:
            raise ValueError("the local runtime has no GPUs; request gpu = 0")
        if proto.timeout_seconds < 0 or proto.log_limit_bytes < 0:
            raise ValueError("timeout_seconds and log_limit_bytes must not be negative")
        command = tuple(proto.command)
        if not command and proto.kind == runner_pb2.WORKLOAD_KIND_SESSION:
            command = DEFAULT_SESSION_COMMAND
        working_dir = proto.working_dir or SANDBOX_HOME
        if not working_dir.startswith("/"):
            working_dir = f"{SANDBOX_HOME}/{working_dir}"
        defaults = WorkloadSpec(id="defaults", project_dir=project_dir, command=("true",))
        resources = proto.resources
        spec = WorkloadSpec(
            id=proto.workload_id,
            project_dir=project_dir,
            command=command,
            env=dict(proto.env),
            cpu=resources.cpu or defaults.cpu,
            memory_bytes=resources.memory_bytes or defaults.memory_bytes,
            pids_max=resources.pids or defaults.pids_max,
            port=proto.port or None,
            extra_ports=tuple(proto.extra_ports),
            # The runner's setting is both the default and the ceiling.
            log_max_bytes=min(proto.log_limit_bytes or self.max_log_bytes, self.max_log_bytes),
            working_dir=working_dir,
            runtime_root=runtime_root,
            project_mount=not proto.image_home,
            network=self.network,
            placement=self.placement(proto) if self.placement is not None else None,
        )
        if self.web is not None and proto.kind in WEB_CLIENT_KINDS:
            spec = self.web.wire(spec)
        spec.check()
        return spec

    def runtime_root(self, ref: runner_pb2.RuntimeRef) -> Path | None:
        """The image root a request names, or None for the built-in runtime.

        The caller names a path, so it is held to the one shape the cache makes,
        ``<runtimes_root>/rootfs/<64 hex>``, with no symlink on the way: a caller can pick an
        image the cache holds, never some other host directory as a sandbox's root.
        """
        if not ref.rootfs:
            if ref.image:
                raise ValueError("runtime.image needs runtime.rootfs (the unpacked image)")
            return None
        if self.runtimes_root is None:
            raise ValueError("this runner has no runtime cache: only the built-in runtime")
        path = Path(ref.rootfs)
        cache = self.runtimes_root / "rootfs"
        if (
            not path.is_absolute()
            or path.parent != cache
            or not _IMAGE_KEY.fullmatch(path.name)
            or os.path.realpath(path) != str(path)
        ):
            raise ValueError(
                f"runtime.rootfs {ref.rootfs[:200]!r} is not an image in this runner's "
                f"runtime cache ({cache}/<sha256>)"
            )
        if not path.is_dir():
            raise ValueError(f"runtime image {path.name[:12]} is not in this runner's cache")
        return path

    def StopWorkload(
        self, request: runner_pb2.StopWorkloadRequest, context: grpc.ServicerContext
    ) -> runner_pb2.WorkloadStatus:
        record = self._record_or_abort(request.workload_id, context)
        # A stop that arrives mid-start (a user stopping a session the reconciler is starting)
        # waits for the start to finish, then stops it: no "retry later" for the caller.
        deadline = time.monotonic() + STOP_WAITS_FOR_START
        while record.starting and time.monotonic() < deadline:
            if self._closing.wait(POLL_SECONDS / 2):
                break
        if record.starting:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "the workload is starting; retry")
        grace = float(request.grace_seconds) if request.grace_seconds > 0 else DEFAULT_STOP_GRACE
        self.stop(record, request.reason or "stopped on request", grace)
        return self.status_of(record)

    def stop(self, record: Record, reason: str, grace: float) -> None:
        if record.lost or record.runtime_state is None:
            return
        try:
            if not self.runtime.status(record.workload_id).running:
                return  # idempotent: an ended workload keeps its own outcome
            if not record.stop_reason:  # the cause is recorded before the kill (see states.py)
                record.stop_reason = reason
                self._save(record)
            self.runtime.stop(record.workload_id, grace=grace)
        except WorkloadNotFound:
            return
        log.info("stopped workload %s: %s", record.workload_id, reason)

    def _enforce_deadlines(self) -> None:
        while not self._closing.wait(1.0):
            with self._lock:
                records = list(self._records.values())
            try:
                self._orphans.sweep(records, self.running)
            except Exception:
                log.exception("looking for workers whose parent ended failed")
            now = time.time()
            with self._lock:
                due = [r for r in self._records.values() if r.deadline and r.deadline <= now]
            for record in due:
                record.deadline = None  # once; the record is saved by stop()
                try:
                    self.stop(record, TIMEOUT_REASON, DEFAULT_STOP_GRACE)
                except Exception:
                    log.exception("stopping %s at its deadline failed", record.workload_id)

    def StreamLogs(
        self, request: runner_pb2.StreamLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[runner_pb2.LogChunk]:
        record = self._record_or_abort(request.workload_id, context)
        if request.offset < 0:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "offset must not be negative")
        offset = request.offset
        # Not runtime.logs(follow=True): it blocks without yielding while the workload is
        # quiet, so a client that went away would hold this thread until the workload ends.
        while True:
            try:
                status = None if record.starting else self.runtime.status(record.workload_id)
            except WorkloadNotFound:
                return  # lost: there is nothing stored to read
            if status is not None and status.log_bytes > offset:
                for data in self.runtime.logs(record.workload_id, since=offset):
                    yield runner_pb2.LogChunk(
                        offset=offset, data=data, truncated=status.log_truncated
                    )
                    offset += len(data)
            # Output is fully stored before the runtime reports the end, so once it has ended
            # the read above got everything.
            ended = status is not None and not status.running
            if not request.follow or ended or record.lost:
                return
            if not context.is_active() or self._closing.wait(POLL_SECONDS):
                return

    def Exec(
        self, request_iterator: Iterator[runner_pb2.ExecInput], context: grpc.ServicerContext
    ) -> Iterator[runner_pb2.ExecOutput]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("start"):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
        start = first.start
        record = self._record_or_abort(start.workload_id, context)
        argv = list(start.command) or list(DEFAULT_EXEC_SHELL)
        if start.rows > MAX_TERMINAL_SIDE or start.cols > MAX_TERMINAL_SIDE:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "rows and cols must be <= 9999")
        try:
            process = self.runtime.exec(
                record.workload_id,
                argv,
                tty=start.tty,
                env=dict(start.env),
                rows=start.rows or 24,
                cols=start.cols or 80,
            )
        except WorkloadNotFound:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no workload {start.workload_id!r}")
        except ValueError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WorkloadRuntimeError as exc:  # not running (ended, or still starting)
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        with process:
            # A client that goes away ends the call: kill the process so both loops end.
            context.add_callback(lambda: _kill_if_running(process))
            feeder = threading.Thread(
                target=_feed_input, args=(request_iterator, process), daemon=True
            )
            feeder.name = f"exec-input-{record.workload_id}"
            feeder.start()
            keep = (
                functools.partial(self.runtime.append_log, record.workload_id)
                if start.tty
                else None
            )
            yield from _relay_output(process, context, keep)
            if not context.is_active():
                return  # nobody to tell the exit status; leaving the block kills the process
            try:
                code = process.wait(timeout=10)
            except TimeoutError:  # output ended but it lingers (closed its stdout): end it
                process.kill()
                code = process.wait(timeout=10)
            yield runner_pb2.ExecOutput(exit=runner_pb2.ExecExit(exit_code=code, reason="exited"))


def _feed_input(requests: Iterator[runner_pb2.ExecInput], process: ExecProcess) -> None:
    """Client → process: stdin bytes, resizes, end of input. Ends with the call."""
    try:
        for message in requests:
            kind = message.WhichOneof("input")
            if kind == "stdin":
                process.write(message.stdin)
            elif kind == "resize":
                size = message.resize
                process.resize(min(size.rows, MAX_TERMINAL_SIDE), min(size.cols, MAX_TERMINAL_SIDE))
            elif kind == "close_stdin":
                process.close_stdin()
    except (OSError, ValueError, grpc.RpcError):
        # The process is gone (EPIPE/EBADF) or the call was cancelled: nothing to feed.
        pass


def _kill_if_running(process: ExecProcess) -> None:
    if process.poll() is None:
        process.kill()


def _relay_output(
    process: ExecProcess,
    context: grpc.ServicerContext,
    keep: Callable[[bytes], None] | None = None,
) -> Iterator[runner_pb2.ExecOutput]:
    """Process → client, until end of output (or the client went away); ``keep`` also
    stores a terminal's output in the workload's console log."""
    while context.is_active():
        try:
            data = process.read(65536, timeout=POLL_SECONDS)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        if keep is not None:
            with contextlib.suppress(WorkloadRuntimeError):
                keep(data)
        yield runner_pb2.ExecOutput(stdout=data)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
