"""Builds on Kiln's embedded defaults: `kiln up` with no registry configured pushes Kiln's
base image and every build into Kiln's own registry (the builder mints its own short-lived
tokens; no user's key), the base becomes a runtime the registry keeps, and a real OCI client
pulls the built image with the project member's API key, while another user cannot."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Runtime
from tests.conftest import Account
from tests.kiln_site import KilnSite

pytestmark = [pytest.mark.timeout(420)]

if os.geteuid() != 0:  # pragma: no cover - the builder needs root for its sandboxes
    pytest.skip("NOTICE: builds need root (the builder's sandboxes)", allow_module_level=True)


def api(site: KilnSite, who: Account) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://localhost:{site.port}/api/v1",
        verify=ssl.create_default_context(cafile=site.ca_file),
        headers=who.headers,
        timeout=30,
    )


def wait_build(http: httpx.Client, path: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        build: dict[str, Any] = http.get(path).json()
        if build["state"] in ("succeeded", "failed", "timed_out", "stopped"):
            return build
        assert time.monotonic() < deadline, f"gave up waiting; last: {build}"
        time.sleep(0.5)


def skopeo(site: KilnSite, tmp_path: Path, who: Account, *args: str) -> subprocess.CompletedProcess:
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    shutil.copy(site.ca_file, certs / "ca.crt")
    return subprocess.run(
        ["skopeo", *args, "--cert-dir", str(certs), "--creds", f"{who.username}:{who.key}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, REGISTRY_AUTH_FILE=str(tmp_path / "auth.json")),
    )


def test_a_build_lands_in_kilns_own_registry_and_only_members_pull_it(
    own_registry_site: KilnSite, alice: Account, bob: Account, engine: Engine, tmp_path: Path
) -> None:
    site = own_registry_site
    if shutil.which("skopeo") is None:
        pytest.skip("NOTICE: skopeo is not installed (make test installs it)")
    with api(site, alice) as http:
        created = http.post("/projects", json={"name": "demo", "template": "python-starter"})
        assert created.status_code == 201, created.text
        put = http.put("/projects/alice/demo/files/requirements.txt", content=b"")
        assert put.status_code in (200, 201), put.text
        assert http.post("/projects/alice/demo/builds", json={}).status_code == 201
        build = wait_build(http, "/projects/alice/demo/builds/1")
        log = http.get("/projects/alice/demo/builds/1/logs").text
    assert build["state"] == "succeeded", (build, log)
    image = build["image"]
    assert image["registry"] == f"localhost:{site.port}"
    assert image["repository"] == "alice/demo/build"

    # The base the builder made on first start is in the registry, and a runtime that
    # records its digest (so the registry's garbage collector keeps it).
    with make_sessionmaker(engine)() as db:
        runtime = db.scalars(select(Runtime).where(Runtime.name == "python3.11")).one()
        assert runtime.image_repository == "runtimes/python"
        assert (runtime.image_digest or "").startswith("sha256:")

    ref = f"docker://{image['registry']}/{image['repository']}:1"
    pulled = skopeo(site, tmp_path, alice, "inspect", ref)
    assert pulled.returncode == 0, pulled.stderr
    inspected = json.loads(pulled.stdout)
    assert inspected["Digest"] == image["digest"]
    assert inspected["Labels"]["org.opencontainers.image.revision"]

    denied = skopeo(site, tmp_path, bob, "inspect", ref)
    assert denied.returncode != 0
    assert "unauthorized" in denied.stderr.lower() or "denied" in denied.stderr.lower()
