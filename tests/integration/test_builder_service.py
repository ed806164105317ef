"""Builds that run: a real builder (sandboxed installs through the local runtime, pip from
PyPI) pushing to a real registry (Debian's docker-registry with token auth), driven through
the API. Reproducibility, the dependency cache, failures, cancels, quotas, and a symlink
that points outside the project."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.build.registry_client import Reference
from kiln.builder.process import RunningBuilder
from kiln.db.engine import make_engine, make_sessionmaker
from kiln.db.models import Project, User
from kiln.domain.resources import Resources, set_quota
from kiln.settings import Settings
from kiln.testing import docker_registry as peer
from tests.conftest import Account
from tests.integration.build_support import (
    BASE,
    build_log,
    registry_target,
    start_build,
    wait_build,
    write_files,
)
from tests.integration.test_sessions_support import make_project

pytestmark = pytest.mark.slow

REQUIREMENTS = "humanize==4.9.0\n"


def project_dir(settings: Settings, project: str) -> Path:
    """The project's directory on disk (to change files as a workload would, uncommitted)."""
    owner, slug = project.rsplit("/", 2)[-2:]
    with make_sessionmaker(make_engine(settings.db_url))() as db:
        found = db.scalar(select(Project).where(Project.slug == slug))
        assert found is not None and found.owner_name == owner
        return settings.projects_dir / str(found.id)


def manifest_and_config(
    build_registry: peer.RunningRegistry, repository: str, tag: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    target = registry_target(build_registry)
    try:
        found = target.get_manifest(Reference(repository, tag))
        manifest = json.loads(found.data)
        dest = Path(build_registry.storage).parent / f"config-{tag}.json"
        target.fetch_blob(repository, manifest["config"]["digest"], dest)
        return manifest, json.loads(dest.read_text())
    finally:
        target.close()


def layer_tar(
    build_registry: peer.RunningRegistry, repository: str, digest: str
) -> tarfile.TarFile:
    target = registry_target(build_registry)
    try:
        dest = Path(build_registry.storage).parent / digest.split(":")[1]
        target.fetch_blob(repository, digest, dest)
    finally:
        target.close()
    return tarfile.open(fileobj=io.BytesIO(dest.read_bytes()), mode="r:gz")


def test_build_push_cache_and_reproduce(
    client: TestClient,
    alice: Account,
    builder: RunningBuilder,
    build_registry: peer.RunningRegistry,
) -> None:
    project = make_project(client, alice)
    write_files(client, project, alice, {"requirements.txt": REQUIREMENTS})
    first = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert first["state"] == "succeeded", first
    steps = {s["name"]: s for s in first["steps"]}
    assert list(steps) == ["snapshot", "base", "dependencies", "code", "push"]
    assert steps["dependencies"]["status"] == "done" and first["dependencies_cached"] is False
    assert all(s["duration_seconds"] is not None for s in first["steps"])
    log = build_log(client, project, alice, first["number"])
    assert "Successfully installed humanize-4.9.0" in log
    assert f"built {build_registry.host}/alice/demo/build@{first['image']['digest']}" in log
    image = first["image"]
    assert image["reference"] == f"{build_registry.host}/alice/demo/build@{image['digest']}"
    assert image["tags"] == ["1", "latest"]

    # Unchanged dependencies: the install is skipped, the layer reused as it is.
    second = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert second["state"] == "succeeded" and second["dependencies_cached"] is True
    assert {s["name"]: s["status"] for s in second["steps"]}["dependencies"] == "cached"
    assert "Successfully installed" not in build_log(client, project, alice, 2)
    # Without the cache: installed again, and the same bytes come out.
    third = start_build(client, project, alice, no_cache=True)
    third = wait_build(client, project, alice, third["number"])
    assert third["state"] == "succeeded" and third["dependencies_cached"] is False
    assert "Successfully installed humanize-4.9.0" in build_log(client, project, alice, 3)
    assert third["layers"] == second["layers"] == first["layers"]
    assert third["commit"] == first["commit"]

    manifest2, config2 = manifest_and_config(build_registry, "alice/demo/build", "2")
    manifest3, config3 = manifest_and_config(build_registry, "alice/demo/build", "3")
    assert manifest2["layers"] == manifest3["layers"]
    labels2, labels3 = config2["config"].pop("Labels"), config3["config"].pop("Labels")
    assert labels2.pop("io.kiln.build") == "alice/demo#2"
    assert labels3.pop("io.kiln.build") == "alice/demo#3"
    assert config2 == config3 and labels2 == labels3  # only the build label differs
    assert labels3["io.kiln.commit"] == third["commit"]
    env = dict(e.split("=", 1) for e in config3["config"]["Env"])
    assert env["PYTHONUSERBASE"] == "/opt/kiln/deps"
    assert env["PATH"].startswith("/opt/kiln/deps/bin:")
    assert config3["config"]["WorkingDir"] == "/home/cdsw"

    # The layers hold what they should: the project at /home/cdsw, packages under the prefix,
    # entries in order, normalized owners and times.
    with layer_tar(build_registry, "alice/demo/build", manifest3["layers"][-1]["digest"]) as code:
        names = code.getnames()
        assert "home/cdsw/main.py" in names and "home/cdsw/requirements.txt" in names
    with layer_tar(build_registry, "alice/demo/build", manifest3["layers"][-2]["digest"]) as deps:
        members = deps.getmembers()
    names = [m.name for m in members]
    assert "opt/kiln/deps/lib/python3.11/site-packages/humanize/__init__.py" in names
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mtime for m in members} == {315532800}


