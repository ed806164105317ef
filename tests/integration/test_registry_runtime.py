"""Runtimes from Kiln's registry, end to end (SQLite and PostgreSQL): a site admin pushes an
image with skopeo into runtimes/…, registers it, and a session starts on it in a real
sandbox; the registry then keeps what the runtime points at."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kiln.build.oci.testing import Entry, layer_tar, write_oci_archive
from kiln.cli.main import app
from kiln.settings import Settings
from kiln.testing.live import LiveServer
from kiln.testing.tools import require
from tests.conftest import Account
from tests.integration.test_oci_runtime import _tar_of
from tests.integration.test_runtime_local_rootfs import minimal_rootfs
from tests.integration.test_sessions_support import (  # noqa: F401  (runner: a fixture)
    RunnerHandle,
    make_project,
    runner,
    start_session,
)
from tests.registry_support import bearer, errors_of, token

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _skopeo_push(live: LiveServer, admin: Account, archive: Path, repo: str, tmp: Path) -> None:
    skopeo = require("skopeo", "pushing a runtime image")
    certs = tmp / "certs"
    certs.mkdir(exist_ok=True)
    shutil.copy(live.ca_file, certs / "ca.crt")
    host = live.url.removeprefix("https://").rstrip("/")
    auth = ["--authfile", str(tmp / "auth.json")]
    for args in (
        ["login", *auth, "--cert-dir", str(certs), "-u", admin.username, "-p", admin.key, host],
        [
            "copy",
            *auth,
            "--dest-cert-dir",
            str(certs),
            f"oci-archive:{archive}",
            f"docker://{host}/{repo}",
        ],
    ):
        done = subprocess.run([str(skopeo), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _image(tmp_path: Path, marker: bytes) -> Path:
    tree = tmp_path / "tree"
    base = _tar_of(tree if tree.exists() else minimal_rootfs(tree))  # the same base each time
    top = layer_tar(
        [
            Entry("etc/kiln-marker", data=marker),
            Entry("usr/bin/bash", "symlink", target="dash"),  # terminals start bash -l
        ]
    )
    archive = tmp_path / f"image-{len(marker)}.tar"
    write_oci_archive(archive, [base, top])
    return archive


def test_a_pushed_runtime_is_registered_and_a_session_runs_on_it(
    live: LiveServer,
    client: TestClient,
    settings: Settings,
    runner: RunnerHandle,  # noqa: F811
    admin: Account,
    alice: Account,
    tmp_path: Path,
) -> None:
    _skopeo_push(
        live, admin, _image(tmp_path, b"pushed with skopeo\n"), "runtimes/tiny:1", tmp_path
    )

    refused = client.post(
        "/api/v1/runtimes", json={"image": "runtimes/tiny:1"}, headers=alice.headers
    )
    assert refused.status_code == 403
    added = client.post(
        "/api/v1/runtimes",
        json={"image": "runtimes/tiny:1", "description": "a tiny image"},
        headers=admin.headers,
    )
    assert added.status_code == 201, added.text
    runtime = added.json()
    assert (runtime["name"], runtime["source"]) == ("tiny-1", "registry")
    assert runtime["image_repository"] == "runtimes/tiny"
    assert runtime["image_digest"].startswith("sha256:") and runtime["editors"] == ["terminal"]

    project = make_project(client, alice)
    session = start_session(client, project, alice, editor="terminal", runtime="tiny-1")
    assert session["state"] == "running" and session["runtime"] == "tiny-1", session
    url = f"{project}/sessions/{session['id']}/terminal"
    with client.websocket_connect(url, headers=alice.headers) as ws:
        ws.send_bytes(b"cat /etc/kiln-marker /etc/os-release\n")
        seen = b""
        for _ in range(100):  # the prompt ("$ ") may share a line with the output
            seen += ws.receive_bytes()
            if b"pushed with skopeo\r\nID=kiln-test-image\r\n" in seen:
                break
        assert b"pushed with skopeo\r\nID=kiln-test-image\r\n" in seen, seen[-500:]

    # the registry keeps what the runtime points at
    as_admin = bearer(token(client, admin, "repository:runtimes/tiny:pull,push,delete"))
    held = client.delete(f"/v2/runtimes/tiny/manifests/{runtime['image_digest']}", headers=as_admin)
    assert held.status_code == 409 and errors_of(held) == ["DENIED"]
    assert "runtime tiny-1" in held.json()["errors"][0]["message"]


def test_kiln_runtimes_add_image_unpacks_only_new_layers(
    live: LiveServer, settings: Settings, admin: Account, tmp_path: Path
) -> None:
    _skopeo_push(live, admin, _image(tmp_path, b"one\n"), "runtimes/tiny:1", tmp_path)
    _skopeo_push(
        live, admin, _image(tmp_path, b"two, on the same base\n"), "runtimes/tiny:2", tmp_path
    )
    env = {"KILN_DATA_DIR": str(settings.data_dir), "KILN_DATABASE_URL": settings.db_url}

    def add(*args: str) -> str:
        result = CliRunner().invoke(app, ["runtimes", "add", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    assert "added runtime tiny-1" in add("--image", "runtimes/tiny:1")
    snapshots = set((settings.runtimes_dir / "rootfs").iterdir())
    assert len(snapshots) == 2  # the base layer and the marker layer
    assert "added runtime second" in add("--image", "runtimes/tiny:2", "--name", "second")
    new = set((settings.runtimes_dir / "rootfs").iterdir()) - snapshots
    assert len(new) == 1  # only the new top layer was unpacked
    [rootfs] = new
    assert (rootfs / "etc/kiln-marker").read_bytes() == b"two, on the same base\n"
    listed = CliRunner().invoke(app, ["runtimes", "list", "--json"], env=env)
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert rows["second"]["source"] == "registry"

    missing = CliRunner().invoke(app, ["runtimes", "add", "--image", "runtimes/tiny:9"], env=env)
    assert missing.exit_code == 1 and "not in the registry" in missing.output
    both = CliRunner().invoke(
        app, ["runtimes", "add", "x.tar", "--image", "runtimes/tiny:1"], env=env
    )
    assert both.exit_code == 2
