"""`kiln up --runtime kubernetes --kubeconfig …`: the whole site, its sessions as pods.

The site runs as a user runs it (supervisor, web tier, runner) against the test control
plane; a session started through the API becomes a pod in the user's namespace on a
compute-pool node, its timeline shows Kubernetes' own steps, and a start that cannot succeed
says why at once; a job's run is a pod too, and its exit code (set through KWOK's stage, as
a kubelet would report it) ends the run; a model replica is a pod of its build's image and
an application a pod with the project, each behind a Service. (On KWOK's fake nodes no
process runs: terminals, model servers and apps need a real node.)
"""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.runtimes.kubernetes.client import Kube
from tests.kiln_site import KilnSite

pytestmark = pytest.mark.slow
_sites = itertools.count(1)


WEB_URL = "https://kiln-web.kiln.svc/"  # the chart's web Service (not resolved on KWOK)


def owner(site: KilnSite) -> str:
    """The site's first admin's name, and so (kiln-u-NAME) its namespace."""
    return site.env["KILN_ADMIN_USERNAME"]


@pytest.fixture
def k8s_site(kube_cluster: Any, tmp_path: Path) -> Iterator[KilnSite]:
    """A site whose first admin has a name of its own: every site numbers its projects from
    1, and two sites' admins named alike would share a namespace and its project volumes
    on the one test cluster (a cluster serves one Kiln)."""
    site = KilnSite(
        tmp_path,
        args=("--runtime", "kubernetes", "--kubeconfig", str(kube_cluster.kubeconfig)),
        env={
            "KILN_KUBERNETES_DEFAULT_IMAGE": "registry.kiln.test/runtimes/python:1",
            "KILN_KUBERNETES_NODE_SELECTOR": '{"kiln.dev/pool": "compute"}',
            "KILN_KUBERNETES_TOLERATIONS": '["kiln.dev/pool=compute:NoSchedule"]',
            "KILN_KUBERNETES_START_TIMEOUT": "30",
            "KILN_KUBERNETES_WEB_URL": WEB_URL,
            "KILN_ADMIN_USERNAME": f"admin{next(_sites)}",
        },
    )
    try:
        yield site
    finally:
        site.stop()


def api(site: KilnSite) -> httpx.Client:
    """The site's API as its first admin, once it is up."""
    site.wait_for_output("Kiln is up")
    site.wait_for_output("runner serving gRPC")
    key = httpx.post(
        f"https://localhost:{site.port}/api/v1/auth/api-keys",
        auth=(owner(site), "first-admin-password"),
        json={"name": "test"},
        verify=site.ca_file,
    )
    assert key.status_code == 201, key.text
    return httpx.Client(
        base_url=f"https://localhost:{site.port}", verify=site.ca_file, timeout=60,
        headers={"Authorization": f"Bearer {key.json()['key']}"},
    )  # fmt: skip


def pods_of(
    admin: Kube, namespace: str, kind: str, why: Callable[[], object] = str, timeout: float = 60
) -> list[dict[str, Any]]:
    """The admin's pods of this kind, once one is scheduled (else fail saying ``why()``).

    The runner answers once it has created the pod; the scheduler binds it to a node a
    moment later, so a pod without ``spec.nodeName`` yet is not an answer.
    """
    return listed(
        admin, "Pod", namespace, kind, lambda pod: bool(pod["spec"].get("nodeName")), why, timeout
    )


def services_of(
    admin: Kube, namespace: str, kind: str, why: Callable[[], object] = str
) -> list[dict[str, Any]]:
    """The Services of this kind, once there is one. The runner creates a workload's Service
    one request after its pod, so a pod seen already does not mean its Service is there yet."""
    return listed(admin, "Service", namespace, kind, lambda _: True, why, timeout=30)


