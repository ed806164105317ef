"""Session start on Kubernetes: Kiln's runtime vs JupyterHub's KubeSpawner, same API server.

Both run against one test control plane (kiln.testing.kube: etcd, kube-apiserver, controller
manager, scheduler, KWOK with Kiln's Stage files; no container runs, so this measures the
control loops only). Each start is a new user's first session with its own fresh PVC:

- Kiln: ``KubernetesRuntime.start()`` for a new project until the pod runs as the runtime's
  watch cache sees it (the point where the runner answers the web tier's StartWorkload).
  The headline (``k8s_session_start_p50``): the project's claim and volume were made
  beforehand, untimed, by the provisioner's own call (``kubesite.provision``), as the
  runner's provisioner does when the project is created or a collaborator added; the start
  sends the pod (and its Service). ``k8s_session_start_p50_cold_project``: no provisioning
  beforehand, so the start itself creates the PV and claim and waits for them to bind (a
  session started before the provisioner's pass saw its project);
- KubeSpawner: ``start()`` for a new user (its PVC, bound to a static PV, then the pod)
  until it returns (its reflector saw the pod Running; a JupyterHub spawn would then wait
  for the server's HTTP, which never answers on a fake node).

Also: API-server requests per start (the watch cache, not polling: measured on Kiln's own
client) and the runner's resident memory with 1,000 workloads in its caches.

Usage: .venv/bin/python bench/k8s_session_start.py   (writes bench/results/k8s_session_start.json)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "k8s_session_start.json"
STARTS = 20
IMAGE = "registry.kiln.test/runtimes/python:1"
COMPUTE = {"kiln.dev/pool": "compute"}
TAINT = {"key": "kiln.dev/pool", "value": "compute", "effect": "NoSchedule"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def kiln_starts(plane: Any, work: Path) -> dict[str, Any]:
    from kiln.runner.kubesite import provision
    from kiln.runtimes.base import Placement, WorkloadSpec
    from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig
    from kiln.runtimes.kubernetes.client import Kube
    from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Tenant, Toleration

    runtime = KubernetesRuntime(
        work / "kiln-state",
        Kube.from_kubeconfig(str(plane.kubeconfig)),
        KubeRuntimeConfig(
            policy=ClusterPolicy(
                node_selector=COMPUTE,
                tolerations=(Toleration("kiln.dev/pool", "compute"),),
                host_path=str(work / "projects"),
            ),
            default_image=IMAGE,
        ),
    )

    def spec(n: int) -> Any:
        project = work / "projects" / str(n)
        project.mkdir(parents=True, exist_ok=True)
        return WorkloadSpec(
            id=f"session-{n}",
            project_dir=project,
            command=("jupyter", "lab"),
            cpu=0.5,
            memory_bytes=1024**3,
            port=8888,
            placement=Placement("user", "bench-user", n, "session"),
        )

    # Where a start's time goes: its pod's POST answered, the scheduler's binding seen on
    # the watch, the pod running seen on the watch (perf_counter marks by pod name).
    from kiln.runtimes.kubernetes import podstatus

    marks: dict[str, dict[str, float]] = {}
    post = runtime.kube.create

    def create(manifest: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        reply = post(manifest, dry_run)
        if manifest["kind"] == "Pod":
            marks.setdefault(manifest["metadata"]["name"], {})["created"] = time.perf_counter()
        return reply

    def on_pod(kind: str, pod: dict[str, Any]) -> None:
        mark = marks.setdefault(pod["metadata"]["name"], {})
        if (pod.get("spec") or {}).get("nodeName"):
            mark.setdefault("scheduled", time.perf_counter())
        if podstatus.is_running(pod):
            mark.setdefault("running", time.perf_counter())

    runtime.kube.create = create  # type: ignore[method-assign]
    runtime.pods.add_listener(on_pod)
    phases: dict[str, list[dict[str, float]]] = {"provisioned": [], "cold": [], "warm": []}

    def timed(which: str, workload: Any) -> float:
        started = time.perf_counter()
        runtime.start(workload)
        ended = time.perf_counter()
        mark = marks.get(runtime.get_state(workload.id)["pod"], {})
        if {"created", "scheduled", "running"} <= mark.keys():
            phases[which].append(
                {
                    "to_pod_created": (mark["created"] - started) * 1000,
                    "created_to_scheduled": (mark["scheduled"] - mark["created"]) * 1000,
                    "scheduled_to_running": (mark["running"] - mark["scheduled"]) * 1000,
                    "running_to_returned": (ended - mark["running"]) * 1000,
                }
            )
        return (ended - started) * 1000

    runtime.start(spec(1000))  # the user's namespace, once (not part of a start after)
    # New projects whose storage the provisioner made when they were created (untimed).
    tenant = Tenant("user", "bench-user")
    for n in range(1, STARTS + 1):
        provision(runtime, tenant, n, spec(n).project_dir)
    times, provisioned_requests = [], []
    for n in range(1, STARTS + 1):
        before = runtime.kube.requests
        times.append(timed("provisioned", spec(n)))
        provisioned_requests.append(runtime.kube.requests - before)
    # New projects the provisioner has not seen yet: the start makes the PV and claim.
    cold, fresh_requests, warm_requests = [], [], []
    for n in range(STARTS + 1, 2 * STARTS + 1):
        before = runtime.kube.requests
        cold.append(timed("cold", spec(n)))
        fresh_requests.append(runtime.kube.requests - before)
    warm = []
    for n in range(1, STARTS + 1):  # a second session in each project: the pod alone
        from dataclasses import replace

        again = replace(spec(n), id=f"again-{n}")
        before = runtime.kube.requests
        warm.append(timed("warm", again))
        warm_requests.append(runtime.kube.requests - before)
    for workload in runtime.list_workloads():
        runtime.stop(workload, grace=1)
        runtime.remove(workload)
    runtime.close()
    return {
        "provisioned": times,
        "cold": cold,
        "warm": warm,
        "provisioned_requests": statistics.mean(provisioned_requests),
        "cold_requests": statistics.mean(fresh_requests),
        "warm_requests": statistics.mean(warm_requests),
        "breakdown": {
            which: {
                phase: round(statistics.median(row[phase] for row in rows), 1) for phase in rows[0]
            }
            for which, rows in phases.items()
            if rows
        },
    }


def kubespawner_starts(plane: Any, work: Path) -> tuple[list[float], list[float]]:
    from kiln.runtimes.kubernetes.client import Kube

    os.environ["KUBECONFIG"] = str(plane.kubeconfig)
    admin = Kube.from_kubeconfig(str(plane.kubeconfig))
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "jhub"}})
    for n in range(STARTS):  # static volumes for the users' claims (no provisioner here)
        path = work / "jhub" / str(n)
        path.mkdir(parents=True)
        admin.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"jhub-{n}"},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "jhub-static",
                    "hostPath": {"path": str(path)},
                },
            }
        )
    admin.close()
    from kubespawner import KubeSpawner
    from kubespawner.spawner import MockObject

    async def run() -> tuple[list[float], list[float]]:
        times, again, spawners = [], [], []
        for n in range(STARTS):
            user = MockObject()
            user.name, user.id, user.url = f"user{n}", n + 1, f"/user/user{n}/"
            spawner = KubeSpawner(
                _mock=True,
                user=user,
                namespace="jhub",
                image=IMAGE,
                cmd=["jupyterhub-singleuser"],
                cpu_guarantee=0.5,
                cpu_limit=0.5,
                mem_guarantee="1G",
                mem_limit="1G",
                node_selector=COMPUTE,
                tolerations=[{**TAINT, "operator": "Equal"}],
                storage_pvc_ensure=True,
                storage_class="jhub-static",
                storage_capacity="10Gi",
                storage_access_modes=["ReadWriteOnce"],
                volumes=[{"name": "home", "persistentVolumeClaim": {"claimName": "{pvc_name}"}}],
                volume_mounts=[{"name": "home", "mountPath": "/home/jovyan"}],
                start_timeout=120,
            )
            spawner.api_token = "bench-token"
            started = time.perf_counter()
            await spawner.start()
            times.append((time.perf_counter() - started) * 1000)
            spawners.append(spawner)
        for spawner in spawners:  # the same user again: the PVC exists
            await spawner.stop(now=True)
            started = time.perf_counter()
            await spawner.start()
            again.append((time.perf_counter() - started) * 1000)
        return times, again

    return asyncio.run(run())


RSS_PROBE = r"""
import json, sys, time
from pathlib import Path
from kiln.runtimes.kubernetes import KubeRuntimeConfig, KubernetesRuntime
from kiln.runtimes.kubernetes.client import Kube
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
kubeconfig, state, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
idle = rss()
runtime = KubernetesRuntime(state, Kube.from_kubeconfig(kubeconfig), KubeRuntimeConfig())
for n in range(count):
    runtime.load_state({"version": 1, "id": f"rss-{n}", "namespace": "kiln-u-rss",
                        "pod": f"w-rss-{n}", "service": None, "log_max_bytes": 1 << 24,
                        "port": None})
