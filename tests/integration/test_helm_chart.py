"""The Helm chart (deploy/helm/kiln): lint, render, a server-side dry run of every object
against the test API server, and a real install, upgrade and uninstall with every
Deployment Available on KWOK's nodes; headroom placeholders make way for a real workload."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.runtimes.base import Placement, WorkloadSpec
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig
from kiln.runtimes.kubernetes.client import Kube, KubeError
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Toleration, priority_classes
from kiln.testing import tools

pytestmark = pytest.mark.slow

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "kiln"
BASE_VALUES = ["--set", "database.url=postgresql+psycopg://kiln@db.example/kiln"]


@pytest.fixture(scope="module")
def helm() -> Path:
    return tools.require("helm", "the chart's tests")


def run_helm(helm: Path, *args: str, kubeconfig: Path | None = None) -> str:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/kiln-helm-cache")
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, f"helm {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def render(helm: Path, *values: str, namespace: str = "kiln") -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "kiln", str(CHART), "-n", namespace, *BASE_VALUES, *values)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


# ----------------------------------------------------------------- no cluster


def test_lint_passes_and_a_database_is_required(helm: Path) -> None:
    run_helm(helm, "lint", str(CHART), "--strict", *BASE_VALUES)
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/kiln-helm-cache")
    refused = subprocess.run(
        [str(helm), "template", "kiln", str(CHART)], capture_output=True, text=True, env=env,
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "set database.url" in refused.stderr


def test_only_the_pki_component_can_reach_the_ca_key(helm: Path) -> None:
    docs = render(helm, "--set", "database.embedded.enabled=true", "--set", "headroom.sessions=1")
    for name, spec in pod_specs(docs).items():
        secrets = [
            source["secret"]["name"]
            for volume in spec.get("volumes", [])
            for source in [
                *(volume.get("projected", {}).get("sources", [])),
                *([{"secret": volume["secret"]}] if "secret" in volume else []),
            ]
            if "secret" in source
        ]
        assert "kiln-ca" not in secrets, f"{name} mounts the CA's key"
    # Roles bound in the release's namespace or cluster-wide (the tenant role is bound only
    # by the runner, only in kiln-u-*/kiln-t-* namespaces: the admission policy says so).
    bindings = ("RoleBinding", "ClusterRoleBinding")
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] in bindings}
    roles = [
        d for d in docs if d["kind"] in ("Role", "ClusterRole") and d["metadata"]["name"] in bound
    ]
    reach = [
        r["metadata"]["name"]
        for r in roles
        for rule in r["rules"]
        if "secrets" in rule.get("resources", [])
        and ("kiln-ca" in rule.get("resourceNames", []) or "get" in rule["verbs"])
        and (not rule.get("resourceNames") or "kiln-ca" in rule["resourceNames"])
    ]
    assert reach == ["kiln-pki"]


def test_every_kiln_container_is_restricted(helm: Path) -> None:
    docs = render(helm, "--set", "headroom.sessions=1")
    for name, spec in pod_specs(docs).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert security.get("readOnlyRootFilesystem") is True, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name


def test_chart_priority_classes_are_the_runtimes(helm: Path) -> None:
    docs = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "PriorityClass"}
    for expected in priority_classes():
        got = docs[expected["metadata"]["name"]]
        assert got["value"] == expected["value"]
        assert got.get("preemptionPolicy") == expected.get("preemptionPolicy")


def test_values_reach_the_runner_and_the_builder(helm: Path) -> None:
    docs = render(
        helm,
        "--set", "projects.nfs.server=nfs.example", "--set", "autoscaling=true",
        "--set", "compute.clusterCidrs={10.0.0.0/8}",
    )  # fmt: skip
    runner = pod_specs(docs)["kiln-runner"]["containers"][0]
    env = {e["name"]: e.get("value") for e in runner["env"]}
    assert env["KILN_RUNNER_RUNTIME"] == "kubernetes"
    assert env["KILN_KUBERNETES_NFS_SERVER"] == "nfs.example"
    assert env["KILN_KUBERNETES_AUTOSCALING"] == "true"
    assert env["KILN_KUBERNETES_CLUSTER_CIDRS"] == '["10.0.0.0/8"]'
    assert env["KILN_KUBERNETES_TOLERATIONS"] == '["kiln.dev/pool=compute:NoSchedule"]'
    assert env["KILN_KUBERNETES_RUNNER_ROLE"] == "kiln-tenant"
    # The builder runs install steps as pods: the same cluster settings, its own account.
    builder = pod_specs(docs)["kiln-builder"]
    builder_env = {e["name"]: e.get("value") for e in builder["containers"][0]["env"]}
    assert builder_env["KILN_BUILDER_RUNTIME"] == "kubernetes"
    assert builder_env["KILN_KUBERNETES_BUILDER_SERVICE_ACCOUNT"] == "kiln-builder"
    assert {k: v for k, v in builder_env.items() if k.startswith("KILN_KUBERNETES_")} == {
        k: v for k, v in env.items() if k.startswith("KILN_KUBERNETES_")
    }
    assert builder["serviceAccountName"] == "kiln-builder"
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts["kiln-builder"]["automountServiceAccountToken"] is True


# ----------------------------------------------------------------- the test API server


def test_rendered_objects_pass_a_server_side_dry_run(helm: Path, kube_cluster: Any) -> None:
    kube = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    try:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kiln-dry"}})
        docs = render(
            helm, "--set", "database.embedded.enabled=true", "--set", "headroom.sessions=2",
            namespace="kiln-dry",
        )  # fmt: skip
        for doc in docs:
            if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "PriorityClass",
                                   "StorageClass", "ValidatingAdmissionPolicy",
                                   "ValidatingAdmissionPolicyBinding"):  # fmt: skip
                doc["metadata"]["namespace"] = "kiln-dry"
            try:
                kube.create(doc, dry_run=True)
            except KubeError as exc:
                # The priority classes exist already (the cluster fixture made them): the
                # server validated them, and refuses only the duplicate.
                assert exc.status == 409 and doc["kind"] == "PriorityClass", (doc, exc)
    finally:
        kube.delete("Namespace", "kiln-dry")
        kube.close()


@pytest.fixture
def release_volumes(kube_cluster: Any, tmp_path: Path) -> Iterator[Kube]:
    """The chart's claims need volumes: static ones of a test class (as an admin would)."""
    kube = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    made = []
    for claim, size in (("kiln-registry", "200Gi"), ("kiln-runner-state", "1Gi")):
        path = tmp_path / claim
        path.mkdir()
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"test-{claim}"},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                "storageClassName": "kiln-test",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": "kiln", "name": claim},
            },
        }
        kube.apply(volume)
        made.append(volume["metadata"]["name"])
    yield kube
    for name in made:
        kube.delete("PersistentVolume", name)
    kube.close()


