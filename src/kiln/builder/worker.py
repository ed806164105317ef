"""One claimed build, run in its own thread: the pipeline wired to the database and the log.

The log is a file per build under the builder's state directory (``logs/<build>.log``, capped
like a workload's console), appended across attempts; the web tier streams it over gRPC while
the build runs and afterwards. Steps go to ``builds.steps`` as they start and end, with their
durations; the result (digests, layers) to the build row when it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kiln.build import pipeline
from kiln.build.deps import SandboxLimits, pip_environment
from kiln.build.layers import Layer
from kiln.build.pod_install import PodTarget
from kiln.build.registry_client import Reference
from kiln.build.target import ImageTarget
from kiln.builder import queue
from kiln.builder.base import BaseImages
from kiln.db.models import User, utcnow
from kiln.db.workload_models import Workload
from kiln.domain.projects import list_env
from kiln.runtimes.base import NetworkPolicy, WorkloadRuntime
from kiln.runtimes.local.logsink import LogSink
from kiln.scheduling.states import Event
from kiln.settings import Settings
from kiln.storage.store import ProjectStore

log = logging.getLogger("kiln.builder")
STOP_CHECK_SECONDS = 0.5
RUNNING_NOTE_SECONDS = 0.25


def _iso(moment: Any) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Observer:
    """``pipeline.BuildObserver`` over the database and the log file."""

    sessions: sessionmaker[Session]
    runtime: WorkloadRuntime
    workload_id: str
    sink: LogSink
    steps: list[dict[str, Any]] = field(default_factory=list)
    _checked: float = 0.0
    _stopping: bool = False
    _timer: threading.Timer | None = None
    _write_lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, data: bytes) -> None:
        self.sink.feed(data)

    def step(self, name: str, status: str, detail: str = "") -> None:
        now = utcnow()
        entry = next((s for s in self.steps if s["name"] == name), None)
        if entry is None:
            entry = {"name": name, "started_at": _iso(now)}
            self.steps.append(entry)
        entry["status"], entry["detail"] = status, detail[:500]
        if status == "running":
            # Written only if the step is still running a moment later: a step that takes
            # milliseconds costs one write (its end), a long one shows up as running.
            timer = threading.Timer(RUNNING_NOTE_SECONDS, self._write, args=(name,))
            timer.daemon = True
            self._timer = timer
            timer.start()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        entry["ended_at"] = _iso(now)
        self._write()

    def _write(self, running: str | None = None) -> None:
        with self._write_lock:
            if running is not None and not any(
                s["name"] == running and s["status"] == "running" for s in self.steps
            ):
                return  # it ended meanwhile: its end was written
            steps = [dict(s) for s in self.steps]
            with self.sessions() as db:
                queue.record(db, self.workload_id, steps=steps)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._stopping and now - self._checked >= STOP_CHECK_SECONDS:
            self._checked = now
            with self.sessions() as db:
                self._stopping = queue.is_stopping(db, self.workload_id)
        return self._stopping

    def sandbox_started(self, workload_id: str) -> None:
        state = self.runtime.get_state(workload_id)
        with self.sessions() as db:
            workload = db.get(Workload, self.workload_id)
            if workload is not None:
                workload.runtime_state = state
                db.commit()


class Cache:
    """``pipeline.DependencyCache`` over the ``build_cache`` table (per project)."""

    def __init__(self, sessions: sessionmaker[Session], project_id: int) -> None:
        self.sessions, self.project_id = sessions, project_id

    def lookup(self, key: str) -> pipeline.CachedLayer | None:
        with self.sessions() as db:
            entry = queue.cached_layer(db, self.project_id, key)
            if entry is None:
                return None
            return pipeline.CachedLayer(Layer.from_json(entry.layer), entry.repository)

    def store(self, key: str, layer: Layer, repository: str) -> None:
        with self.sessions() as db:
            queue.store_layer(db, self.project_id, key, layer.to_json(), repository)


def pod_target(db: Session, settings: Settings, claimed: queue.Claimed) -> PodTarget:
    """Where the install pod of a build runs when builds run as pods: the namespace the
    requesting user's workloads in this project run in (a team project's team's), so the
    build counts against the same quota and obeys the same network policy."""
    from kiln.runner.kubesite import build_registry_host, workload_tenant

    user_id = claimed.workload.user_id
    user = db.get(User, user_id) if user_id is not None else None
    tenant = workload_tenant(db, claimed.project, user)
    return PodTarget(tenant.kind, tenant.name, claimed.project.id, build_registry_host(settings))


def build_spec(
    settings: Settings,
    claimed: queue.Claimed,
    env: dict[str, str],
    network: NetworkPolicy,
    project_dir: Path,
    pod: PodTarget | None = None,
) -> pipeline.BuildSpec:
    b, build, project = settings.builder, claimed.build, claimed.project
    return pipeline.BuildSpec(
        build_id=build.workload_id,
        attempt=build.attempt,
        number=build.number,
        project=f"{project.owner_name}/{project.slug}",
        project_dir=project_dir,
        repository=build.repository,
        tags=tuple(build.tags),
        base=Reference.parse(build.base_image),
        commit=build.source_commit or None,
        no_cache=build.no_cache,
        env=env,
        command=tuple(build.command) or pipeline.DEFAULT_COMMAND,
        timeout_seconds=b.timeout_minutes * 60,
        max_file_bytes=b.max_file_bytes,
        limits=SandboxLimits(
            cpu=claimed.workload.cpu_millis / 1000,
            memory_bytes=claimed.workload.memory_bytes,
            pids_max=b.pids_max,
            deps_max_bytes=b.deps_max_bytes,
            tmp_bytes=b.tmp_bytes,
            log_max_bytes=b.max_log_bytes,
            network=network,
        ),
        pip_env=pip_environment(b.pip_index_url, b.pip_extra_index_url),
        serving=build.serving,
        pod=pod,
    )


def run_claimed(
    settings: Settings,
    sessions: sessionmaker[Session],
    claimed: queue.Claimed,
    *,
    target: ImageTarget,
    runtime: WorkloadRuntime,
    bases: BaseImages,
    sink: LogSink,
    work: Path,
    network: NetworkPolicy,
    store: ProjectStore,
) -> None:
    """Run one claimed build to its end and record that end. Never raises."""
    build, workload = claimed.build, claimed.workload
    if build.attempt > 1:
        sink.feed(f"\n--- attempt {build.attempt} ---\n".encode())
    with sessions() as db:
        env = {v.name: v.value for v in list_env(db, claimed.project)}
        pods = settings.builder.runtime == "kubernetes"
        pod = pod_target(db, settings, claimed) if pods else None
        queue.mark_running(db, db.get(Workload, workload.id) or workload)
    try:
        project_dir = store.project_dir(claimed.project.id)
    except Exception as exc:  # its filesystem cannot be mounted: nothing to snapshot
        log.exception("build %s: the project's files are unavailable", workload.id)
        sink.feed(f"==> failed: the project's files are unavailable: {exc}\n".encode())
        with sessions() as db:
            row = db.get(Workload, workload.id)
            if row is not None:
                queue.finish(db, row, Event.FAIL, f"the project's files are unavailable: {exc}")
        return
    spec = build_spec(settings, claimed, env, network, project_dir, pod)
    observer = Observer(sessions, runtime, workload.id, sink)
    sink.feed(f"==> build {spec.label} (attempt {spec.attempt}) from {build.base_image}\n".encode())
    event, reason, values = Event.FAIL, "", {}
    try:
        result = pipeline.run_build(
            spec,
            target=target,
            runtime=runtime,
            observer=observer,
            cache=Cache(sessions, claimed.project.id),
            work=work,
            resolve_base=bases.resolve,
        )
        event, reason = Event.SUCCEED, "image pushed"
        values = {
            "commit": result.snapshot.commit,
            "base_digest": result.base_digest,
            "dependency_key": result.dependency_key or "",
            "dependencies_cached": result.dependencies_cached if result.dependencies else None,
            "layers": result.layers_json(),
            "image_digest": result.manifest_digest,
            "config_digest": result.config_digest,
        }
        sink.feed(f"==> built {target.host}/{spec.repository}@{result.manifest_digest}\n".encode())
    except pipeline.BuildStopped as exc:
        event = Event.TIME_OUT if exc.timed_out else Event.STOPPED
        reason = exc.reason
        sink.feed(f"==> stopped: {exc.reason}\n".encode())
    except pipeline.BuildFailed as exc:
        reason = exc.reason
        sink.feed(f"==> failed: {exc.reason}\n".encode())
    except Exception as exc:  # a bug or an outage: the build fails with what is known
        log.exception("build %s failed unexpectedly", spec.label)
        reason = f"the builder failed: {type(exc).__name__}: {exc}"
        sink.feed(f"==> failed: {reason}\n".encode())
    try:
        with sessions() as db:
            row = db.get(Workload, workload.id)
            if row is not None:
                queue.finish(db, row, event, reason, **values)
    except Exception:
        log.exception("could not record the end of build %s", spec.label)