def test_a_failing_install_fails_the_build_with_pips_message(
    client: TestClient,
    alice: Account,
    builder: RunningBuilder,
    build_registry: peer.RunningRegistry,
) -> None:
    project = make_project(client, alice, "pipfail")  # the registry is shared: a fresh name
    write_files(
        client, project, alice, {"requirements.txt": "kiln-no-such-package-exists==0.0.1\n"}
    )
    build = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert build["state"] == "failed" and "the install failed" in build["reason"]
    assert {s["name"]: s["status"] for s in build["steps"]}["dependencies"] == "failed"
    assert "No matching distribution found for kiln-no-such-package-exists" in build_log(
        client, project, alice, 1
    )
    assert build["image"] is None
    target = registry_target(build_registry)
    try:
        with pytest.raises(Exception, match="does not exist"):
            target.get_manifest(Reference("alice/pipfail/build", "1"))
    finally:
        target.close()


def test_a_tracked_file_over_the_limit_fails_naming_it(
    client: TestClient, alice: Account, build_settings: Settings, builder: RunningBuilder
) -> None:
    build_settings.builder.max_file_bytes = 1024**2
    project = make_project(client, alice)
    (project_dir(build_settings, project) / "weights.bin").write_bytes(b"w" * (2 * 1024**2))
    build = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert build["state"] == "failed"
    assert "weights.bin (2.0 MiB)" in build["reason"] and ".gitignore" in build["reason"]
    # Ignored, it is simply left out.
    (project_dir(build_settings, project) / ".gitignore").write_text("*.bin\n")
    build = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert build["state"] == "succeeded", build


def test_a_symlink_out_of_the_project_is_stored_not_followed(
    client: TestClient,
    alice: Account,
    build_settings: Settings,
    builder: RunningBuilder,
    build_registry: peer.RunningRegistry,
) -> None:
    project = make_project(client, alice)
    root = project_dir(build_settings, project)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "etc").symlink_to("/etc")
    build = wait_build(client, project, alice, start_build(client, project, alice)["number"])
    assert build["state"] == "succeeded", build
    digest = build["layers"]["code"]["digest"]
    with layer_tar(build_registry, "alice/demo/build", digest) as code:
        links = {
            m.name: (m.issym(), m.linkname) for m in code if m.name.endswith(("passwd", "etc"))
        }
        contents = b"".join(
            f.read() for m in code.getmembers() if m.isfile() and (f := code.extractfile(m))
        )
    assert links == {
        "home/cdsw/passwd": (True, "/etc/passwd"),
        "home/cdsw/etc": (True, "/etc"),
    }
    assert b"root:x:0:0" not in contents