runtime.pods.wait_for(lambda: len(runtime.pods) >= count, 120)
time.sleep(2)
print(json.dumps({"idle_mb": idle, "rss_mb": rss(), "cached_pods": len(runtime.pods)}))
"""


def runner_rss(plane: Any, work: Path, count: int = 1000) -> dict[str, float]:
    """A runner-like process whose caches hold ``count`` running workloads' pods."""
    from kiln.runtimes.base import Placement, WorkloadSpec
    from kiln.runtimes.kubernetes import manifests
    from kiln.runtimes.kubernetes.client import Kube
    from kiln.runtimes.kubernetes.manifests import ClusterPolicy, PodInput, Tenant

    admin = Kube.from_kubeconfig(str(plane.kubeconfig))
    plane.add_nodes(10, prefix="rss", cpu="64", memory="256Gi", pods=120)
    tenant = Tenant("user", "rss")
    for manifest in manifests.namespace_objects(tenant, ClusterPolicy(), None):
        admin.apply(manifest)
    policy = ClusterPolicy(host_path=str(work / "projects"))
    admin.apply(manifests.project_volume(policy, "kiln-u-rss", 1))
    admin.apply(manifests.project_claim(policy, "kiln-u-rss", 1))
    for n in range(count):
        spec = WorkloadSpec(
            id=f"rss-{n}",
            project_dir=work / "projects" / "1",
            command=("sleep", "infinity"),
            cpu=0.01,
            memory_bytes=32 * 1024**2,
            placement=Placement("user", "rss", 1),
        )
        admin.create(manifests.pod(policy, PodInput(spec, tenant, 1, IMAGE)))
    admin.close()
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(plane.kubeconfig), str(work / "rss"), str(count)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    from kiln.runtimes.kubernetes.client import Kube
    from kiln.runtimes.kubernetes.manifests import priority_classes
    from kiln.testing.kube import ControlPlane

    with tempfile.TemporaryDirectory(prefix="kiln-k8s-bench-") as tmp:
        work = Path(tmp)
        plane = ControlPlane.start(work / "cluster")
        try:
            plane.add_nodes(
                2, prefix="compute", labels=COMPUTE, taints=[TAINT], cpu="64", memory="256Gi"
            )
            admin = Kube.from_kubeconfig(str(plane.kubeconfig))
            for manifest in priority_classes():
                admin.apply(manifest)
            admin.close()
            measured = kiln_starts(plane, work)
            peer, peer_again = kubespawner_starts(plane, work)
            memory = runner_rss(plane, work)
        finally:
            plane.stop()
    kiln, cold, kiln_again = measured["provisioned"], measured["cold"], measured["warm"]
    p50, p95 = statistics.median(kiln), percentile(kiln, 0.95)
    cold50, cold95 = statistics.median(cold), percentile(cold, 0.95)
    peer50, peer95 = statistics.median(peer), percentile(peer, 0.95)
    load = os.getloadavg()
    setting = (
        f"{STARTS} starts each, one after another, on the test control plane (Kubernetes "
        f"{plane.version} built from its Go modules, KWOK fake nodes with Kiln's Stage files: "
        "no container runs); 2 shared cores (the API server, controller manager, scheduler "
        f"and KWOK included), load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} "
        "(1/5/15 min) at the end of the run. breakdown_p50_ms (Kiln): medians of "
        "to_pod_created (start() called until the pod's POST answered: the storage checks "
        "or work, then the POST), created_to_scheduled and scheduled_to_running (the "
        "scheduler's binding, then KWOK's Running, as the runtime's watch delivers them), "
        "running_to_returned (the Service's apply, if still in flight, and the wake-up). "
    )
    peer_part = (
        "KubeSpawner: start() for a new user, which creates its PVC (bound to a static PV) "
        "and its pod, until its reflector sees the pod Running, as JupyterHub spawns"
    )
    conditions = setting + (
        "Kiln: each start a new project's first session whose claim and volume the "
        "provisioner made beforehand (kubesite.provision: the namespace objects, PV and "
        "PVC, waited until Bound; untimed, as when the project is created), then "
        "KubernetesRuntime.start() (the pod; it finds the claim made and sends nothing for "
        "it) until its watch cache sees the pod running; " + peer_part
    )
    cold_conditions = setting + (
        "Kiln: each start a new project's first session with no storage made beforehand "
        "(the provisioner had not seen the project yet): KubernetesRuntime.start() creates "
        "the PVC and the PV naming it, waits for the PV controller to bind them, then "
        "creates the pod, until its watch cache sees the pod running; " + peer_part
    )
    peer_name = "JupyterHub KubeSpawner (pip), same API server, same Stage files, a PVC each"
    results = [
        {
            "metric": "k8s_session_start_p50",
            "unit": "ms",
            "value": round(p50, 1),
            "target": None,
            "peer": peer_name,
            "peer_value": round(peer50, 1),
            "ratio": round(p50 / peer50, 2),
            "p95": round(p95, 1),
            "peer_p95": round(peer95, 1),
            "breakdown_p50_ms": measured["breakdown"].get("provisioned"),
            "conditions": conditions,
        },
        {
            "metric": "k8s_session_start_ratio_vs_kubespawner",
            "unit": "ratio",
            "value": round(p50 / peer50, 2),
            "target": 0.5,
            "peer": peer_name,
            "peer_value": 1.0,
            "ratio": round(p50 / peer50, 2),
            "conditions": conditions,
        },
        {
            "metric": "k8s_session_start_p50_cold_project",
            "unit": "ms",
            "value": round(cold50, 1),
            "target": None,
            "peer": peer_name,
            "peer_value": round(peer50, 1),
            "ratio": round(cold50 / peer50, 2),
            "p95": round(cold95, 1),
            "peer_p95": round(peer95, 1),
            "breakdown_p50_ms": measured["breakdown"].get("cold"),
            "conditions": cold_conditions,
        },
        {
            "metric": "k8s_session_start_p50_existing_project",
            "unit": "ms",
            "value": round(statistics.median(kiln_again), 1),
            "target": None,
            "peer": peer_name + " (the same user's second start: the PVC exists)",
            "peer_value": round(statistics.median(peer_again), 1),
            "ratio": round(statistics.median(kiln_again) / statistics.median(peer_again), 2),
            "p95": round(percentile(kiln_again, 0.95), 1),
            "peer_p95": round(percentile(peer_again, 0.95), 1),
            "breakdown_p50_ms": measured["breakdown"].get("warm"),
            "conditions": setting
            + "each start a second session in a project whose claim exists (Kiln: "
            "KubernetesRuntime.start() until its watch cache sees the pod running; "
            "KubeSpawner: stop, then start() the same user again until its reflector sees "
            "the pod Running)",
        },
        {
            "metric": "k8s_requests_per_start",
            "unit": "requests",
            "value": round(measured["cold_requests"], 1),
            "target": None,
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "first_session_provisioned_project": round(measured["provisioned_requests"], 1),
            "second_session_same_project": round(measured["warm_requests"], 1),
            "conditions": "API-server requests Kiln's runtime sends per start (its own counter): "
            "value: a new project's first start with no storage made beforehand (its claim "
            "and PV, then the pod and its Service); first_session_provisioned_project: the "
            "same when the provisioner made the storage beforehand (its own requests not "
            "counted); a second session in the same project sends the pod and Service alone; "
            "every poll reads the watch cache",
        },
        {
            "metric": "k8s_runner_rss_1000",
            "unit": "MB",
            "value": round(memory["rss_mb"], 1),
            "target": None,
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "idle_mb": round(memory["idle_mb"], 1),
            "conditions": "resident memory of a process with the kubernetes runtime whose watch "
            f"caches hold {int(memory['cached_pods'])} running workload pods (re-attached "
            "with load_state), Python 3.11",
        },
    ]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
