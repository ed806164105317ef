"""The ``kubernetes`` runtime running REAL pods: a kubelet with containerd and runc on this
machine (kiln.testing.kube.RealNode) joins the test control plane as the compute node
``real-0``, and pulls the workload image -- Kiln's Debian base with Python, from a registry
with Kiln's CA, by digest, with the pull secret the runtime makes -- as any node would.

Where test_runtime_kubernetes.py (KWOK's fake nodes) proves what Kiln asks of Kubernetes, this
tier proves the pods it makes actually run: the runtime contract's process tests (exit codes,
output through the API server, exec, graceful stop, project files on the hostPath volume as
uid 8536) run here instead of skipping. It needs root, the Go-built tools
(scripts/build_go_tools.sh) and Debian's runc; elsewhere it skips with a notice (a missing
tool fails under CI=true).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.build.base_image import BaseArchive
from kiln.runtimes.base import ExitReason, WorkloadSpec
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig, names
from kiln.runtimes.kubernetes.client import Kube
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Toleration
from kiln.testing import docker_registry as peer
from kiln.testing.live import free_port
from kiln.testing.runtime_contract import (
    RuntimeContract,
    all_logs,
    read_all,
    read_until,
    unique_id,
    wait_exit,
    wait_for_log,
)

pytestmark = [pytest.mark.slow, pytest.mark.one_database]

WORKLOAD_UID = 8536  # ClusterPolicy.workload_uid: the pods' user
COMPUTE = {"kiln.dev/pool": "compute"}
_project_ids = itertools.count(5000)


class RealCluster:
    def __init__(self, plane: Any, node: Any, image: str, registry: peer.RunningRegistry):
        self.plane, self.node, self.image, self.registry = plane, node, image, registry
        self.kubeconfig = plane.kubeconfig


@pytest.fixture(scope="session")
def real_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    build_registry: peer.RunningRegistry,
    kiln_base: BaseArchive,
) -> Iterator[RealCluster]:
    """A control plane of its own (no KWOK node for the scheduler to prefer) and the real
    node real-0, labelled and tainted as Kiln's compute pool; the base image is in
    ``build_registry`` as runtimes/python:3.11."""
    from kiln.runtimes.kubernetes.manifests import priority_classes
    from kiln.testing.kube import ControlPlane, RealNode

    if os.geteuid() != 0:
        pytest.skip("NOTICE: a real node (kubelet, containerd, runc) needs root")
    work = tmp_path_factory.mktemp("real-node")
    plane = ControlPlane.start(work / "plane", verify_kubelets=True)
    node = None
    try:
        admin = Kube.from_kubeconfig(str(plane.kubeconfig))
        for manifest in priority_classes():
            admin.apply(manifest)
        admin.close()
        node = RealNode.start(
            plane,
            work / "node",
            labels=COMPUTE,
            taints=[{"key": "kiln.dev/pool", "value": "compute", "effect": "NoSchedule"}],
            registries={build_registry.host: build_registry.ca_file},
        )
        image = f"{build_registry.host}/runtimes/python@{kiln_base.manifest_digest}"
        yield RealCluster(plane, node, image, build_registry)
    finally:
        if node is not None:
            node.stop()
        plane.stop()


@pytest.fixture(autouse=True)
def schedulable_node(request: pytest.FixtureRequest) -> None:
    """Each test that uses the node starts when the node takes pods, or fails saying why not
    (its conditions and taints), rather than on the scheduler's "untolerated taint"."""
    if "real_cluster" in request.fixturenames:
        request.getfixturevalue("real_cluster").node.wait_schedulable()


def make_runtime(cluster: RealCluster, state: Path, projects: Path) -> KubernetesRuntime:
    config = KubeRuntimeConfig(
        policy=ClusterPolicy(
            node_selector=dict(COMPUTE),
            tolerations=(Toleration("kiln.dev/pool", "compute"),),
            host_path=str(projects),
        ),
        default_image=cluster.image,
        registry=cluster.registry.host,
        pull_credentials=lambda tenant: (cluster.registry.username, cluster.registry.password),
        start_timeout=90.0,  # the first pod pulls the base image
    )
    return KubernetesRuntime(state, Kube.from_kubeconfig(str(cluster.kubeconfig)), config)