def test_cancel_a_running_build(
    client: TestClient, alice: Account, builder: RunningBuilder
) -> None:
    project = make_project(client, alice)
    write_files(client, project, alice, {"cdsw-build.sh": "echo installing; sleep 600\n"})
    number = start_build(client, project, alice)["number"]
    wait_build(client, project, alice, number, until=("running",))
    for _ in range(150):
        if "installing" in build_log(client, project, alice, number):
            break
        time.sleep(0.2)
    assert "installing" in build_log(client, project, alice, number)
    cancelled = client.post(f"{project}/builds/{number}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "stopping"
    build = wait_build(client, project, alice, number, timeout=60)
    assert build["state"] == "stopped" and "cancelled by alice" in build["reason"]
    assert builder.builder.runtime.list_workloads() == []  # the sandbox is gone


@pytest.mark.one_database  # the sandbox's limits, not the queue's database
def test_misbehaving_build_scripts_are_contained(
    client: TestClient,
    alice: Account,
    build_settings: Settings,
    build_registry: peer.RunningRegistry,
) -> None:
    """A cdsw-build.sh that forks without end, one that fills its disk and one that never
    exits: each is stopped or fails, says why, and leaves nothing running."""
    from kiln.build.bases import resolve_base
    from kiln.builder.process import start_builder

    # The base unpacked beforehand: the short time limit is for the scripts alone.
    target = registry_target(build_registry)
    try:
        resolve_base(target, Reference.parse(BASE), build_settings.runtimes_dir)
    finally:
        target.close()
    b = build_settings.builder
    # Half a minute (below what the setting accepts from a site; fine for a test).
    b.timeout_minutes, b.pids_max, b.deps_max_bytes, b.tmp_bytes = (
        0.5,
        64,
        32 * 1024**2,
        32 * 1024**2,
    )  # type: ignore[assignment]
    b.cpu_millis, b.memory_bytes, b.max_concurrent_builds = 500, 512 * 1024**2, 3
    running = start_builder(build_settings, port=0)
    b.port = running.port
    try:
        scripts = {
            "forks": "while true; do sleep 1000 & done\n",
            "fills": "cat /dev/zero > /opt/kiln/deps/fill\n",
            "hangs": "echo waiting forever; sleep 100000\n",
        }
        numbers = {}
        for name, script in scripts.items():
            project = make_project(client, alice, name)
            write_files(client, project, alice, {"cdsw-build.sh": script})
            numbers[name] = (project, start_build(client, project, alice)["number"])
        results = {
            name: wait_build(client, project, alice, number, timeout=180)
            for name, (project, number) in numbers.items()
        }
        assert results["fills"]["state"] == "failed"
        assert "No space left on device" in build_log(client, *numbers["fills"][:1], alice, 1)
        hangs = results["hangs"]
        assert hangs["state"] == "timed_out" and "build time limit (0.5 min)" in hangs["reason"]
        # The fork loop hits the process limit: bash gives up (or the time limit ends it).
        assert results["forks"]["state"] in ("failed", "timed_out")
        assert "Resource temporarily unavailable" in build_log(
            client, numbers["forks"][0], alice, 1
        )
        assert running.builder.runtime.list_workloads() == []
    finally:
        running.stop(grace=1)


def test_a_build_waits_for_quota(
    client: TestClient, alice: Account, builder: RunningBuilder, engine: Engine
) -> None:
    with make_sessionmaker(engine)() as db:
        user = db.query(User).filter_by(username="alice").one()
        set_quota(db, user, Resources(500, 8 * 1024**3))
        db.commit()
    project = make_project(client, alice)
    number = start_build(client, project, alice)["number"]
    waiting = wait_build(client, project, alice, number, until=("waiting",))
    assert "waiting for quota" in waiting["reason"]
    with make_sessionmaker(engine)() as db:
        user = db.query(User).filter_by(username="alice").one()
        set_quota(db, user, Resources(4000, 16 * 1024**3))
        db.commit()
    client.post(f"{project}/builds", headers=alice.headers, json={})  # also wakes the builder
    assert wait_build(client, project, alice, number)["state"] == "succeeded"
