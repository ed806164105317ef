"""A model replica's sandbox: /home/cdsw is the image's own code, read-only, and the
project's live files are not there (``WorkloadSpec.project_mount`` False). An image whose
home is missing or is a symlink is refused before anything starts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import WorkloadSpec
from kiln.runtimes.base import StartFailed
from kiln.runtimes.local import LocalRuntime
from kiln.testing.runtime_contract import local_runtime_factory, wait_for_log
from tests.integration.test_runtime_local_rootfs import minimal_rootfs


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


def spec(root: Path, project: Path, script: str) -> WorkloadSpec:
    return WorkloadSpec(
        id=f"replica-{uuid.uuid4().hex[:8]}",
        project_dir=project,
        command=("sh", "-c", script),
        runtime_root=root,
        project_mount=False,
    )


def test_home_is_the_images_code_read_only(runtime: LocalRuntime, tmp_path: Path) -> None:
    root = minimal_rootfs(tmp_path / "images" / "sha256-model")
    (root / "home/cdsw").mkdir(parents=True)
    (root / "home/cdsw/model.py").write_text("built version\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.py").write_text("live version\n")
    script = (
        "pwd; cat /home/cdsw/model.py; "
        "(echo x > /home/cdsw/written) 2>/dev/null || echo home-read-only; "
        "echo scratch > /tmp/x && echo tmp-writable; echo done"
    )
    s = spec(root, project, script)
    runtime.start(s)
    out = wait_for_log(runtime, s.id, b"done").decode()
    assert "/home/cdsw\nbuilt version\nhome-read-only\ntmp-writable\n" in out, out
    assert not (root / "home/cdsw/written").exists() and not (project / "written").exists()


def test_an_image_without_a_real_home_is_refused(runtime: LocalRuntime, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    root = minimal_rootfs(tmp_path / "images" / "sha256-nohome")
    with pytest.raises(StartFailed, match="the image has no /home/cdsw"):
        runtime.start(spec(root, project, "true"))
    (root / "home").mkdir()
    (root / "home/cdsw").symlink_to("/etc")
    with pytest.raises(StartFailed, match="home/cdsw is not a directory"):
        runtime.start(spec(root, project, "true"))
    assert runtime.list_workloads() == []


def test_the_spec_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="project_mount=False needs an image"):
        WorkloadSpec(id="x", project_dir=tmp_path, command=("true",), project_mount=False).check()
