"""The install step as a pod runs (``pod_install.run_pod_install``): here through the
``local`` runtime on Kiln's base image, which sandboxes for real and execs like the
``kubernetes`` one (the real-node tier, test_runtime_real_pods.py, runs a whole build as a
pod). The builder's
side of each step: the snapshot streamed in, the output copied as it comes, the layer read
out and capped, a stop obeyed, the workload removed whatever happened."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.build.base_image import BaseArchive
from kiln.build.deps import InstallFailed, InstallStopped, SandboxLimits, build_environment
from kiln.build.oci.cache import load_image_archive
from kiln.build.pod_install import install_pod_spec, run_pod_install
from kiln.runtimes.base import Placement, WorkloadRuntime
from kiln.testing.runtime_contract import local_runtime_factory, unique_id

pytestmark = pytest.mark.one_database

LIMITS = SandboxLimits(
    cpu=0.5, memory_bytes=512 * 1024**2, deps_max_bytes=64 * 1024**2, tmp_bytes=32 * 1024**2
)


@pytest.fixture(scope="module")
def base_rootfs(kiln_base: BaseArchive, shared_runtimes: Path) -> Path:
    """Kiln's base image unpacked, the root a build pod runs on."""
    rootfs = load_image_archive(kiln_base.path, shared_runtimes).rootfs
    assert rootfs is not None
    return rootfs


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[WorkloadRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


def snapshot(script: str) -> bytes:
    """A project's snapshot as ``git archive`` makes it: entries under home/cdsw/."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = script.encode()
        info = tarfile.TarInfo("home/cdsw/cdsw-build.sh")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def install(
    runtime: WorkloadRuntime,
    rootfs: Path,
    tmp_path: Path,
    script: str,
    *,
    max_layer_bytes: int = 64 * 1024**2,
    stop_on: bytes | None = None,
) -> tuple[Path, bytes]:
    deadline = time.time() + 120
    env = build_environment({"PATH": "/usr/local/bin:/usr/bin:/bin"}, {}, deadline)
    placement = Placement("user", "alice", 1, "build", "registry.example/base@sha256:" + "0" * 64)
    (tmp_path / "empty").mkdir(exist_ok=True)
    spec = install_pod_spec(
        unique_id("podinstall"), tmp_path / "empty", env, LIMITS, 64 * 1024**2, placement
    )
    spec = replace(spec, runtime_root=rootfs)  # what the pod's image would be
    out = tmp_path / "deps.tar"
    log = bytearray()
    try:
        run_pod_install(
            runtime,
            spec,
            snapshot(script),
            out,
            max_layer_bytes=max_layer_bytes,
            deadline=deadline,
            log=log.extend,
            should_stop=lambda: stop_on is not None and stop_on in log,
        )
    finally:
        assert runtime.list_workloads() == []  # removed, whatever happened
    return out, bytes(log)


def test_the_steps_stream_the_project_in_and_the_layer_out(
    runtime: WorkloadRuntime, base_rootfs: Path, tmp_path: Path
) -> None:
    script = (
        'mkdir -p "$PYTHONUSERBASE/lib" && echo "X = 1" > "$PYTHONUSERBASE/lib/probe.py"\n'
        "echo installed-as $(id -u) in $(pwd)\n"
    )
    out, log = install(runtime, base_rootfs, tmp_path, script)
    assert b"==> unpacked the project: 1 entries\n" in log
    assert b"==> running cdsw-build.sh\n" in log and b"installed-as" in log
    assert b"in /home/cdsw\n" in log
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        probe = tar.extractfile("opt/kiln/deps/lib/probe.py")
        assert probe is not None and probe.read() == b"X = 1\n"
    assert {(m.uid, m.mtime) for m in members.values()} == {(0, 315532800)}


def test_an_install_that_fails_fails_with_its_exit_code(
    runtime: WorkloadRuntime, base_rootfs: Path, tmp_path: Path
) -> None:
    with pytest.raises(InstallFailed, match=r"the install failed \(exit code 7\)"):
        install(runtime, base_rootfs, tmp_path, "echo about to fail\nexit 7\n")


def test_a_layer_over_the_cap_is_refused_and_not_read_further(
    runtime: WorkloadRuntime, base_rootfs: Path, tmp_path: Path
) -> None:
    script = 'head -c 3000000 /dev/urandom > "$PYTHONUSERBASE/big"\n'
    with pytest.raises(InstallFailed, match="the dependency layer is too large"):
        install(runtime, base_rootfs, tmp_path, script, max_layer_bytes=1024**2)
    assert (tmp_path / "deps.tar").stat().st_size <= 1024**2


def test_a_stop_ends_a_running_install_at_once(
    runtime: WorkloadRuntime, base_rootfs: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(InstallStopped):
        install(runtime, base_rootfs, tmp_path, "echo waiting\nsleep 60\n", stop_on=b"waiting")
    assert time.monotonic() - started < 20


def test_an_install_killed_for_memory_says_so(
    runtime: WorkloadRuntime, base_rootfs: Path, tmp_path: Path
) -> None:
    script = "python3 -c 'x = b\"k\" * (1024 ** 3)'\n"  # twice the 512 MiB limit, touched
    with pytest.raises(InstallFailed, match="most likely for running out of memory"):
        install(runtime, base_rootfs, tmp_path, script)
