"""Real OCI clients against a real Kiln server over TLS (SQLite and PostgreSQL): skopeo,
podman, crane and oras log in with a Kiln username and an API key, push, pull, inspect,
mount, attach and discover — and podman runs what it pulled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kiln.build.oci.testing import Entry, layer_tar, write_oci_archive
from kiln.testing.live import LiveServer
from kiln.testing.tools import require
from tests.conftest import Account
from tests.integration.test_oci_runtime import _tar_of
from tests.integration.test_runtime_local_rootfs import minimal_rootfs

pytestmark = [pytest.mark.slow, pytest.mark.one_database]


class Clients:
    """Credentials and trust for one live server, kept in a temporary directory."""

    def __init__(self, live: LiveServer, tmp: Path, who: Account) -> None:
        self.host = live.url.removeprefix("https://").rstrip("/")
        self.who, self.tmp = who, tmp
        self.certs = tmp / "certs"
        self.certs.mkdir()
        shutil.copy(live.ca_file, self.certs / "ca.crt")  # containers/image: *.crt = a CA
        self.env = {
            **os.environ,
            "SSL_CERT_FILE": str(live.ca_file),  # Go's TLS (crane, oras)
            "DOCKER_CONFIG": str(tmp / "docker"),
            "REGISTRY_AUTH_FILE": str(tmp / "auth.json"),
        }

    def run(self, *args: str | Path, stdin: str | None = None, cwd: Path | None = None) -> str:
        done = subprocess.run(
            [str(a) for a in args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=cwd,
        )
        assert done.returncode == 0, f"{args[:3]} failed: {done.stderr[-2000:]}"
        return done.stdout

    def fails(self, *args: str | Path) -> str:
        done = subprocess.run(
            [str(a) for a in args], env=self.env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode != 0, f"{args[:3]} should have failed: {done.stdout[-500:]}"
        return done.stderr

    def ref(self, repo: str) -> str:
        return f"{self.host}/{repo}"


@pytest.fixture
def clients(live: LiveServer, tmp_path: Path, make_user: Callable[..., Account]) -> Clients:
    alice = make_user("alice")
    with httpx.Client(base_url=live.url, verify=str(live.ca_file)) as http:
        response = http.post("/api/v1/projects", json={"name": "churn"}, headers=alice.headers)
        assert response.status_code == 201, response.text
    return Clients(live, tmp_path, alice)


@pytest.fixture
def image_archive(tmp_path: Path) -> Path:
    """A two-layer image with a working /bin/sh (host binaries) and a marker file."""
    base = _tar_of(minimal_rootfs(tmp_path / "tree"))
    top = layer_tar([Entry("hello.txt", data=b"hello from kiln\n")])
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, [base, top])
    return archive


def test_skopeo_logs_in_copies_in_and_out_and_inspects(
    clients: Clients, image_archive: Path, tmp_path: Path
) -> None:
    skopeo = require("skopeo", "the registry's client tests")
    certs = clients.certs
    wrong = clients.fails(
        skopeo, "login", "--cert-dir", certs, "-u", "alice", "-p", "not-a-key", clients.host
    )
    assert "invalid username/password" in wrong
    login = clients.run(
        skopeo,
        "login",
        "--cert-dir",
        certs,
        "-u",
        "alice",
        "--password-stdin",
        clients.host,
        stdin=clients.who.key,
    )
    assert "Login Succeeded" in login
    target = f"docker://{clients.ref('alice/churn/app:v1')}"
    clients.run(skopeo, "copy", "--dest-cert-dir", certs, f"oci-archive:{image_archive}", target)
    inspected = json.loads(clients.run(skopeo, "inspect", "--cert-dir", certs, target))
    assert inspected["RepoTags"] == ["v1"] and len(inspected["Layers"]) == 2
    raw = json.loads(clients.run(skopeo, "inspect", "--raw", "--cert-dir", certs, target))
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"

    out = tmp_path / "out"
    clients.run(skopeo, "copy", "--src-cert-dir", certs, target, f"oci:{out}:v1")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == inspected["Digest"]
    # a stranger's login works, but the image is as invisible as a missing one
    clients.run(skopeo, "logout", "--all")
    denied = clients.fails(skopeo, "inspect", "--cert-dir", certs, target)
    assert "unauthorized" in denied.lower() or "authentication required" in denied.lower()


def test_podman_logs_in_pulls_runs_and_pushes(clients: Clients, image_archive: Path) -> None:
    skopeo = require("skopeo", "seeding the registry")
    podman = require("podman", "the registry's client tests")
    require("runc", "podman run")
    store = clients.tmp / "podman"
    runroot = Path(tempfile.mkdtemp(prefix="kiln-podman-"))  # podman: at most 50 characters
    base = [
        podman, "--root", store / "root", "--runroot", runroot,
        "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
    ]  # fmt: skip
    certs = ["--cert-dir", str(clients.certs)]
    login = clients.run(
        *base, "login", *certs, "-u", "alice", "--password-stdin", clients.host,
        stdin=clients.who.key,
    )  # fmt: skip
    assert "Login Succeeded" in login
    app = clients.ref("alice/churn/app:v1")
    clients.run(
        skopeo, "copy", "--dest-cert-dir", clients.certs, f"oci-archive:{image_archive}",
        f"docker://{app}",
    )  # fmt: skip
    clients.run(*base, "pull", *certs, app)
    output = clients.run(
        *base, "run", "--rm", "--network", "none",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        app, "/bin/sh", "-c", "cat /hello.txt",
    )  # fmt: skip
    assert output == "hello from kiln\n"
    copy = clients.ref("alice/churn/copy:v2")
    clients.run(*base, "tag", app, copy)
    clients.run(*base, "push", *certs, copy)
    pushed = json.loads(
        clients.run(skopeo, "inspect", "--cert-dir", clients.certs, f"docker://{copy}")
    )
    assert pushed["RepoTags"] == ["v2"]


def test_crane_lists_copies_with_mounts_and_deletes(clients: Clients, image_archive: Path) -> None:
    skopeo = require("skopeo", "seeding the registry")
    crane = require("crane", "the registry's client tests")
    clients.run(
        crane,
        "auth",
        "login",
        clients.host,
        "-u",
        "alice",
        "--password-stdin",
        stdin=clients.who.key,
    )
    app = clients.ref("alice/churn/app")
    clients.run(
        skopeo, "copy", "--dest-cert-dir", clients.certs, f"oci-archive:{image_archive}",
        f"docker://{app}:v1",
    )  # fmt: skip
    assert clients.run(crane, "ls", app).split() == ["v1"]
    digest = clients.run(crane, "digest", f"{app}:v1").strip()
    copied = clients.run(crane, "copy", f"{app}:v1", clients.ref("alice/churn/mirror:v1"))
    assert clients.run(crane, "digest", clients.ref("alice/churn/mirror:v1")).strip() == digest
    assert "mounted blob" in copied or copied == ""  # crane mounts instead of re-uploading
    clients.run(crane, "tag", f"{app}:v1", "stable")
    assert clients.run(crane, "ls", app).split() == ["stable", "v1"]
    clients.run(crane, "delete", f"{app}@{digest}")
    assert clients.run(crane, "ls", app).split() == []
    gone = clients.fails(crane, "manifest", f"{app}@{digest}")
    assert "MANIFEST_UNKNOWN" in gone


def test_oras_pushes_artifacts_attaches_and_discovers_referrers(
    clients: Clients, tmp_path: Path
) -> None:
    oras = require("oras", "the registry's client tests")
    flags = ["--registry-config", str(tmp_path / "oras.json"), "--plain-http=false"]
    flags += ["--ca-file", str(clients.certs / "ca.crt")]
    clients.run(
        oras,
        "login",
        *flags,
        "-u",
        "alice",
        "--password-stdin",
        clients.host,
        stdin=clients.who.key,
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.bin").write_bytes(os.urandom(4096))
    (work / "sbom.json").write_text('{"packages": []}')
    model = clients.ref("alice/churn/model:v1")
    clients.run(
        oras, "push", *flags, model, "--artifact-type", "application/vnd.example.model",
        "model.bin:application/octet-stream", cwd=work,
    )  # fmt: skip
    clients.run(
        oras, "attach", *flags, model, "--artifact-type", "application/vnd.example.sbom",
        "sbom.json:application/json", cwd=work,
    )  # fmt: skip
    found = json.loads(clients.run(oras, "discover", *flags, "--format", "json", model))
    types = [m["artifactType"] for m in found.get("referrers", found.get("manifests", []))]
    assert types == ["application/vnd.example.sbom"]
    out = tmp_path / "out"
    out.mkdir()
    clients.run(oras, "pull", *flags, model, cwd=out)
    assert (out / "model.bin").read_bytes() == (work / "model.bin").read_bytes()