def listed(
    admin: Kube,
    resource: str,
    namespace: str,
    kind: str,
    done: Callable[[dict[str, Any]], bool],
    why: Callable[[], object],
    timeout: float,
) -> list[dict[str, Any]]:
    """The objects labelled with this workload kind, once there are some and all are
    ``done`` (else fail saying ``why()``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = admin.list(resource, namespace, labelSelector=f"kiln.dev/kind={kind}")[0]
        if found and all(done(item) for item in found):
            return found
        assert time.monotonic() < deadline, f"no {resource} of {kind} ({found}): {why()}"
        time.sleep(0.2)


def test_sessions_run_as_pods_with_kubernetes_steps(k8s_site: KilnSite, kube_cluster: Any) -> None:
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    namespace = f"kiln-u-{owner(k8s_site)}"
    with api(k8s_site) as http:
        project = http.post("/api/v1/projects", json={"name": "on-k8s"})
        assert project.status_code == 201, project.text
        sessions = f"/api/v1/projects/{owner(k8s_site)}/{project.json()['slug']}/sessions"
        session = http.post(sessions, json={"editor": "terminal"}).json()
        assert session["state"] == "running", session

        def kubernetes_steps() -> list[str]:
            current = http.get(f"{sessions}/{session['id']}").json()
            timeline = [entry["message"] for entry in current["timeline"]]
            scheduled = any(m.startswith("scheduled on node compute-") for m in timeline)
            if scheduled and "image pulled" in timeline and "container started" in timeline:
                return timeline
            return []

        # Kubernetes' own steps, as the runner's watch saw them (a loaded machine may record
        # the last of them just after the start answered).
        deadline = time.monotonic() + 20
        while not kubernetes_steps():
            assert time.monotonic() < deadline, http.get(f"{sessions}/{session['id']}").json()
            time.sleep(0.2)
        pods, _ = admin.list("Pod", namespace, labelSelector="kiln.dev/kind=session")
        assert len(pods) == 1 and pods[0]["spec"]["nodeName"].startswith("compute-")
        (container,) = pods[0]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["CDSW_PROJECT"] == project.json()["slug"]
        # The Kiln API as pods reach it, and what trusting and calling it takes, at /run/kiln.
        assert env["KILN_API_URL"] == WEB_URL and env["CDSW_API_URL"] == f"{WEB_URL}api/v1"
        assert env["SSL_CERT_FILE"] == env["KILN_CA_BUNDLE"] == "/run/kiln/ca-bundle.crt"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/kiln"]
        (volume,) = [v for v in pods[0]["spec"]["volumes"] if v["name"] == mount["name"]]
        shown = admin.get("ConfigMap", volume["configMap"]["name"], namespace)["binaryData"]
        paths = {item["path"]: item["key"] for item in volume["configMap"]["items"]}
        bundle = base64.b64decode(shown[paths["ca-bundle.crt"]])
        assert Path(k8s_site.ca_file).read_bytes().strip() in bundle  # Kiln's CA is in it
        assert "python/kiln/sdk/workers.py" in paths

        stopped = http.delete(f"{sessions}/{session['id']}").json()
        assert stopped["state"] == "stopped", stopped
        deadline = time.monotonic() + 30
        while admin.list("Pod", namespace, labelSelector="kiln.dev/kind=session")[0]:
            assert time.monotonic() < deadline, "the session's pod outlived the session"
            time.sleep(0.2)
    admin.close()


def test_job_runs_are_pods_and_end_with_their_exit_code(
    k8s_site: KilnSite, kube_cluster: Any
) -> None:
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    namespace = f"kiln-u-{owner(k8s_site)}"
    with api(k8s_site) as http:
        project = http.post("/api/v1/projects", json={"name": "jobs-on-k8s"})
        assert project.status_code == 201, project.text
        base = f"/api/v1/projects/{owner(k8s_site)}/{project.json()['slug']}"
        written = http.put(f"{base}/files/train.py", content=b"print('training')\n")
        assert written.status_code == 201, written.text
        jobs = f"{base}/jobs"
        made = http.post(jobs, json={"name": "train", "script": "train.py"})
        assert made.status_code == 201, made.text
        for code, ending in ((0, "succeeded"), (3, "failed")):
            run = http.post(f"{jobs}/train/runs")
            assert run.status_code == 201, run.text
            url = f"{jobs}/train/runs/{run.json()['id']}"
            pods = pods_of(admin, namespace, "job-run", why=lambda u=url: http.get(u).json())
            assert len(pods) == 1 and pods[0]["spec"]["nodeName"].startswith("compute-")
            command = pods[0]["spec"]["containers"][0]["command"] or []
            assert any("train.py" in part for part in command), command
            # The "process" exits: what a kubelet reports, through KWOK's exit stage.
            name = pods[0]["metadata"]["name"]
            exit_code = {"kwok.kiln.dev/exit-code": str(code)}
            admin.patch("Pod", name, namespace, {"metadata": {"annotations": exit_code}})
            deadline = time.monotonic() + 30
            while (state := http.get(url).json()["state"]) != ending:
                assert state in ("queued", "waiting", "starting", "running"), state
                assert time.monotonic() < deadline, f"the run is still {state}"
                time.sleep(0.2)
            deadline = time.monotonic() + 30
            while admin.list("Pod", namespace, labelSelector="kiln.dev/kind=job-run")[0]:
                assert time.monotonic() < deadline, "the run's pod outlived the run"
                time.sleep(0.2)
    admin.close()


def test_model_replicas_are_pods_of_the_builds_image(k8s_site: KilnSite, kube_cluster: Any) -> None:
    """A deployed model's replica is a pod pulling the model build's image from the
    registry (the code that was built, no project volume), behind a Service; stopping the
    model deletes both. (KWOK runs no model server: the replica never becomes ready.)"""
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    namespace = f"kiln-u-{owner(k8s_site)}"
    with api(k8s_site) as http:
        project = http.post("/api/v1/projects", json={"name": "models-on-k8s"})
        assert project.status_code == 201, project.text
        base = f"/api/v1/projects/{owner(k8s_site)}/{project.json()['slug']}"
        code = b"def predict(args):\n    return {'y': args['x'] * 2}\n"
        assert http.put(f"{base}/files/predict.py", content=code).status_code == 201
        model = {"name": "double", "file": "predict.py", "function": "predict"}
        assert http.post(f"{base}/models", json=model).status_code == 201
        models = f"{base}/models/double"
        made = http.post(f"{models}/builds")
        assert made.status_code == 201, made.text
        deadline = time.monotonic() + 600
        while (build := http.get(f"{models}/builds/1").json()["build"])["state"] != "succeeded":
            # queued, waiting, starting, running: any state but an end other than success
            assert build["state"] not in ("failed", "timed_out", "stopped"), build
            assert time.monotonic() < deadline, f"the build is still {build['state']}"
            time.sleep(1)
        deployed = http.post(f"{models}/deployments", json={})
        assert deployed.status_code == 201, deployed.text
        why = lambda: http.get(f"{models}/replicas").json()  # noqa: E731
        (pod,) = pods_of(admin, namespace, "model-replica", why=why)
        container = pod["spec"]["containers"][0]
        image = build["image"]
        assert container["image"].endswith(f"{image['repository']}@{image['digest']}")
        assert [v["name"] for v in pod["spec"]["volumes"]] == ["tmp"]  # no project volume
        services = services_of(admin, namespace, "model-replica", why=why)
        assert len(services) == 1, services
        (replica,) = http.get(f"{models}/replicas").json()
        assert replica["state"] in ("starting", "running") and not replica["ready"], replica
        stopped = http.post(f"{models}/stop")
        assert stopped.status_code == 200, stopped.text
        deadline = time.monotonic() + 60
        while admin.list("Pod", namespace, labelSelector="kiln.dev/kind=model-replica")[0]:
            assert time.monotonic() < deadline, "the replica's pod outlived the deployment"
            time.sleep(0.2)
    admin.close()


def test_applications_are_pods_with_the_project_behind_a_service(
    k8s_site: KilnSite, kube_cluster: Any
) -> None:
    """An application is a pod on the runtime's image with the project's volume at
    /home/cdsw, reached through a Service on its port; stopping it deletes both. (KWOK runs
    no app: it stays starting.)"""
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    namespace = f"kiln-u-{owner(k8s_site)}"
    with api(k8s_site) as http:
        project = http.post("/api/v1/projects", json={"name": "apps-on-k8s"})
        assert project.status_code == 201, project.text
        base = f"/api/v1/projects/{owner(k8s_site)}/{project.json()['slug']}"
        script = b"import http.server\n"
        assert http.put(f"{base}/files/app.py", content=script).status_code == 201
        made = http.post(
            f"{base}/applications",
            json={"name": "dash", "subdomain": "dash-k8s", "script": "app.py"},
        )
        assert made.status_code == 201, made.text
        app = f"{base}/applications/{made.json()['id']}"
        (pod,) = pods_of(admin, namespace, "application", why=lambda: http.get(app).json())
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["project"]["persistentVolumeClaim"]["claimName"].startswith("project-")
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/home/cdsw"] == "project"
        assert any("app.py" in part for part in container["command"]), container["command"]
        (service,) = services_of(admin, namespace, "application", why=lambda: http.get(app).json())
        assert [p["port"] for p in service["spec"]["ports"]] == [
            container["ports"][0]["containerPort"]
        ]
        assert http.get(app).json()["state"] in ("starting", "running")
        stopped = http.post(f"{app}/stop")
        assert stopped.status_code == 200, stopped.text
        deadline = time.monotonic() + 60
        while admin.list("Pod", namespace, labelSelector="kiln.dev/kind=application")[0]:
            assert time.monotonic() < deadline, "the application's pod outlived its stop"
            time.sleep(0.2)
    admin.close()
