"""The builder: works the build queue and serves the ``kiln.builder.v1.Builder`` RPCs.

Threads: a dispatcher (claims queued builds while fewer than ``max_concurrent_builds`` run,
woken by ``Wake`` or every ``POLL_SECONDS``; every ``RECOVER_SECONDS`` it also looks for
builds whose builder died), a heartbeat (renews the claims of the builds running here), and
one thread per running build (``worker.run_claimed``). gRPC's own pool serves the RPCs.

Build workloads run through this process's own runtime, not through the runner: a build
needs build-only mounts (its inputs read-only, one output file, size-capped scratch space)
the runner's project-centred API does not express, the output is read right here, and a
lost build is retried, not re-attached. That runtime is ``local`` (``DATA_DIR/builder/
sandboxes``) or, with ``builder.runtime = kubernetes``, the ``kubernetes`` runtime under the
builder's own service account: the install step then runs as a pod (``pod_install``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import grpc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.build.target import ImageTarget
from kiln.builder import queue, worker
from kiln.builder.base import BaseImages, builder_state_dir
from kiln.db.workload_models import Workload
from kiln.rpc import builder_pb2 as pb
from kiln.rpc import builder_pb2_grpc
from kiln.rpc.authz import caller_identity
from kiln.rpc.identity import Service
from kiln.runtimes.base import NetworkPolicy, WorkloadRuntime, WorkloadRuntimeError
from kiln.runtimes.local.logsink import CHUNK, LogSink
from kiln.scheduling.states import TERMINAL_STATES
from kiln.settings import Settings
from kiln.storage.store import project_store

log = logging.getLogger("kiln.builder")

VERSION = "1"
POLL_SECONDS = 2.0
RECOVER_SECONDS = 10.0
FOLLOW_POLL = 0.5


def builder_name() -> str:
    """This builder's name in ``builds.claimed_by``: stable across its restarts on a host."""
    return os.environ.get("KILN_BUILDER_NAME") or socket.gethostname()