def new_project(parent: Path) -> Path:
    """A project directory named by its id (the PV is host_path/<id>), the pods' user's."""
    path = parent / str(next(_project_ids))
    path.mkdir()
    (path / "hello.txt").write_text("hello from the project\n")
    for item in (path, path / "hello.txt"):
        os.chown(item, WORKLOAD_UID, WORKLOAD_UID)
    return path


def built_image_job(
    tmp_path: Path, image: dict[str, Any], registry: str, script: str
) -> WorkloadSpec:
    """A job on a build's image, pulled by digest, on the image's own /home/cdsw (the code
    that was built, no project volume), as a model replica runs."""
    from dataclasses import replace

    from kiln.runtimes.base import Placement

    reference = f"{registry}/{image['repository']}@{image['digest']}"
    return replace(
        job(new_project(tmp_path), script),
        project_mount=False,
        placement=Placement("user", "alice", 1, "model-replica", image=reference),
    )


def placed(spec: WorkloadSpec) -> WorkloadSpec:
    from dataclasses import replace

    from kiln.runtimes.base import Placement

    return replace(spec, placement=Placement("user", "alice", int(spec.project_dir.name), "job"))


def wait_for_size(term: Any, size: bytes) -> None:
    """Until the terminal reports ``size`` (rows cols), or fail saying so."""
    for _ in range(25):
        term.write(b"stty size; echo si''zed\n")
        if size in read_until(term, b"sized\r\n"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the terminal never got the size {size.decode()}")


class TestRealPodsContract(RuntimeContract):
    runs_processes = True

    @pytest.fixture
    def runtime_factory(self, real_cluster: RealCluster, tmp_path: Path) -> Callable[[], Any]:
        return lambda: make_runtime(real_cluster, tmp_path / "state", tmp_path)

    @pytest.fixture
    def project(self, tmp_path: Path) -> Path:
        return new_project(tmp_path)

    def spec(self, project: Path, script: str, **kwargs: object) -> WorkloadSpec:
        kwargs.setdefault("cpu", 0.25)  # a 2-core node runs several at once
        return placed(super().spec(project, script, **kwargs))

    def test_logs_kept_after_exit_and_readable_from_offset(
        self, runtime: Any, project: Path
    ) -> None:
        """The contract's, except where ``err`` lands: on a node stdout and stderr are two
        pipes that containerd copies each on its own, so their relative order is not kept
        (seen: ``err`` after ``1``). Offsets and follow still read the very same bytes."""
        spec = self.spec(project, "echo out; echo err >&2; seq 1 2000")
        runtime.start(spec)
        wait_exit(runtime, spec.id)
        text = all_logs(runtime, spec.id)
        lines = text.split(b"\n")
        assert lines.count(b"err") == 1
        numbers = [str(i).encode() for i in range(1, 2001)]
        assert [line for line in lines if line != b"err"] == [b"out", *numbers, b""]
        assert all_logs(runtime, spec.id, since=8) == text[8:]
        assert b"".join(runtime.logs(spec.id, follow=True)) == text

    def test_exec_with_tty(self, runtime: Any, project: Path) -> None:
        """The contract's, except that each size is waited for: Kubernetes carries a
        resize on a stream of its own (channel 4), not ordered with stdin, so a ``stty size``
        typed right after it can still see the old size (seen, for the first size too:
        ``0 0``)."""
        spec = self.spec(project, "sleep 60")
        runtime.start(spec)
        with runtime.exec(spec.id, ["sh"], tty=True, rows=30, cols=100) as term:
            term.write(b"echo hel''lo; [ -t 0 ] && echo tty-$((40 + 2))\n")
            out = read_until(term, b"tty-42")
            assert b"hello" in out
            wait_for_size(term, b"30 100")
            term.resize(40, 120)
            wait_for_size(term, b"40 120")
            term.write(b"exit 3\n")
            assert term.wait(30) == 3

    # What a real pod cannot do, each for its own reason (docs/kubernetes.md, "Test tiers").

    @pytest.mark.skip(
        reason="a pod's command is PID 1 of its container's PID namespace (no init, no shared "
        "process namespace): the kernel drops the SIGKILL `kill -KILL $$` sends it from "
        "inside, so it never dies (the local runtime runs it under an init)"
    )
    def test_signal_death_is_128_plus_signal(self) -> None: ...

    @pytest.mark.skip(
        reason="the kubernetes runtime refuses WorkloadSpec.writable_binds and max_file_bytes "
        "(a restricted pod mounts no host path; Kubernetes sets no RLIMIT_FSIZE): a build's "
        "install pod, their only user, reads its output through exec, capped by the builder "
        "(test_build_pod_install.py; test_runtime_kubernetes.py tests the refusal)"
    )
    def test_writable_file_bind_with_a_file_size_limit(self) -> None: ...

    @pytest.mark.skip(
        reason="the endpoint is the Service's cluster DNS name (NAME.NAMESPACE.svc); this tier "
        "runs no cluster DNS and no kube-proxy, so nothing here resolves or routes it"
    )
    def test_declared_port_is_reachable_through_the_endpoint(self) -> None: ...


# ------------------------------------------------------------ beyond the contract


@pytest.fixture
def runtime(real_cluster: RealCluster, tmp_path: Path) -> Iterator[KubernetesRuntime]:
    made = make_runtime(real_cluster, tmp_path / "state", tmp_path)
    yield made
    for workload_id in made.list_workloads():
        made.stop(workload_id, grace=0)
        made.remove(workload_id)
    made.close()


def job(project: Path, script: str, **kwargs: Any) -> WorkloadSpec:
    spec = WorkloadSpec(
        id=unique_id("job"),
        project_dir=project,
        command=("sh", "-c", script),
        memory_bytes=256 * 1024**2,
        cpu=0.25,
        **kwargs,
    )
    return placed(spec)


def test_a_job_pod_runs_the_image_pulled_by_digest_with_the_pull_secret(
    runtime: KubernetesRuntime, real_cluster: RealCluster, tmp_path: Path
) -> None:
    project = new_project(tmp_path)
    (project / "job.py").write_text("import sys, os\nprint('uid', os.getuid())\nsys.exit(3)\n")
    spec = job(project, "python3 job.py; id -u; cat hello.txt; exit 3")
    runtime.start(spec)
    assert wait_exit(runtime, spec.id, timeout=90) == 3
    status = runtime.status(spec.id)
    assert status.reason == ExitReason.EXITED and status.exit_code == 3
    out = all_logs(runtime, spec.id)  # through the API server, from the kubelet
    assert out == b"uid 8536\n8536\nhello from the project\n"
    # The registry saw the pull: a token for this repository, asked for with the secret.
    pulls = [c for c in real_cluster.registry.tokens_issued if c.get("access")]
    assert any(
        a.get("name") == "runtimes/python" and "pull" in a.get("actions", [])
        for claims in pulls
        for a in claims["access"]
    ), pulls


def test_exec_into_a_running_session_pod_then_stop_it(
    runtime: KubernetesRuntime, tmp_path: Path
) -> None:
    project = new_project(tmp_path)
    spec = job(project, "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.1; done")
    runtime.start(spec)
    wait_for_log(runtime, spec.id, b"up", timeout=90)
    with runtime.exec(spec.id, ["sh", "-c", "echo $(id -u) $(pwd); ls"]) as process:
        assert read_all(process) == b"8536 /home/cdsw\nhello.txt\n"
    with runtime.exec(spec.id, ["python3", "-q"], tty=True) as term:
        term.write(b"print(6 * 7)\n")
        read_until(term, b"42")
        term.write(b"exit(5)\n")
        assert term.wait(30) == 5
    started = time.monotonic()
    runtime.stop(spec.id, grace=10)
    assert time.monotonic() - started < 15
    status = runtime.status(spec.id)
    assert status.reason == ExitReason.STOPPED and status.exit_code == 0
    assert all_logs(runtime, spec.id).endswith(b"bye\n")


def test_a_long_exec_output_arrives_whole_and_in_order(
    runtime: KubernetesRuntime, tmp_path: Path
) -> None:
    """Tens of megabytes through the API server's exec stream (a build's dependency layer
    comes out this way): every byte, in order, up to the last one before the close."""
    spec = job(new_project(tmp_path), "echo up; exec sleep 300")
    runtime.start(spec)
    wait_for_log(runtime, spec.id, b"up", timeout=90)
    expected = "".join(f"{n}\n" for n in range(1, 3_000_001)).encode()  # 20.9 MB
    for argv in (["seq", "1", "3000000"], ["sh", "-c", "echo tail-line"]):
        with runtime.exec(spec.id, argv) as process:
            got = bytearray()
            while chunk := process.read(1024 * 1024, timeout=60):
                got += chunk
            assert process.wait(30) == 0
        if argv[0] == "seq":
            assert len(got) == len(expected) and bytes(got) == expected
        else:
            assert bytes(got) == b"tail-line\n"


def test_a_pod_runs_a_build_pulled_from_kilns_own_registry(
    real_cluster: RealCluster, own_registry_site: Any, alice: Any, tmp_path: Path
) -> None:
    """The whole path on Kiln's defaults: a project's build lands in Kiln's own registry, and
    the real node pulls it from there by digest with the project member's key (Kiln's token
    auth), then runs the code that was built into it (no project volume: the image's own
    /home/cdsw, as a model replica runs)."""

    from tests.integration.test_build_own_registry import api, wait_build

    site = own_registry_site
    with api(site, alice) as http:
        created = http.post("/projects", json={"name": "demo", "template": "python-starter"})
        assert created.status_code == 201, created.text
        marker = "print('built by kiln, pulled from kiln')\n"
        assert http.put("/projects/alice/demo/files/marker.py", content=marker).status_code in (
            200,
            201,
        )
        assert http.put("/projects/alice/demo/files/requirements.txt", content=b"").is_success
        assert http.post("/projects/alice/demo/builds", json={}).status_code == 201
        build = wait_build(http, "/projects/alice/demo/builds/1")
        assert build["state"] == "succeeded", http.get("/projects/alice/demo/builds/1/logs").text
    image = build["image"]
    registry = f"localhost:{site.port}"
    assert image["registry"] == registry
    real_cluster.node.trust_registry(registry, Path(site.ca_file))

    config = KubeRuntimeConfig(
        policy=ClusterPolicy(
            node_selector=dict(COMPUTE),
            tolerations=(Toleration("kiln.dev/pool", "compute"),),
            host_path=str(tmp_path),
        ),
        registry=registry,
        pull_credentials=lambda tenant: (alice.username, alice.key),
        start_timeout=90.0,
    )
    runtime = KubernetesRuntime(
        tmp_path / "state", Kube.from_kubeconfig(str(real_cluster.kubeconfig)), config
    )
    try:
        script = "cd /home/cdsw && python3 marker.py && id -u && echo done && exec sleep 60"
        spec = built_image_job(tmp_path, image, registry, script)
        runtime.start(spec)
        wait_for_log(runtime, spec.id, b"done", timeout=90)
        # The kubelet reports the image it runs by the digest it pulled from Kiln's registry
        # (read while the pod runs: the runtime deletes an ended workload's pod).
        pod = runtime.kube.get("Pod", names.pod_name(spec.id), "kiln-u-alice")
        (container,) = pod["status"]["containerStatuses"]
        assert container["imageID"].endswith(image["digest"]), container
        runtime.stop(spec.id, grace=0)
        assert all_logs(runtime, spec.id) == b"built by kiln, pulled from kiln\n8536\ndone\n"
    finally:
        for workload_id in runtime.list_workloads():
            runtime.stop(workload_id, grace=0)
            runtime.remove(workload_id)
        runtime.close()


def test_read_only_files_reach_a_real_pod_as_a_config_map(
    runtime: KubernetesRuntime, tmp_path: Path
) -> None:
    """What the runner shows sessions at /run/kiln (a CA bundle, the SDK) reaches a pod as
    data: readable by the pod's user, importable, and read-only."""
    files = tmp_path / "web"
    (files / "python" / "kiln_probe").mkdir(parents=True)
    (files / "ca-bundle.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (files / "python" / "kiln_probe" / "__init__.py").write_text("ANSWER = 42\n")
    project = new_project(tmp_path)
    script = (
        "head -c 27 /run/kiln/ca-bundle.crt; echo; "
        "PYTHONPATH=/run/kiln/python python3 -c 'import kiln_probe; print(kiln_probe.ANSWER)'; "
        "touch /run/kiln/new 2>/dev/null || echo read-only"
    )
    spec = job(project, script, readonly_binds=((files, "/run/kiln"),))
    runtime.start(spec)
    assert wait_exit(runtime, spec.id, timeout=90) == 0
    assert all_logs(runtime, spec.id) == b"-----BEGIN CERTIFICATE-----\n42\nread-only\n"


# ------------------------------------------------------------------ builds as pods


def probe_wheel() -> bytes:
    """A one-module wheel (``kilnprobe``), so an install needs no index: pip installs it from
    the project itself (``--no-index``), whatever network the node gives pods."""
    import base64
    import hashlib
    import io
    import zipfile

    files = {
        "kilnprobe.py": b"ANSWER = 'installed in a build pod'\n",
        "kilnprobe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kilnprobe\n"
        b"Version: 1.0\n",
        "kilnprobe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kiln-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n" for name, data in files.items())
    files["kilnprobe-1.0.dist-info/RECORD"] = (
        record + "kilnprobe-1.0.dist-info/RECORD,,\n"
    ).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


@pytest.fixture
def pod_builder(
    build_settings: Any, real_cluster: RealCluster, engine: Any, tmp_path: Path
) -> Iterator[Any]:
    """A real builder whose install steps run as pods on the real node (``builder.runtime =
    kubernetes``), pulling the base image from the registry it pushes to."""
    from kiln.builder.process import start_builder

    installs_on_the_real_node(build_settings, real_cluster, tmp_path)
    running = start_builder(build_settings, port=0)
    build_settings.builder.port = running.port
    try:
        yield running
    finally:
        running.stop(grace=1)


def installs_on_the_real_node(settings: Any, real_cluster: RealCluster, host_path: Path) -> None:
    """Set a builder's installs to run as pods on the real node (``builder.runtime =
    kubernetes``), pulling the base image from the registry it pushes to."""
    k = settings.kubernetes
    k.kubeconfig = real_cluster.kubeconfig
    k.node_selector = dict(COMPUTE)
    k.tolerations = ["kiln.dev/pool=compute:NoSchedule"]
    k.host_path = str(host_path)
    k.registry = real_cluster.registry.host
    k.registry_username = real_cluster.registry.username
    k.registry_password = real_cluster.registry.password
    k.start_timeout = 90.0
    settings.builder.runtime = "kubernetes"


def section_environment(section: Any) -> dict[str, str]:
    """A settings section as the ``KILN_*`` variables that set it in a child process
    (pydantic-settings reads lists and mappings as JSON)."""
    prefix = section.model_config["env_prefix"]
    values = section.model_dump(mode="json", exclude_none=True)
    return {
        f"{prefix}{name.upper()}": value if isinstance(value, str) else json.dumps(value)
        for name, value in values.items()
    }


def build_pods(real_cluster: RealCluster, namespace: str) -> list[str]:
    return list(pod_uids(real_cluster, namespace))


def pod_uids(real_cluster: RealCluster, namespace: str) -> dict[str, str]:
    """The namespace's build pods, name → uid (a pod made again under its name has a new
    uid)."""
    admin = Kube.from_kubeconfig(str(real_cluster.kubeconfig))
    try:
        pods, _ = admin.list("Pod", namespace, labelSelector="kiln.dev/kind=build")
    finally:
        admin.close()
    return {pod["metadata"]["name"]: pod["metadata"]["uid"] for pod in pods}


def test_a_build_installs_in_a_pod_and_its_image_runs(
    client: Any,
    alice: Any,
    pod_builder: Any,
    real_cluster: RealCluster,
    runtime: KubernetesRuntime,
    tmp_path: Path,
) -> None:
    """The install step of a build as a pod of the base image in alice's namespace: the
    snapshot goes in and the dependency layer comes out through the API server, the same
    bytes twice over, and the image it makes runs what was installed."""

    from tests.integration.build_support import build_log, start_build, wait_build
    from tests.integration.test_builder_service import layer_tar, manifest_and_config
    from tests.integration.test_sessions_support import make_project

    project = make_project(client, alice, "podbuild")
    wheel = client.put(
        f"{project}/files/kilnprobe-1.0-py3-none-any.whl",
        content=probe_wheel(),
        headers=alice.headers,
    )
    assert wheel.status_code in (200, 201), wheel.text
    requirements = b"--no-index\n./kilnprobe-1.0-py3-none-any.whl\n"
    put = client.put(
        f"{project}/files/requirements.txt", content=requirements, headers=alice.headers
    )
    assert put.status_code in (200, 201), put.text

    first = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    log = build_log(client, project, alice, first["number"])
    assert first["state"] == "succeeded", (first, log)
    assert "installing in a pod of" in log and "namespace of alice" in log
    assert "unpacked the project:" in log and "Successfully installed kilnprobe-1.0" in log
    assert first["dependencies_cached"] is False
    again = start_build(client, project, alice, no_cache=True)
    again = wait_build(client, project, alice, again["number"])
    assert again["state"] == "succeeded" and again["dependencies_cached"] is False
    assert again["layers"] == first["layers"]  # a second pod made the same bytes
    manifest, _ = manifest_and_config(real_cluster.registry, "alice/podbuild/build", "2")
    with layer_tar(
        real_cluster.registry, "alice/podbuild/build", manifest["layers"][-2]["digest"]
    ) as deps:
        members = {m.name: m for m in deps.getmembers()}
    assert "opt/kiln/deps/lib/python3.11/site-packages/kilnprobe.py" in members
    assert {(m.uid, m.mtime) for m in members.values()} == {(0, 315532800)}
    assert build_pods(real_cluster, "kiln-u-alice") == []  # each install pod was deleted

    script = "cd /home/cdsw && python3 -c 'import kilnprobe; print(kilnprobe.ANSWER)'"
    spec = built_image_job(tmp_path, again["image"], real_cluster.registry.host, script)
    runtime.start(spec)
    assert wait_exit(runtime, spec.id, timeout=90) == 0
    assert all_logs(runtime, spec.id) == b"installed in a build pod\n"


def test_a_failing_install_in_a_pod_fails_the_build_with_its_output(
    client: Any, alice: Any, pod_builder: Any, real_cluster: RealCluster
) -> None:
    """The install's exit status and output reach the build; the pod holds no credential
    (no service-account token) and runs as the workload uid; nothing is left behind."""
    from tests.integration.build_support import build_log, start_build, wait_build
    from tests.integration.test_sessions_support import make_project

    project = make_project(client, alice, "podfail")
    script = (
        "echo uid=$(id -u)\n"
        "ls /var/run/secrets/kubernetes.io 2>/dev/null || echo no-token\n"
        "touch /usr/kiln-was-here 2>/dev/null || echo read-only-root\n"
        "exit 3\n"
    )
    put = client.put(
        f"{project}/files/cdsw-build.sh", content=script.encode(), headers=alice.headers
    )
    assert put.status_code in (200, 201), put.text
    build = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    log = build_log(client, project, alice, build["number"])
    assert build["state"] == "failed", (build, log)
    assert "the install failed (exit code 3)" in build["reason"]
    assert {s["name"]: s["status"] for s in build["steps"]}["dependencies"] == "failed"
    assert "uid=8536\nno-token\nread-only-root\n" in log
    assert build["image"] is None
    assert build_pods(real_cluster, "kiln-u-alice") == []


def builder_process(
    settings: Any, real_cluster: RealCluster, tmp_path: Path, output: Path
) -> subprocess.Popen[bytes]:
    """``kiln builder`` as its own process (so it can be killed), with the settings of
    ``pod_builder`` (installs as pods on the real node), under one builder name."""
    installs_on_the_real_node(settings, real_cluster, tmp_path)
    env = dict(
        os.environ,
        KILN_ENV="test",
        KILN_DATABASE_URL=settings.database_url,
        KILN_SECRET_KEY=settings.secret_key,
        KILN_BUILDER_NAME="builder-to-kill",
        **section_environment(settings.builder),
        **section_environment(settings.kubernetes),
    )
    command = [sys.executable, "-m", "kiln.cli.main", "builder", "--data-dir"]
    command += [str(settings.data_dir), "--port", str(settings.builder.port)]
    served = output.read_bytes().count(b"serving gRPC") if output.exists() else 0
    with output.open("ab") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while output.read_bytes().count(b"serving gRPC") == served:
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.2)
    return process


def test_a_builder_killed_mid_install_leaves_no_pod_behind(
    client: Any, alice: Any, build_settings: Any, real_cluster: RealCluster, tmp_path: Path
) -> None:
    """``kill -9`` of a builder while its install pod runs: the pod outlives it, and the
    restarted builder's recovery deletes that pod before it retries the build in a new one;
    a cancel then removes the new one too."""
    from tests.integration.build_support import ENDED, build_log, start_build, wait_build
    from tests.integration.test_sessions_support import make_project

    build_settings.builder.port = free_port()  # the web tier's client finds it there
    output = tmp_path / "builder.out"
    project = make_project(client, alice, "podkill")
    script = b"echo attempt started; exec sleep 6007\n"
    put = client.put(f"{project}/files/cdsw-build.sh", content=script, headers=alice.headers)
    assert put.status_code in (200, 201), put.text

    def installing(attempt: int) -> dict[str, str]:
        """The build pods (name → uid) once the ``attempt``-th install runs."""
        deadline = time.monotonic() + 180
        while True:
            build = client.get(f"{project}/builds/1", headers=alice.headers).json()
            log = build_log(client, project, alice, 1) if build["attempt"] == attempt else ""
            pods = pod_uids(real_cluster, "kiln-u-alice")
            if log.count("attempt started") == attempt:
                return pods
            assert build["state"] not in ENDED, (build, log)
            assert time.monotonic() < deadline, (build, log, output.read_text())
            time.sleep(0.3)

    processes = [builder_process(build_settings, real_cluster, tmp_path, output)]
    try:
        assert start_build(client, project, alice)["number"] == 1
        first = installing(1)
        assert len(first) == 1, first
        processes[0].kill()
        processes[0].wait()
        assert pod_uids(real_cluster, "kiln-u-alice") == first  # left behind by the dead one

        processes.append(builder_process(build_settings, real_cluster, tmp_path, output))
        second = installing(2)
        assert len(second) == 1 and set(second.values()).isdisjoint(first.values()), second
        log = build_log(client, project, alice, 1)
        assert "the builder stopped mid-build" in log and "--- attempt 2 ---" in log

        cancel = client.post(f"{project}/builds/1/cancel", headers=alice.headers)
        assert cancel.status_code == 200, cancel.text
        stopped = wait_build(client, project, alice, 1)
        assert stopped["state"] == "stopped", stopped
        deadline = time.monotonic() + 60
        while pods := pod_uids(real_cluster, "kiln-u-alice"):
            assert time.monotonic() < deadline, f"the build pod outlived the cancel: {pods}"
            time.sleep(0.3)
    finally:
        for process in processes:  # a graceful stop removes the pod of a test that failed
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
