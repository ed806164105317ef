"""A built image in a real container engine: podman pulls it from the registry (token auth,
TLS) and runs it; the project's code and an installed dependency both work."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln.builder.process import RunningBuilder
from kiln.testing import docker_registry as peer
from tests.conftest import Account
from tests.integration.build_support import (
    start_build,
    wait_build,
    write_files,
)
from tests.integration.test_sessions_support import make_project

pytestmark = [pytest.mark.slow, pytest.mark.one_database]

MAIN = """\
import humanize

print("project code says:", humanize.naturalsize(3_000_000))
"""


def podman(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "podman",
            "--root", str(storage / "root"),
            "--runroot", str(storage / "run"),
            "--runtime", "runc",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip


def test_podman_pulls_and_runs_a_built_image(
    client: TestClient,
    alice: Account,
    builder: RunningBuilder,
    build_registry: peer.RunningRegistry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("NOTICE: podman and runc are not installed (make test installs them)")
    project = make_project(client, alice)
    write_files(client, project, alice, {"requirements.txt": "humanize==4.9.0\n", "app.py": MAIN})
    started = start_build(client, project, alice, command=["python3", "app.py"])
    build = wait_build(client, project, alice, started["number"])
    assert build["state"] == "succeeded", build
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(build_registry.ca_file, certs / "ca.crt")
    # podman wants a short runroot (under 50 characters): a private directory in /tmp.
    storage = Path(tempfile.mkdtemp(prefix="kiln-podman-"))
    request.addfinalizer(lambda: shutil.rmtree(storage, ignore_errors=True))
    reference = build["image"]["reference"]
    pulled = podman(
        storage,
        "pull",
        "--cert-dir", str(certs),
        "--creds", f"{build_registry.username}:{build_registry.password}",
        reference,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    run = podman(
        storage,
        "run", "--rm", "--network", "none",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        reference,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "project code says: 3.0 MB"
    # The default command comes from the build, the working directory is the project's.
    inspect = podman(storage, "image", "inspect", "--format", "{{.Config.WorkingDir}}", reference)
    assert inspect.stdout.strip() == "/home/cdsw"