class Builder:
    """The queue worker. ``start`` recovers, then dispatches until ``close``."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        target: ImageTarget,
        runtime: WorkloadRuntime,
        network: NetworkPolicy,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.target = target
        self.runtime = runtime
        self.network = network
        self.name = name or builder_name()
        self.state_dir = builder_state_dir(settings)
        self.logs_dir = self.state_dir / "logs"
        self.work_dir = self.state_dir / "work"
        for path in (self.state_dir, self.logs_dir, self.work_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.bases = BaseImages(settings, target, sessions)
        # Also sets server-side git (the snapshots) to run as the workload uid.
        self.store = project_store(settings)
        self._active: dict[str, LogSink] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        # Nothing runs here yet: work directories are what a killed builder left behind.
        for leftover in self.work_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self._recover(own=True)
        self.bases.start()
        for target, name in ((self._dispatch, "build-dispatch"), (self._beat, "build-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop claiming. Builds running here are left as they are: the next start of this
        builder finds them (they carry its name), stops their sandboxes and retries them."""
        self._closing.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def active(self) -> list[str]:
        with self._lock:
            return list(self._active)

    # ------------------------------------------------------------- threads

    def _dispatch(self) -> None:
        last_recovery = time.monotonic()
        while not self._closing.is_set():
            self._wake.clear()
            try:
                if time.monotonic() - last_recovery > RECOVER_SECONDS:
                    last_recovery = time.monotonic()
                    self._recover(own=False)
                while len(self.active()) < self.settings.builder.max_concurrent_builds:
                    with self.sessions() as db:
                        claimed = queue.claim_next(db, self.settings, self.name)
                    if claimed is None or self._closing.is_set():
                        break
                    self._launch(claimed)
            except Exception:
                log.exception("the build dispatcher failed; retrying")
            self._wake.wait(POLL_SECONDS)

    def _beat(self) -> None:
        while not self._closing.wait(self.settings.builder.heartbeat_seconds):
            try:
                with self.sessions() as db:
                    queue.heartbeat(db, self.name, self.active())
            except Exception:
                log.exception("renewing build claims failed")

    def _launch(self, claimed: queue.Claimed) -> None:
        workload_id = claimed.workload.id
        sink = LogSink(self.logs_dir / f"{workload_id}.log", self.settings.builder.max_log_bytes)
        with self._lock:
            self._active[workload_id] = sink
        log.info("build %s claimed (attempt %d)", workload_id, claimed.build.attempt)

        def run() -> None:
            try:
                worker.run_claimed(
                    self.settings,
                    self.sessions,
                    claimed,
                    target=self.target,
                    runtime=self.runtime,
                    bases=self.bases,
                    sink=sink,
                    work=self.work_dir / workload_id,
                    network=self.network,
                    store=self.store,
                )
            finally:
                sink.finish()
                with self._lock:
                    self._active.pop(workload_id, None)
                self._wake.set()  # room for the next one

        thread = threading.Thread(target=run, name=f"build-{workload_id}", daemon=True)
        thread.start()

    def _recover(self, *, own: bool) -> None:
        with self.sessions() as db:
            lost = queue.recover_lost(
                db,
                self.name,
                self.settings.builder.lost_after_seconds,
                own=own,
                active=set(self.active()),
            )
        for item in lost:
            log.warning("build %s was lost with its builder: %s", item.workload_id, item.outcome)
            with (
                contextlib.suppress(OSError),
                (self.logs_dir / f"{item.workload_id}.log").open("ab") as f,
            ):
                f.write(b"\n==> the builder stopped mid-build\n")
            if item.runtime_state:
                self._clean_sandbox(item.runtime_state)
        if lost:
            self._wake.set()

    def _clean_sandbox(self, state: dict[str, object]) -> None:
        """Stop and remove the sandbox a dead builder left (its install may still run)."""
        workload_id = str(state.get("id", ""))
        try:
            self.runtime.load_state(state)
        except (WorkloadRuntimeError, ValueError, KeyError, TypeError) as exc:
            # TypeError: a state another runtime wrote (``builder.runtime`` was changed)
            log.info("no sandbox to clean up for %s: %s", workload_id, exc)
            return
        with contextlib.suppress(WorkloadRuntimeError):
            self.runtime.stop(workload_id, grace=1)
        with contextlib.suppress(WorkloadRuntimeError):
            self.runtime.remove(workload_id)

    # ---------------------------------------------------------------- logs

    def log_chunks(self, workload_id: str, offset: int, follow: bool) -> Iterator[bytes]:
        """The build's log from ``offset``; with ``follow`` until the build has ended."""
        path = self.logs_dir / f"{workload_id}.log"
        while True:
            with self._lock:
                sink = self._active.get(workload_id)
            if sink is not None:
                for chunk in sink.read(offset, follow):
                    offset += len(chunk)
                    yield chunk
            elif path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    while chunk := f.read(CHUNK):
                        offset += len(chunk)
                        yield chunk
            if not follow or self._ended(workload_id):
                if sink is None and path.exists() and path.stat().st_size > offset:
                    continue  # its last lines landed after we read
                return
            time.sleep(FOLLOW_POLL)

    def _ended(self, workload_id: str) -> bool:
        with self.sessions() as db:
            state = db.scalar(select(Workload.state).where(Workload.id == workload_id))
        return state is None or state in {str(s) for s in TERMINAL_STATES}

    def known(self, workload_id: str) -> bool:
        if (self.logs_dir / f"{workload_id}.log").exists():
            return True
        with self.sessions() as db:
            return db.get(Workload, workload_id) is not None


class BuilderServicer(builder_pb2_grpc.BuilderServicer):
    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return pb.PingReply(
            server_identity=Service.BUILDER.spiffe_id,
            caller_identity=caller_identity(context) or "",
            version=VERSION,
        )

    def Wake(self, request: pb.WakeRequest, context: grpc.ServicerContext) -> pb.WakeReply:
        self.builder.wake()
        return pb.WakeReply()

    def StreamBuildLog(
        self, request: pb.BuildLogRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogChunk]:
        build_id = request.build_id
        if not build_id or len(build_id) > 32 or not build_id.isalnum():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "build_id: 1-32 letters and digits")
        if request.offset < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offset must be >= 0")
        if not self.builder.known(build_id):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no build {build_id!r}")
        offset = request.offset
        chunks = self.builder.log_chunks(build_id, offset, request.follow)
        try:
            for data in chunks:
                if not context.is_active():
                    return
                yield pb.LogChunk(offset=offset, data=data)
                offset += len(data)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
