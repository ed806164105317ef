"""`kiln up --runtime kubernetes --kubeconfig …`: the whole site, its sessions as pods.

The site runs as a user runs it (supervisor, web tier, runner) against the test control
plane; a session started through the API becomes a pod in the user's namespace on a
compute-pool node, its timeline shows Kubernetes' own steps, and a start that cannot succeed
says why at once. (On KWOK's fake nodes no process runs: terminals need a real node.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.runtimes.kubernetes.client import Kube
from tests.kiln_site import KilnSite

pytestmark = pytest.mark.slow


@pytest.fixture
def k8s_site(kube_cluster: Any, tmp_path: Path) -> Iterator[KilnSite]:
    site = KilnSite(
        tmp_path,
        args=("--runtime", "kubernetes", "--kubeconfig", str(kube_cluster.kubeconfig)),
        env={
            "KILN_KUBERNETES_DEFAULT_IMAGE": "registry.kiln.test/runtimes/python:1",
            "KILN_KUBERNETES_NODE_SELECTOR": '{"kiln.dev/pool": "compute"}',
            "KILN_KUBERNETES_TOLERATIONS": '["kiln.dev/pool=compute:NoSchedule"]',
            "KILN_KUBERNETES_START_TIMEOUT": "30",
        },
    )
    try:
        yield site
    finally:
        site.stop()


def test_sessions_run_as_pods_with_kubernetes_steps(k8s_site: KilnSite, kube_cluster: Any) -> None:
    site = k8s_site
    site.wait_for_output("Kiln is up")
    site.wait_for_output("runner serving gRPC")
    key = httpx.post(
        f"https://localhost:{site.port}/api/v1/auth/api-keys",
        auth=("admin", "first-admin-password"),
        json={"name": "test"},
        verify=site.ca_file,
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    with httpx.Client(
        base_url=f"https://localhost:{site.port}", verify=site.ca_file, headers=headers,
        timeout=60,
    ) as http:  # fmt: skip
        project = http.post("/api/v1/projects", json={"name": "on-k8s"})
        assert project.status_code == 201, project.text
        sessions = f"/api/v1/projects/admin/{project.json()['slug']}/sessions"
        session = http.post(sessions, json={"editor": "terminal"}).json()
        assert session["state"] == "running", session
        timeline = [entry["message"] for entry in session["timeline"]]
        assert any(m.startswith("scheduled on node compute-") for m in timeline), timeline
        assert "image pulled" in timeline and "container started" in timeline
        pods, _ = admin.list("Pod", "kiln-u-admin", labelSelector="kiln.dev/kind=session")
        assert len(pods) == 1 and pods[0]["spec"]["nodeName"].startswith("compute-")
        env = {e["name"]: e["value"] for e in pods[0]["spec"]["containers"][0]["env"]}
        assert env["CDSW_PROJECT"] == project.json()["slug"]

        stopped = http.delete(f"{sessions}/{session['id']}").json()
        assert stopped["state"] == "stopped", stopped
        deadline = time.monotonic() + 30
        while admin.list("Pod", "kiln-u-admin", labelSelector="kiln.dev/kind=session")[0]:
            assert time.monotonic() < deadline, "the session's pod outlived the session"
            time.sleep(0.2)
    admin.close()
