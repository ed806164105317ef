"""End to end: an image archive → load_image_archive → a real local-runtime sandbox runs in
the unpacked rootfs (layers and whiteouts applied, the image read-only)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

from kiln.build.oci import load_image_archive
from kiln.build.oci.testing import Entry, layer_tar, write_docker_archive
from kiln.runtimes import WorkloadSpec
from kiln.testing.runtime_contract import all_logs, local_runtime_factory, wait_exit
from tests.integration.test_runtime_local_rootfs import minimal_rootfs


def _tar_of(tree: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return buffer.getvalue()


def test_unpacked_archive_runs_in_the_local_runtime(tmp_path: Path) -> None:
    base = _tar_of(minimal_rootfs(tmp_path / "tree"))
    top = layer_tar(
        [
            Entry("etc/.wh.os-release"),
            Entry("etc/issue", data=b"from layer 2\n"),
            Entry("usr/bin/suid-thing", data=b"#!/bin/sh\necho hi\n", mode=0o4755),
        ]
    )
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, [base, top])
    image = load_image_archive(archive, tmp_path / "cache")
    assert image.rootfs is not None
    project = tmp_path / "project"
    project.mkdir()
    runtime = local_runtime_factory(tmp_path / "state")()
    script = (
        "cat /etc/issue; [ -e /etc/os-release ] && echo os-release-present || echo whited-out; "
        "[ -u /usr/bin/suid-thing ] && echo setuid || echo no-setuid; "
        "(echo x > /usr/bin/planted) 2>/dev/null || echo image-read-only; id -u"
    )
    spec = WorkloadSpec(
        id=f"oci-{uuid.uuid4().hex[:8]}",
        project_dir=project,
        command=("sh", "-c", script),
        runtime_root=image.rootfs,
    )
    try:
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        out = all_logs(runtime, spec.id).decode()
        assert out == "from layer 2\nwhited-out\nno-setuid\nimage-read-only\n1000\n", out
        assert not (image.rootfs / "usr/bin/planted").exists()
    finally:
        for workload_id in runtime.list_workloads():
            runtime.stop(workload_id, grace=0)
            runtime.remove(workload_id)
        runtime.close()
