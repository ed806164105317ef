"""The ``kubernetes`` runtime against a real API server (kiln.testing.kube: etcd,
kube-apiserver, controller manager, scheduler; KWOK's fake nodes run no container).

The runtime contract runs here too; its tests that watch the workload's own process skip
(no process runs on a fake node). What a pod's life looks like to Kiln — scheduled, pulled,
started, exited with a code, OOM-killed, stopped, re-attached after a runner restart, failing
to start for a reason Kubernetes gives — is driven through KWOK's stages (a test "exits" a
process by annotating its pod, as the kubelet would report it) and checked here.
"""

from __future__ import annotations

import base64
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.runtimes.base import (
    ExitReason,
    Placement,
    StartFailed,
    WorkloadNotFound,
    WorkloadSpec,
)
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig, names
from kiln.runtimes.kubernetes.client import Kube, KubeError
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Quota, Toleration
from kiln.testing.runtime_contract import RuntimeContract, unique_id, wait_exit

pytestmark = pytest.mark.slow

IMAGE = "registry.kiln.test/runtimes/python@sha256:" + "a" * 64
MISSING_IMAGE = "registry.kiln.test/missing:1"  # KWOK's stages fail its pull
_project_ids = itertools.count(1000)


def policy(host_path: Path) -> ClusterPolicy:
    return ClusterPolicy(
        node_selector={"kiln.dev/pool": "compute"},
        tolerations=(Toleration("kiln.dev/pool", "compute"),),
        host_path=str(host_path),
    )


def make_runtime(
    cluster: Any, state: Path, projects: Path, **config: Any
) -> Callable[[], KubernetesRuntime]:
    options: dict[str, Any] = {
        "policy": policy(projects),
        "default_image": IMAGE,
        "start_timeout": 30.0,
    }
    options.update(config)

    def make() -> KubernetesRuntime:
        kube = Kube.from_kubeconfig(str(cluster.kubeconfig))
        return KubernetesRuntime(state, kube, KubeRuntimeConfig(**options))

    return make


def close_runtimes(made: list[KubernetesRuntime]) -> None:
    """End a test's runtimes and every workload they still run."""
    for runtime in made:
        for workload_id in runtime.list_workloads():
            try:
                runtime.stop(workload_id, grace=0)
                runtime.remove(workload_id)
            except Exception:
                pass
        runtime.close()


def placed(spec: WorkloadSpec, tenant: str = "alice", project_id: int | None = None) -> Any:
    from dataclasses import replace

    project = project_id if project_id is not None else next(_project_ids)
    return replace(spec, placement=Placement("user", tenant, project, "session"))


class TestKubernetesContract(RuntimeContract):
    runs_processes = False
    no_process_reason = "KWOK's fake nodes run no container (see docs/kubernetes.md)"

    @pytest.fixture
    def runtime_factory(self, kube_cluster: Any, tmp_path: Path) -> Callable[[], Any]:
        return make_runtime(kube_cluster, tmp_path / "state", tmp_path)

    def spec(self, project: Path, script: str, **kwargs: object) -> WorkloadSpec:
        return placed(super().spec(project, script, **kwargs))


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def admin(kube_cluster: Any) -> Iterator[Kube]:
    kube = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    yield kube
    kube.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / str(next(_project_ids))
    path.mkdir()
    return path


@pytest.fixture
def runtimes(kube_cluster: Any, tmp_path: Path) -> Iterator[Callable[..., KubernetesRuntime]]:
    made: list[KubernetesRuntime] = []

    def new(**config: Any) -> KubernetesRuntime:
        runtime = make_runtime(kube_cluster, tmp_path / "state", tmp_path, **config)()
        made.append(runtime)
        return runtime

    yield new
    close_runtimes(made)


def sleeper(project: Path, tenant: str = "alice", **kwargs: Any) -> WorkloadSpec:
    spec = WorkloadSpec(
        id=unique_id("s"),
        project_dir=project,
        command=("sleep", "infinity"),
        memory_bytes=256 * 1024**2,
        cpu=0.25,
        **kwargs,
    )
    return placed(spec, tenant, int(project.name))


