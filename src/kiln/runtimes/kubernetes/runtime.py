"""The ``kubernetes`` runtime: each workload is a pod in its tenant's namespace.

The I/O layer over ``manifests.py`` (what to send) and ``podstatus.py`` (what the answers
mean). Lifecycle reads two shared watch caches (``informer.py``: pods and pod events, one
list+watch each for the whole runtime), never a request per pod per poll.

How a workload ends, and why nothing is lost: every pod carries Kiln's finalizer. When its
container has ended (it exited, was OOM-killed, or ``stop`` deleted the pod), the *reaper*
thread reads the pod's last status and its output from the API server into this runtime's
state directory, then removes the finalizer and deletes the pod. Status and logs are then
served from those files until ``remove``. A runner that was down meanwhile finds the pod
still there (the finalizer held it) and reaps it after ``load_state``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtimes.base import (
    Endpoint,
    ExecProcess,
    ExitReason,
    Placement,
    StartFailed,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadRuntime,
    WorkloadRuntimeError,
    WorkloadSpec,
    WorkloadStatus,
    register_runtime,
)
from kiln.runtimes.kubernetes import manifests, names, podstatus
from kiln.runtimes.kubernetes.client import Kube, KubeError
from kiln.runtimes.kubernetes.execstream import PodExec, exec_argv
from kiln.runtimes.kubernetes.informer import Informer
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, PodInput, Quota, Tenant
from kiln.runtimes.kubernetes.tenancy import MANAGED, TenancyMixin

log = logging.getLogger("kiln.runtimes.kubernetes")

TRUNCATED = b"\n[kiln: output truncated at the log limit]\n"


# An ended container's log is read again after each of these pauses while the node answers
# with nothing (a workload may print nothing at all: that costs the reaper ~2 s), and after
# the first two while it answers with an error (KWOK's nodes serve no logs at all).
FINAL_LOG_PAUSES = (0.15, 0.3, 0.6, 1.0)
FINAL_LOG_ERROR_RETRIES = 2
# How long a call on a pod that has ended waits for the reaper to record its end.
REAP_WAIT = 30.0


@dataclass(frozen=True)
class KubeRuntimeConfig:
    """What the runtime needs beyond a cluster connection (from ``KubernetesSettings``)."""

    policy: ClusterPolicy = field(default_factory=ClusterPolicy)
    default_image: str = ""  # for workloads whose runtime names no image
    registry: str = ""  # Kiln's registry as the nodes reach it (host[:port]); "" = no secret
    # The pull secret's credential for a tenant (a registry token scoped to pulls).
    pull_credentials: Callable[[Tenant], tuple[str, str]] | None = None
    quota: Callable[[Tenant], Quota | None] = field(default=lambda tenant: None)
    default_tenant: Tenant = field(default_factory=lambda: Tenant("user", "kiln"))
    # The runner's own service account, bound in each namespace it creates to this
    # ClusterRole: what it may do there (and, having no binding elsewhere, nowhere else).
    runner_role: str = ""
    runner_account: tuple[str, str] | None = None  # (namespace, name)
    binding_name: str = "kiln-runner"  # that RoleBinding's name (the builder has its own)
    start_timeout: float = 300.0
    autoscaling: bool = False  # unschedulable for lack of room = wait for a new node


@dataclass
class _Workload:
    id: str
    namespace: str
    pod: str
    service: str | None
    log_max_bytes: int
    port: int | None
    # A session's web UI ports (CDSW_APP_PORT...), reached through the same Service.
    extra_ports: list[int] = field(default_factory=list)
    stop_requested: bool = False
    ended: dict[str, Any] | None = None  # the reaped ending (also on disk)
    starting: bool = False


def _state(workload: _Workload) -> dict[str, Any]:
    data = asdict(workload)
    for transient in ("ended", "starting", "stop_requested"):
        data.pop(transient)
    return {"version": 1, **data}


@register_runtime("kubernetes")
class KubernetesRuntime(TenancyMixin, WorkloadRuntime):
    """Workloads as pods. ``state_dir`` keeps each ended workload's status and output."""

    def __init__(
        self, state_dir: Path, kube: Kube, config: KubeRuntimeConfig | None = None
    ) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kube = kube
        self.config = config or KubeRuntimeConfig()
        self._workloads: dict[str, _Workload] = {}
        self._lock = threading.RLock()
        self._ended = threading.Condition(self._lock)
        self._namespaces: set[str] = set()
        self._claims: set[tuple[str, int]] = set()
        self._files: set[tuple[str, str]] = set()
        self._bind_cache = {}
        self._events: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._reap_queue: queue.Queue[str | None] = queue.Queue()
        self.closed = threading.Event()  # set by close(): background helpers stop with it
        self.pods = Informer(kube, "Pod", label_selector=MANAGED)
        self.claims = Informer(kube, "PersistentVolumeClaim", label_selector=MANAGED)
        self.events = Informer(kube, "Event", field_selector="involvedObject.kind=Pod")
        self.pods.add_listener(self._on_pod)
        self.claims.add_listener(self._on_claim)
        self.events.add_listener(self._on_event)
        self.pods.start()
        self.claims.start()
        self.events.start()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="k8s-reaper")
        self._reaper.start()

    # ------------------------------------------------------------ placement

    def _placement(self, spec: WorkloadSpec) -> tuple[Tenant, int, str, str]:
        place = spec.placement or Placement()
        tenant = (
            Tenant(place.tenant_kind, place.tenant) if place.tenant else self.config.default_tenant
        )
        image = place.image or self.config.default_image
        if not image:
            raise StartFailed(
                "this runtime has no image to run: the runtime names none and the site sets "
                "no default (kubernetes.default_image)"
            )
        if place.project_id <= 0:
            raise ValueError("the kubernetes runtime needs the workload's project id")
        if not spec.project_mount and not place.image:
            # The image's own /home/cdsw (a model replica's built code) must be named: the
            # site's default image holds no project's code.
            raise StartFailed("a workload on its image's own /home/cdsw needs its image named")
        return tenant, place.project_id, image, place.kind

    # ------------------------------------------------------------ start

    def start(self, spec: WorkloadSpec) -> Endpoint | None:
        spec.check()
        tenant, project_id, image, kind = self._placement(spec)
        if spec.writable_binds or spec.max_file_bytes is not None:
            # A restricted pod mounts no host path, and Kubernetes sets no RLIMIT_FSIZE.
            raise StartFailed(
                "the kubernetes runtime cannot give a pod a writable host path or a file "
                "size limit (a build's install pod reads its output through exec instead)"
            )
        config_maps, files = self.files_for(tenant.namespace, spec.readonly_binds)
        work = PodInput(spec, tenant, project_id, image, kind, files=tuple(files))
        pod_manifest = manifests.pod(self.config.policy, work)  # checks before any request
        service_manifest = manifests.service(work)
        workload = _Workload(
            spec.id,
            tenant.namespace,
            pod_manifest["metadata"]["name"],
            service_manifest["metadata"]["name"] if service_manifest else None,
            spec.log_max_bytes,
            spec.port,
            list(spec.extra_ports) if service_manifest else [],
            starting=True,
        )
        with self._lock:
            if spec.id in self._workloads:
                raise WorkloadExists(f"workload {spec.id!r} exists")
            self._workloads[spec.id] = workload
        created = False
        try:
            self.ensure_namespace(tenant)
            if manifests.mounts_project(spec):
                self.ensure_project(tenant.namespace, project_id, spec.project_dir)
            self.ensure_config_maps(config_maps)
            try:
                self.pods.observe(self.kube.create(pod_manifest))
            except KubeError as exc:
                if exc.status == 409:
                    raise WorkloadExists(f"a pod for {spec.id!r} exists already") from None
                failure = podstatus.quota_failure(exc.message)
                if failure is not None:
                    raise StartFailed(failure.message) from None
                raise StartFailed(f"the cluster refused the pod: {exc.message}") from None
            created = True
            if service_manifest is not None:
                self.kube.apply(service_manifest)
            self._wait_started(workload)
        except BaseException as exc:
            with self._lock:
                self._workloads.pop(spec.id, None)
            if created:
                self._delete_objects(workload)
            if isinstance(exc, KubeError):
                raise StartFailed(f"the cluster refused a request: {exc.message}") from None
            raise
        workload.starting = False
        self._save(workload)
        if spec.port is None:
            return None
        return Endpoint(f"{workload.service}.{workload.namespace}.svc", spec.port)

    def _wait_started(self, workload: _Workload) -> None:
        """Until the container runs (or ended already); a start that cannot succeed is
        ``StartFailed`` at once, with Kubernetes' reason."""

        def check() -> Any:
            pod = self.pods.get(workload.namespace, workload.pod)
            if pod is None:
                return None
            if podstatus.is_running(pod) or podstatus.ending(pod) is not None:
                return "up"
            failure = podstatus.start_failure(pod, self.config.autoscaling)
            return failure

        try:
            outcome = self.pods.wait_for(check, self.config.start_timeout)
        except TimeoutError:
            pod = self.pods.get(workload.namespace, workload.pod) or {}
            waiting = [text for _, text in podstatus.steps(pod, self._pod_events(workload))]
            raise StartFailed(
                f"the pod did not start within {self.config.start_timeout:.0f}s"
                + (f" (last: {waiting[-1]})" if waiting else "")
            ) from None
        if isinstance(outcome, podstatus.StartFailure):
            raise StartFailed(outcome.message)

    # ------------------------------------------------------------ status

    def _get(self, workload_id: str) -> _Workload:
        with self._lock:
            workload = self._workloads.get(workload_id)
        if workload is None:
            raise WorkloadNotFound(workload_id)
        return workload

    def _pod_events(self, workload: _Workload) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events.get((workload.namespace, workload.pod), ()))

    def status(self, workload_id: str) -> WorkloadStatus:
        workload = self._get(workload_id)
        log_bytes, truncated = self._log_size(workload)
        if workload.ended is not None:
            ended = workload.ended
            return WorkloadStatus(
                workload_id,
                running=False,
                exit_code=ended["exit_code"],
                reason=ExitReason(ended["reason"]),
                message=ended["message"],
                started_at=ended.get("started_at"),
                finished_at=ended.get("finished_at"),
                log_bytes=log_bytes,
                log_truncated=truncated,
                steps=tuple((float(at), str(text)) for at, text in ended.get("steps", ())),
            )
        pod = self.pods.get(workload.namespace, workload.pod)
        if pod is None:
            if workload.starting:
                return WorkloadStatus(workload_id, running=True, message="starting")
            return WorkloadStatus(
                workload_id, False, 255, ExitReason.LOST, "the pod vanished without a record"
            )
        steps = tuple(podstatus.steps(pod, self._pod_events(workload)))
        end = podstatus.ending(pod)
        if end is not None:  # ended; the reaper is about to record it
            reason = ExitReason.STOPPED if workload.stop_requested else end.reason
            return WorkloadStatus(
                workload_id,
                running=False,
                exit_code=end.exit_code,
                reason=reason,
                message=end.message,
                started_at=podstatus.started_at(pod),
                finished_at=end.finished_at,
                steps=steps,
            )
        host = f"{workload.service}.{workload.namespace}.svc" if workload.service else ""
        endpoint = Endpoint(host, workload.port) if host and workload.port else None
        ports = {port: Endpoint(host, port) for port in workload.extra_ports} if host else {}
        failure = podstatus.start_failure(pod, self.config.autoscaling)
        return WorkloadStatus(
            workload_id,
            running=True,
            message=failure.message if failure else "",
            endpoint=endpoint,
            port_endpoints=ports,
            started_at=podstatus.started_at(pod),
            steps=steps,
        )

    # ------------------------------------------------------------ stop and reap

    def stop(self, workload_id: str, grace: float = 10.0) -> None:
        workload = self._get(workload_id)
        if workload.ended is not None:
            return
        if self._pod_ended(workload):
            self._await_record(workload)
            return
        workload.stop_requested = True
        self._save(workload)
        self.kube.delete(
            "Pod", workload.pod, workload.namespace, grace_seconds=max(1, math.ceil(grace))
        )
        self._wait_reaped(workload, grace + 60.0)

    def _pod_ended(self, workload: _Workload) -> bool:
        pod = self.pods.get(workload.namespace, workload.pod)
        return pod is not None and podstatus.ending(pod) is not None

    def _await_record(self, workload: _Workload) -> None:
        """A pod that ended but is not recorded yet: the reaper records it now (a queue entry
        for one it has recorded already is skipped), and this waits for it."""
        self._reap_queue.put(workload.id)
        self._wait_reaped(workload, REAP_WAIT)

    def _wait_reaped(self, workload: _Workload, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._ended:
            while workload.ended is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkloadRuntimeError(f"{workload.id} did not end within {timeout:.0f}s")
                self._ended.wait(remaining)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        """Informer callback: queue ended pods of known workloads for the reaper."""
        workload_id = (
            (pod.get("metadata") or {}).get("annotations", {}).get(manifests.WORKLOAD_ID_ANNOTATION)
        )
        if not workload_id:
            return
        with self._lock:
            workload = self._workloads.get(workload_id)
        if workload is None or workload.ended is not None:
            return
        if kind == "DELETED" or podstatus.ending(pod) is not None:
            self._reap_queue.put(workload_id)

    def _on_event(self, kind: str, event: dict[str, Any]) -> None:
        involved = event.get("involvedObject") or {}
        key = (str(involved.get("namespace") or ""), str(involved.get("name") or ""))
        if not key[0].startswith(names.NAMESPACE_PREFIX):
            return
        with self._lock:
            events = self._events.setdefault(key, [])
            uid = (event.get("metadata") or {}).get("uid")
            events[:] = [e for e in events if (e.get("metadata") or {}).get("uid") != uid]
            if kind != "DELETED":
                events.append(event)
            elif not events:  # (pods of another Kiln process, as the builder's, end here)
                del self._events[key]

    def _reap_loop(self) -> None:
        while True:
            workload_id = self._reap_queue.get()
            if workload_id is None:
                return
            try:
                self._reap(workload_id)
            except Exception:
                log.exception("recording the end of %s failed; retrying", workload_id)
                time.sleep(1.0)
                self._reap_queue.put(workload_id)

    def _reap(self, workload_id: str) -> None:
        with self._lock:
            workload = self._workloads.get(workload_id)
        if workload is None or workload.ended is not None:
            return
        pod = self.pods.get(workload.namespace, workload.pod)
        end = podstatus.ending(pod) if pod is not None else None
        if pod is not None and end is None:
            return  # not ended (a stale queue entry)
        directory = self._dir(workload.id)
        if pod is not None and end is not None:
            self._save_output(workload, directory)
            reason = ExitReason.STOPPED if workload.stop_requested else end.reason
            ended = {
                "exit_code": end.exit_code,
                "reason": reason.value,
                "message": end.message,
                "started_at": podstatus.started_at(pod),
                "finished_at": end.finished_at or time.time(),
                "steps": podstatus.steps(pod, self._pod_events(workload)),
            }
        else:  # deleted by someone else before we could read it
            ended = {
                "exit_code": 143 if workload.stop_requested else 255,
                "reason": (
                    ExitReason.STOPPED if workload.stop_requested else ExitReason.LOST
                ).value,
                "message": "" if workload.stop_requested else "the pod was deleted",
                "finished_at": time.time(),
            }
        _write_json(directory / "ended.json", ended)
        with self._lock:  # status() answers from the record from now on, also once the pod
            workload.ended = ended  # is gone (else it would call a deleted pod "lost")
        self._delete_objects(workload)
        with self._ended:
            self._events.pop((workload.namespace, workload.pod), None)
            self._ended.notify_all()
        self.notify_exit(workload.id)

    def _save_output(self, workload: _Workload, directory: Path) -> None:
        """The container's output as the node kept it (capped), into our state."""
        limit = workload.log_max_bytes
        data = self._final_log(workload, limit + 1)
        if len(data) > limit:
            data = data[:limit] + TRUNCATED
        _write_bytes(directory / "output.log", data)
        if data.endswith(TRUNCATED):
            (directory / "truncated").touch()

    def _final_log(self, workload: _Workload, limit_bytes: int) -> bytes:
        """An ended container's log. Right after an exit is reported a real kubelet now and
        then answers with nothing or with an error, so either is asked again a few times;
        an error that persists (a node gone, or one that serves no logs, as KWOK's) becomes
        a line in the output saying so, never a silent empty log. (Short waits: the reaper
        is one thread for every workload.)"""
        data, error = b"", None
        for attempt, pause in enumerate((0.0, *FINAL_LOG_PAUSES)):
            if error is not None and attempt > FINAL_LOG_ERROR_RETRIES:
                break
            time.sleep(pause)
            try:
                data, error = self._fetch_log(workload, limit_bytes=limit_bytes), None
            except KubeError as exc:
                error = exc
            if data:
                break
        if error is not None:
            log.warning("the output of %s could not be read: %s", workload.id, error)
            return f"[kiln: the node did not return this workload's output: {error}]\n".encode()
        return data

    def _fetch_log(self, workload: _Workload, limit_bytes: int | None = None) -> bytes:
        response = self.kube.call(
            "GET",
            f"/api/v1/namespaces/{workload.namespace}/pods/{workload.pod}/log",
            query={"container": manifests.CONTAINER, "limitBytes": limit_bytes},
            stream=True,
        )
        try:
            return bytes(response.data)
        finally:
            response.release_conn()

    def _delete_objects(self, workload: _Workload) -> None:
        """The pod (finalizer dropped first) and its Service."""
        with contextlib.suppress(KubeError):
            self.kube.patch(
                "Pod", workload.pod, workload.namespace, {"metadata": {"finalizers": None}}
            )
        self.kube.delete("Pod", workload.pod, workload.namespace, grace_seconds=0)
        if workload.service:
            self.kube.delete("Service", workload.service, workload.namespace)

    # ------------------------------------------------------------ logs

    def _log_size(self, workload: _Workload) -> tuple[int, bool]:
        directory = self._dir(workload.id)
        try:
            size = (directory / "output.log").stat().st_size
        except FileNotFoundError:
            return 0, False
        return size, (directory / "truncated").exists()

    def logs(self, workload_id: str, since: int = 0, follow: bool = False) -> Iterator[bytes]:
        workload = self._get(workload_id)
        return self._logs(workload, since, follow)

    def _logs(self, workload: _Workload, since: int, follow: bool) -> Iterator[bytes]:
        offset = since
        if workload.ended is None and self._pod_ended(workload):
            # ``poll`` answers as soon as the pod reports the exit, while the reaper is still
            # reading the output: a read now would ask the node once, and a kubelet answers an
            # ended container's log with nothing for a moment. The reaper's record is the
            # whole log, so wait for it (a reaper that is slow to come is read around).
            with contextlib.suppress(WorkloadRuntimeError):
                self._await_record(workload)
        if workload.ended is None:
            try:
                live = self._fetch_log(workload, limit_bytes=workload.log_max_bytes)
            except KubeError:
                live = b""
            if len(live) > offset:
                yield live[offset:]
                offset = len(live)
            if not follow:
                return
            while workload.ended is None:  # the reaper keeps the rest once it ended
                with self._ended:
                    self._ended.wait(1.0)
                try:
                    live = self._fetch_log(workload, limit_bytes=workload.log_max_bytes)
                except KubeError:
                    continue
                if len(live) > offset:
                    yield live[offset:]
                    offset = len(live)
        path = self._dir(workload.id) / "output.log"
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(offset)
            while chunk := f.read(65536):
                yield chunk

    # ------------------------------------------------------------ exec

    def exec(
        self,
        workload_id: str,
        argv: list[str],
        tty: bool = False,
        env: Mapping[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> ExecProcess:
        workload = self._get(workload_id)
        pod = self.pods.get(workload.namespace, workload.pod)
        if workload.ended is not None or pod is None or not podstatus.is_running(pod):
            raise WorkloadRuntimeError(f"workload {workload_id} is not running")
        from kubernetes.client import CoreV1Api

        return PodExec(
            CoreV1Api(self.kube.api),
            workload.namespace,
            workload.pod,
            manifests.CONTAINER,
            exec_argv(argv, env),
            tty,
            rows,
            cols,
        )

    # ------------------------------------------------------------ state

    def _dir(self, workload_id: str) -> Path:
        return self.state_dir / workload_id

    def _save(self, workload: _Workload) -> None:
        state = {**_state(workload), "stop_requested": workload.stop_requested}
        _write_json(self._dir(workload.id) / "workload.json", state)

    def get_state(self, workload_id: str) -> dict[str, Any]:
        return _state(self._get(workload_id))

    def load_state(self, state: Mapping[str, Any]) -> None:
        data = {k: v for k, v in state.items() if k != "version"}
        workload = _Workload(**data)
        with self._lock:
            if workload.id in self._workloads:
                raise WorkloadExists(workload.id)
            self._workloads[workload.id] = workload
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved = json.loads((self._dir(workload.id) / "workload.json").read_text())
            workload.stop_requested = bool(saved.get("stop_requested"))
        with contextlib.suppress(FileNotFoundError, ValueError):
            workload.ended = json.loads((self._dir(workload.id) / "ended.json").read_text())
        if workload.ended is None:
            pod = self.pods.get(workload.namespace, workload.pod)
            if pod is None or podstatus.ending(pod) is not None:
                self._reap_queue.put(workload.id)  # ended (or vanished) while unwatched

    def list_workloads(self) -> list[str]:
        with self._lock:
            return sorted(self._workloads)

    def remove(self, workload_id: str) -> None:
        workload = self._get(workload_id)
        if workload.ended is None and self._pod_ended(workload):
            self._await_record(workload)  # ended (poll() says so) but not yet reaped
        if workload.ended is None:
            raise WorkloadRuntimeError(f"workload {workload_id} is running; stop it first")
        self._delete_objects(workload)
        shutil.rmtree(self._dir(workload_id), ignore_errors=True)
        with self._lock:
            self._workloads.pop(workload_id, None)

    def close(self) -> None:
        self.closed.set()
        self._reap_queue.put(None)
        for informer in (self.pods, self.claims, self.events):
            informer.stop(wait=0)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _write_bytes(path, json.dumps(data).encode())