def deployments_available(kube: Kube, namespace: str, timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        items, _ = kube.list("Deployment", namespace)
        ready = {
            d["metadata"]["name"]: int((d.get("status") or {}).get("availableReplicas") or 0)
            for d in items
        }
        wanted = {d["metadata"]["name"]: int(d["spec"].get("replicas", 1)) for d in items}
        if ready == wanted:
            return ready
        if time.monotonic() > deadline:
            raise AssertionError(f"not available: {ready} of {wanted}")
        time.sleep(0.5)


def test_install_upgrade_uninstall(
    helm: Path, kube_cluster: Any, release_volumes: Kube, tmp_path: Path
) -> None:
    kube = release_volumes
    config = str(kube_cluster.kubeconfig)
    values = [
        *BASE_VALUES,
        "--set", "registry.storageClass=kiln-test",
        "--set", "runner.stateStorageClass=kiln-test",
        "--set", "headroom.sessions=2",
        "--set", "headroom.cpu=3",
    ]  # fmt: skip
    for manifest in priority_classes():  # the chart owns them in a real cluster
        kube.delete("PriorityClass", manifest["metadata"]["name"])
    try:
        run_helm(helm, "install", "kiln", str(CHART), "-n", "kiln", "--create-namespace",
                 "--wait", "--timeout", "180s", *values, kubeconfig=Path(config))  # fmt: skip
        ready = deployments_available(kube, "kiln")
        assert ready == {"kiln-web": 2, "kiln-runner": 1, "kiln-builder": 1, "kiln-pki": 1,
                         "kiln-headroom": 2}  # fmt: skip
        web_pods, _ = kube.list("Pod", "kiln", labelSelector="app.kubernetes.io/component=web")
        assert all(p["spec"]["nodeName"] == "system-0" for p in web_pods)  # not the pool
        headroom, _ = kube.list("Pod", "kiln", labelSelector="app.kubernetes.io/component=headroom")
        assert {p["spec"]["nodeName"] for p in headroom} <= {"compute-0", "compute-1"}

        _placeholders_make_way(kube, kube_cluster, tmp_path)

        run_helm(helm, "upgrade", "kiln", str(CHART), "-n", "kiln", "--wait", "--timeout",
                 "180s", *values, "--set", "web.replicas=3", "--set", "headroom.sessions=0",
                 kubeconfig=Path(config))  # fmt: skip
        ready = deployments_available(kube, "kiln")
        assert ready["kiln-web"] == 3 and ready["kiln-headroom"] == 0
        run_helm(helm, "uninstall", "kiln", "-n", "kiln", "--wait", kubeconfig=Path(config))
        items, _ = kube.list("Deployment", "kiln")
        assert items == []
        with pytest.raises(KubeError):
            kube.get("ClusterRole", "kiln-runner")
        kept = {c["metadata"]["name"] for c in kube.list("PersistentVolumeClaim", "kiln")[0]}
        assert kept == {"kiln-registry", "kiln-runner-state"}  # data outlives the release
    finally:
        for manifest in priority_classes():
            kube.apply(manifest)
        kube.delete("Namespace", "kiln")


def _placeholders_make_way(kube: Kube, kube_cluster: Any, tmp_path: Path) -> None:
    """A session that needs a placeholder's room preempts it at once (it never waits for a
    node); the placeholder is recreated and waits — the cluster autoscaler's cue."""
    project = tmp_path / "4242"
    project.mkdir()
    runtime = KubernetesRuntime(
        tmp_path / "state",
        Kube.from_kubeconfig(str(kube_cluster.kubeconfig)),
        KubeRuntimeConfig(
            policy=ClusterPolicy(
                node_selector={"kiln.dev/pool": "compute"},
                tolerations=(Toleration("kiln.dev/pool", "compute"),),
                host_path=str(tmp_path),
            ),
            default_image="registry.kiln.test/runtimes/python:1",
            start_timeout=60,
        ),
    )
    spec = WorkloadSpec(
        id="headroom-test",
        project_dir=project,
        command=("sleep", "infinity"),
        cpu=2.0,
        placement=Placement("user", "headroom-user", 4242, "session"),
    )
    try:
        runtime.start(spec)
        assert runtime.status(spec.id).running
        deadline = time.monotonic() + 60
        while True:
            pods, _ = kube.list("Pod", "kiln", labelSelector="app.kubernetes.io/component=headroom")
            live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
            pending = [p for p in live if p["status"].get("phase") == "Pending"]
            if len(live) == 2 and len(pending) == 1:
                break
            assert time.monotonic() < deadline, [p["status"] for p in pods]
            time.sleep(0.5)
        (condition,) = [
            c for c in pending[0]["status"].get("conditions", []) if c["type"] == "PodScheduled"
        ]
        assert condition["reason"] == "Unschedulable"  # waiting for a new node
    finally:
        runtime.stop(spec.id, grace=1)
        runtime.remove(spec.id)
        runtime.close()