def exit_with(admin: Kube, runtime: KubernetesRuntime, workload_id: str, code: int,
              reason: str = "") -> None:  # fmt: skip
    """What the kubelet reports when the container's process exits (KWOK's stage)."""
    state = runtime.get_state(workload_id)
    annotations = {"kwok.kiln.dev/exit-code": str(code)}
    if reason:
        annotations["kwok.kiln.dev/exit-reason"] = reason
    admin.patch("Pod", state["pod"], state["namespace"], {"metadata": {"annotations": annotations}})


def wait_gone(
    admin: Kube, kind: str, name: str, namespace: str | None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            admin.get(kind, name, namespace)
        except KubeError as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.1)
    raise AssertionError(f"{kind} {namespace}/{name} still exists")


# ----------------------------------------------------------------- starts


def test_start_runs_a_pod_in_the_users_namespace_with_kubernetes_steps(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    runtime = runtimes(quota=lambda tenant: Quota(4000, 8 * 1024**3))
    spec = sleeper(project, tenant="Alice.Smith", port=8888)
    endpoint = runtime.start(spec)
    state = runtime.get_state(spec.id)
    namespace = state["namespace"]
    assert namespace.startswith("kiln-u-alice-smith-h")
    assert endpoint is not None and endpoint.host == f"{state['service']}.{namespace}.svc"
    status = runtime.status(spec.id)
    assert status.running and runtime.poll(spec.id) is None
    # "image pulled" comes from the kubelet's Pulled event, which the events watch may
    # deliver a moment after the pod's own status said the container runs.
    deadline = time.monotonic() + 15
    while "image pulled" not in (texts := [t for _, t in runtime.status(spec.id).steps]):
        assert time.monotonic() < deadline, texts
        time.sleep(0.1)
    assert texts[0].startswith("scheduled on node compute-")
    assert "container started" in texts
    pod = admin.get("Pod", state["pod"], namespace)
    assert pod["spec"]["nodeName"].startswith("compute-")  # the compute pool only
    ns = admin.get("Namespace", namespace)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policies, _ = admin.list("NetworkPolicy", namespace)
    assert {p["metadata"]["name"] for p in policies} == {
        "default-deny", "allow-from-web-tier", "allow-egress"
    }  # fmt: skip
    quota = admin.get("ResourceQuota", "kiln-quota", namespace)
    assert quota["spec"]["hard"]["limits.cpu"] == "4"
    claim = admin.get("PersistentVolumeClaim", f"project-{project.name}", namespace)
    deadline = time.monotonic() + 20
    while claim["status"].get("phase") != "Bound" and time.monotonic() < deadline:
        time.sleep(0.2)
        claim = admin.get("PersistentVolumeClaim", f"project-{project.name}", namespace)
    assert claim["status"]["phase"] == "Bound"  # the controller manager bound it to its PV
    volume = admin.get("PersistentVolume", claim["spec"]["volumeName"])
    assert volume["spec"]["hostPath"]["path"] == str(project)
    assert admin.get("Service", state["service"], namespace)["spec"]["ports"][0]["port"] == 8888


def test_exit_code_oom_and_cleanup(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    runtime = runtimes()
    done, oom = sleeper(project), sleeper(project)
    ended: list[str] = []
    runtime.add_exit_listener(ended.append)
    runtime.start(done)
    runtime.start(oom)
    exit_with(admin, runtime, done.id, 7)
    exit_with(admin, runtime, oom.id, 137, "OOMKilled")
    assert wait_exit(runtime, done.id) == 7
    assert wait_exit(runtime, oom.id) == 137
    assert runtime.status(done.id).reason == ExitReason.EXITED
    assert runtime.status(oom.id).reason == ExitReason.OUT_OF_MEMORY
    state = runtime.get_state(done.id)
    wait_gone(admin, "Pod", state["pod"], state["namespace"])  # reaped: finalizer dropped
    deadline = time.monotonic() + 10
    while set(ended) != {done.id, oom.id} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(ended) == {done.id, oom.id}
    # A fake node serves no logs: the output says so rather than being silently empty.
    output = b"".join(runtime.logs(done.id))
    assert output.startswith(b"[kiln: the node did not return this workload's output: "), output
    runtime.remove(done.id)
    with pytest.raises(WorkloadNotFound):
        runtime.poll(done.id)


def test_the_log_read_as_the_exit_is_seen_is_the_whole_record(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    """``poll`` answers from the pod's status before the reaper has read the output (which
    takes retries: a fake node answers a log with an error, a real kubelet now and then
    with nothing). A read at that moment waits for the reaper's record instead of asking
    the node once and answering with nothing."""
    runtime = runtimes()
    spec = sleeper(project)
    runtime.start(spec)
    exit_with(admin, runtime, spec.id, 0)
    assert wait_exit(runtime, spec.id) == 0
    output = b"".join(runtime.logs(spec.id))
    assert output.startswith(b"[kiln: the node did not return this workload's output: "), output
    runtime.remove(spec.id)


def test_stop_deletes_the_pod_and_keeps_the_outcome(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    runtime = runtimes()
    spec = sleeper(project, port=8080)
    runtime.start(spec)
    state = runtime.get_state(spec.id)
    runtime.stop(spec.id, grace=1)
    status = runtime.status(spec.id)
    assert not status.running and status.reason == ExitReason.STOPPED
    assert status.exit_code == 143  # SIGTERM, as KWOK's stage reports it
    wait_gone(admin, "Pod", state["pod"], state["namespace"])
    wait_gone(admin, "Service", state["service"], state["namespace"])
    runtime.stop(spec.id)  # stopping an ended workload does nothing


def test_a_restarted_runner_reattaches_and_sees_what_ended_meanwhile(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    first = runtimes()
    running, ending = sleeper(project), sleeper(project)
    first.start(running)
    first.start(ending)
    states = [first.get_state(running.id), first.get_state(ending.id)]
    first.close()  # the runner goes away; the pods live on (and one ends unwatched)
    admin.patch(
        "Pod",
        states[1]["pod"],
        states[1]["namespace"],
        {"metadata": {"annotations": {"kwok.kiln.dev/exit-code": "9"}}},
    )
    time.sleep(1.0)
    pod = admin.get("Pod", states[1]["pod"], states[1]["namespace"])
    assert pod["status"]["phase"] == "Failed"  # ended, and Kiln's finalizer kept the object
    second = runtimes()
    for state in states:
        second.load_state(state)
    assert second.poll(running.id) is None
    assert wait_exit(second, ending.id) == 9
    second.stop(running.id, grace=1)
    assert second.status(running.id).reason == ExitReason.STOPPED


def test_no_poll_per_pod(runtimes: Callable[..., KubernetesRuntime], project: Path) -> None:
    runtime = runtimes()
    specs = [sleeper(project) for _ in range(4)]
    runtime.start(specs[0])  # the namespace, claim and volume: once
    before = runtime.kube.requests
    for spec in specs[1:]:
        runtime.start(spec)
    per_start = (runtime.kube.requests - before) / 3
    assert per_start <= 2  # the pod's create (and nothing per poll)
    before = runtime.kube.requests
    for _ in range(200):
        for spec in specs:
            assert runtime.poll(spec.id) is None
    assert runtime.kube.requests == before  # polls read the watch cache


# ----------------------------------------------------------------- failures, at once


def test_image_pull_error_fails_the_start_at_once(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    runtime = runtimes()
    spec = placed(
        WorkloadSpec(id=unique_id(), project_dir=project, command=("true",), cpu=0.1),
        project_id=int(project.name),
    )
    from dataclasses import replace

    assert spec.placement is not None
    spec = replace(spec, placement=replace(spec.placement, image=MISSING_IMAGE))
    started = time.monotonic()
    with pytest.raises(StartFailed, match=r"cannot pull the runtime image .*missing"):
        runtime.start(spec)
    assert time.monotonic() - started < 15  # classified, not timed out (start_timeout 30)
    assert runtime.list_workloads() == []
    pods, _ = admin.list("Pod", "kiln-u-alice", labelSelector="app.kubernetes.io/managed-by")
    assert all(p["metadata"]["annotations"]["kiln.dev/workload-id"] != spec.id for p in pods)


def test_unschedulable_says_the_schedulers_reason(
    runtimes: Callable[..., KubernetesRuntime], project: Path
) -> None:
    runtime = runtimes()
    spec = sleeper(project)
    from dataclasses import replace

    huge = replace(spec, cpu=64.0)  # the fake nodes have 4 vCPU each
    with pytest.raises(StartFailed, match="no node can run it: 0/3 nodes are available"):
        runtime.start(huge)
    assert runtime.list_workloads() == []


def test_a_model_replica_runs_its_image_without_the_projects_volume(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    """A model replica serves the code that was built (its image's /home/cdsw), never the
    live project: its pod pulls the build's image, mounts no claim, and is reached through
    its Service; no project storage is made for it."""
    from dataclasses import replace

    runtime = runtimes()
    image = "registry.kiln.test/models/alice/demo@sha256:" + "d" * 64
    base = sleeper(project, project_mount=False, port=8080)
    assert base.placement is not None
    spec = replace(base, placement=replace(base.placement, kind="model-replica", image=image))
    endpoint = runtime.start(spec)
    state = runtime.get_state(spec.id)
    pod = admin.get("Pod", state["pod"], "kiln-u-alice")
    assert pod["spec"]["containers"][0]["image"] == image
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["tmp"]
    assert pod["metadata"]["labels"]["kiln.dev/kind"] == "model-replica"
    assert endpoint is not None and endpoint.port == 8080
    service = admin.get("Service", endpoint.host.split(".")[0], "kiln-u-alice")
    assert service["spec"]["ports"][0]["port"] == 8080
    claims, _ = admin.list("PersistentVolumeClaim", "kiln-u-alice")
    assert f"project-{project.name}" not in {c["metadata"]["name"] for c in claims}
    runtime.stop(spec.id, grace=0)
    wait_gone(admin, "Pod", state["pod"], "kiln-u-alice")
    wait_gone(admin, "Service", service["metadata"]["name"], "kiln-u-alice")


def test_a_sessions_web_ui_ports_are_reached_through_its_service(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path
) -> None:
    """CDSW_APP_PORT and CDSW_READONLY_PORT of a terminal session (no editor port): each has
    its endpoint at the session's Service, also for a runner that re-attached."""
    runtime = runtimes()
    spec = sleeper(project, extra_ports=(8100, 8101))
    assert runtime.start(spec) is None  # no port of its own
    status = runtime.status(spec.id)
    service = runtime.get_state(spec.id)["service"]
    assert service is not None
    host = f"{service}.kiln-u-alice.svc"
    assert {p: (e.host, e.port) for p, e in status.port_endpoints.items()} == {
        8100: (host, 8100),
        8101: (host, 8101),
    }
    ports = admin.get("Service", service, "kiln-u-alice")["spec"]["ports"]
    assert sorted(p["port"] for p in ports) == [8100, 8101]
    again = runtimes()
    again.load_state(runtime.get_state(spec.id))
    assert again.status(spec.id).port_endpoints.keys() == {8100, 8101}
    runtime.stop(spec.id, grace=0)


def test_a_workload_on_its_images_own_home_needs_its_image_named(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path, tmp_path: Path
) -> None:
    """The site's default image holds no project's code: such a start is refused in words
    rather than run on the wrong /home/cdsw."""
    runtime = runtimes()
    spec = sleeper(project, runtime_root=tmp_path, project_mount=False)
    with pytest.raises(StartFailed, match=r"image's own /home/cdsw needs its image named"):
        runtime.start(spec)
    assert runtime.list_workloads() == []
    pods, _ = admin.list("Pod", "kiln-u-alice", labelSelector="app.kubernetes.io/managed-by")
    assert all(p["metadata"]["annotations"]["kiln.dev/workload-id"] != spec.id for p in pods)


def test_read_only_files_are_one_config_map_per_namespace_and_content(
    runtimes: Callable[..., KubernetesRuntime], admin: Kube, project: Path, tmp_path: Path
) -> None:
    """The runner's /run/kiln (CA bundle, SDK) reaches pods as an immutable ConfigMap made
    once per namespace: later starts send only their pod; new content is a new map."""
    files = tmp_path / "web"
    (files / "python").mkdir(parents=True)
    (files / "ca-bundle.crt").write_bytes(b"bundle v1\n")
    (files / "python" / "probe.py").write_bytes(b"X = 1\n")
    (files / "python" / "link.py").symlink_to("/etc/passwd")  # never followed
    runtime = runtimes()
    first = sleeper(project, readonly_binds=((files, "/run/kiln"),))
    runtime.start(first)
    before = runtime.kube.requests
    runtime.start(sleeper(project, readonly_binds=((files, "/run/kiln"),)))
    assert runtime.kube.requests - before <= 2  # the pod (the map exists)
    maps, _ = admin.list("ConfigMap", "kiln-u-alice", labelSelector="app.kubernetes.io/managed-by")
    (made,) = [m for m in maps if m["metadata"]["name"].startswith("kiln-files-")]
    assert made["immutable"] is True
    assert sorted(base64.b64decode(v) for v in made["binaryData"].values()) == [
        b"X = 1\n",
        b"bundle v1\n",
    ]
    pod = admin.get("Pod", names.pod_name(first.id), "kiln-u-alice")
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "files-0", "mountPath": "/run/kiln", "readOnly": True} in mounts
    (files / "ca-bundle.crt").write_bytes(b"bundle v2\n")  # renewed: a new map
    runtime.start(sleeper(project, readonly_binds=((files, "/run/kiln"),)))
    maps, _ = admin.list("ConfigMap", "kiln-u-alice", labelSelector="app.kubernetes.io/managed-by")
    assert len([m for m in maps if m["metadata"]["name"].startswith("kiln-files-")]) == 2


def test_writable_host_paths_and_file_size_limits_are_refused_in_words(
    runtimes: Callable[..., KubernetesRuntime], project: Path, tmp_path: Path
) -> None:
    runtime = runtimes()
    out = tmp_path / "out.tar"
    out.touch()
    for spec in (
        sleeper(project, writable_binds=((out, "/kiln/out/out.tar"),)),
        sleeper(project, max_file_bytes=1024**2),
    ):
        with pytest.raises(StartFailed, match="writable host path or a file size limit"):
            runtime.start(spec)
    assert runtime.list_workloads() == []


def test_over_quota_is_refused_with_the_quota_in_words(
    runtimes: Callable[..., KubernetesRuntime], project: Path
) -> None:
    tenant = f"q{uuid.uuid4().hex[:8]}"
    runtime = runtimes(quota=lambda t: Quota(500, 1024**3))
    first = sleeper(project, tenant=tenant)
    runtime.start(first)  # 0.25 vCPU of 0.5
    from dataclasses import replace

    second = replace(sleeper(project, tenant=tenant), cpu=0.5)
    with pytest.raises(StartFailed, match=r"over the user's quota: .*exceeded quota"):
        runtime.start(second)


def test_team_projects_run_in_the_teams_namespace(
    runtimes: Callable[..., KubernetesRuntime], project: Path
) -> None:
    runtime = runtimes()
    from dataclasses import replace

    spec = sleeper(project)
    spec = replace(spec, placement=Placement("team", "ML Team", int(project.name), "job-run"))
    runtime.start(spec)
    assert runtime.get_state(spec.id)["namespace"].startswith("kiln-t-ml-team-h")


# ----------------------------------------------------------------- the watch cache


def test_informer_lists_again_when_its_version_expired(kube_cluster: Any, admin: Kube) -> None:
    """A resourceVersion the server no longer keeps: the watch ends with an ``ERROR`` event
    (410 Gone: etcd compacted it, or the watcher was away for long); the cache lists again
    and stays right. This API server serves old watches from its cache, so the expiry is
    injected once into the stream (the re-list itself runs against the real server)."""
    from kiln.runtimes.kubernetes.informer import Informer

    deadline = time.monotonic() + 60  # the test API server compacts etcd every 5 s
    while True:  # what the server says of a version it dropped
        try:
            admin.call(
                "GET",
                "/api/v1/namespaces",
                query={"resourceVersion": "1", "resourceVersionMatch": "Exact"},
            )
        except KubeError as gone:
            assert gone.status == 410 and gone.reason == "Expired"
            break
        assert time.monotonic() < deadline, "version 1 was never compacted away"
        time.sleep(1)

    class ExpiringOnce(Kube):
        expired = False

        def watch(self, kind: str, resource_version: str, timeout_seconds: int = 300,
                  **query: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
            if not self.expired:
                self.expired = True
                yield {"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}
                return
            yield from super().watch(kind, resource_version, timeout_seconds, **query)

    kube = ExpiringOnce(Kube.from_kubeconfig(str(kube_cluster.kubeconfig)).api)
    informer = Informer(kube, "Node").start()
    try:
        informer.wait_for(lambda: informer.relists >= 1, timeout=20)
        admin.patch("Node", "system-0", None, {"metadata": {"labels": {"relisted": "yes"}}})
        informer.wait_for(
            lambda: (informer.get("", "system-0") or {})["metadata"]["labels"].get("relisted"),
            timeout=20,
        )  # and it watches again after the re-list
        assert len(informer) == 3
    finally:
        informer.stop()
        kube.close()
