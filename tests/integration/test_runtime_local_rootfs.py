"""The local runtime with an unpacked root filesystem (an OCI runtime image) instead of the
built-in host-derived one, and with cgroups turned off (the rlimit fallback)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import WorkloadSpec
from kiln.runtimes.local import LocalRuntime
from kiln.runtimes.local.launch import pids_in_namespace
from kiln.testing.runtime_contract import (
    all_logs,
    local_runtime_factory,
    read_all,
    wait_exit,
    wait_for_log,
)

BINARIES = ("/usr/bin/dash", "/usr/bin/cat", "/usr/bin/id", "/usr/bin/sleep")


def _copy(source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy2(Path(source).resolve(), target)


def minimal_rootfs(rootfs: Path) -> Path:
    """A tiny merged-/usr image made of a few host binaries and their libraries (no Python)."""
    for binary in BINARIES:
        if not Path(binary).exists():
            pytest.skip(f"{binary} is needed to build the test image")
        _copy(binary, rootfs / "usr/bin" / Path(binary).name)
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
        for line in ldd.stdout.splitlines():
            path = next((p for p in line.split() if p.startswith("/")), None)
            if path:
                in_usr = "/usr" + path if path.startswith(("/lib/", "/lib64/")) else path
                _copy(path, rootfs / in_usr.lstrip("/"))
    (rootfs / "usr/bin/sh").symlink_to("dash")
    for link in ("bin", "lib", "lib64"):
        (rootfs / link).symlink_to(f"usr/{link}")
    (rootfs / "etc").mkdir()
    (rootfs / "etc/os-release").write_text("ID=kiln-test-image\n")
    return rootfs


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


def test_runs_inside_an_unpacked_image(runtime: LocalRuntime, tmp_path: Path) -> None:
    rootfs = minimal_rootfs(tmp_path / "images" / "sha256-test")
    project = tmp_path / "project"
    project.mkdir()
    script = (
        "cat /etc/os-release; id; pwd; "
        "[ -e /usr/bin/python3 ] && echo host-python || echo no-python; "
        "(echo x > /usr/planted) 2>/dev/null || echo image-read-only; "
        "echo kept > /home/cdsw/out; echo started; sleep 30"
    )
    spec = WorkloadSpec(
        id=f"img-{uuid.uuid4().hex[:8]}",
        project_dir=project,
        command=("sh", "-c", script),
        runtime_root=rootfs,
    )
    runtime.start(spec)
    out = wait_for_log(runtime, spec.id, b"started").decode()
    assert "ID=kiln-test-image" in out  # the image's files, not the host's
    assert "uid=1000(cdsw) gid=1000(cdsw)" in out
    assert "/home/cdsw\n" in out
    assert "no-python" in out
    assert "image-read-only" in out
    assert not (rootfs / "usr/planted").exists()
    assert (project / "out").read_text() == "kept\n"
    with runtime.exec(spec.id, ["cat", "/etc/os-release"]) as process:
        assert read_all(process) == b"ID=kiln-test-image\n"
    runtime.stop(spec.id, grace=1)


def test_rlimit_fallback_when_cgroups_are_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kiln.runtimes.local")
    rt = local_runtime_factory(tmp_path / "state", use_cgroups=False)()
    assert isinstance(rt, LocalRuntime)
    try:
        assert any("cgroups disabled" in r.getMessage() for r in caplog.records)
        project = tmp_path / "p"
        project.mkdir()
        hog = WorkloadSpec(
            id=f"rl-{uuid.uuid4().hex[:8]}",
            project_dir=project,
            command=(
                "python3", "-c",
                "import time; print('up', flush=True); time.sleep(1); b = bytearray(600 * 2**20)",
            ),
            memory_bytes=256 * 1024**2,
            pids_max=4096,
        )  # fmt: skip
        rt.start(hog)
        assert rt.get_state(hog.id)["cgroups"] == {}
        wait_for_log(rt, hog.id, b"up")
        pids = pids_in_namespace(rt.get_state(hog.id)["pidns"])
        python = next(p for p in pids if Path(f"/proc/{p}/comm").read_text().startswith("python"))
        limits = Path(f"/proc/{python}/limits").read_text()
        assert f"Max address space         {256 * 1024**2}" in limits
        assert wait_exit(rt, hog.id) == 1
        assert b"MemoryError" in all_logs(rt, hog.id)
        assert any("rlimits instead of cgroups" in r.getMessage() for r in caplog.records)
    finally:
        for workload_id in rt.list_workloads():
            rt.stop(workload_id, grace=0)
            rt.remove(workload_id)
        rt.close()
