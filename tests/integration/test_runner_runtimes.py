"""The runner runs workloads on runtime images from its own cache, and only from there: a
caller names an image root by path, and any path that is not an image directory of the
runner's cache (``RUNTIMES_DIR/rootfs/<sha256 hex>``) is INVALID_ARGUMENT, nothing started."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from kiln.rpc import runner_pb2 as pb
from tests.integration.test_runner_service import S, Site, site, spec, status_in, wait_for
from tests.integration.test_runtime_local_rootfs import minimal_rootfs

__all__ = ["site"]  # the fixture, re-used

KEY = hashlib.sha256(b"kiln test image").hexdigest()


def cache_dir(site: Site) -> Path:
    return site.settings.runtimes_dir.resolve() / "rootfs"


def image(site: Site) -> Path:
    return minimal_rootfs(cache_dir(site) / KEY)


def test_a_cached_image_is_the_workloads_root(site: Site) -> None:
    root = image(site)
    web = site.stub()
    ref = pb.RuntimeRef(id="tiny", image=f"sha256:{KEY}", rootfs=str(root))
    web.StartWorkload(spec("on-image", "cat /etc/os-release; echo done", runtime=ref))
    wait_for(lambda: status_in(web, "on-image", S.WORKLOAD_STATE_SUCCEEDED), what="exit")
    log = b"".join(c.data for c in web.StreamLogs(pb.StreamLogsRequest(workload_id="on-image")))
    assert b"ID=kiln-test-image" in log  # the image's /etc, not the host's


def _refused(site: Site, ref: pb.RuntimeRef, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        site.stub().StartWorkload(spec("bad-root", "touch /home/cdsw/ran", runtime=ref))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (info.value.details() or "")
    assert site.runner.servicer.runtime.list_workloads() == []
    assert not (site.project_dir / "ran").exists()


def test_a_root_outside_the_cache_is_refused(site: Site, tmp_path: Path) -> None:
    elsewhere = minimal_rootfs(tmp_path / "elsewhere" / KEY)  # a real rootfs, wrong place
    _refused(site, pb.RuntimeRef(rootfs=str(elsewhere)), "not an image in this runner's")
    _refused(site, pb.RuntimeRef(rootfs="/"), "not an image in this runner's")
    _refused(site, pb.RuntimeRef(rootfs="usr"), "not an image in this runner's")


def test_escapes_through_the_cache_are_refused(site: Site, tmp_path: Path) -> None:
    image(site)
    cache = cache_dir(site)
    dotdot = f"{cache}/{KEY}/../{KEY}"
    _refused(site, pb.RuntimeRef(rootfs=dotdot), "not an image in this runner's")
    # A link in the cache that leads out of it (planted, or left by something else).
    other = hashlib.sha256(b"a link").hexdigest()
    (cache / other).symlink_to(minimal_rootfs(tmp_path / "outside"))
    _refused(site, pb.RuntimeRef(rootfs=str(cache / other)), "not an image in this runner's")
    # The cache's own bookkeeping directories are not images either.
    _refused(site, pb.RuntimeRef(rootfs=str(cache / ".tmp-x")), "not an image in this runner's")


def test_an_image_not_in_the_cache_or_without_a_root_is_refused(site: Site) -> None:
    missing = hashlib.sha256(b"never added").hexdigest()
    _refused(site, pb.RuntimeRef(rootfs=str(cache_dir(site) / missing)), "is not in this")
    _refused(site, pb.RuntimeRef(image=f"sha256:{KEY}"), "needs runtime.rootfs")
