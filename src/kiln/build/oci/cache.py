"""The content-addressed rootfs cache: ``cache_dir/rootfs/<config sha256>/``.

A rootfs directory exists only once complete: layers are unpacked into a private temporary
directory beside it and renamed into place. A per-image ``flock`` serialises concurrent adds
of the same image (the second waits, then finds it done); under that lock any leftover
temporary directory of the same image is a crashed add and is removed. Failures remove the
temporary directory: no partial rootfs is ever visible.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln.build.oci.archive import (
    ImageArchive,
    ImageArchiveError,
    ImagePlan,
    Progress,
    digest_hex,
)
from kiln.build.oci.unpack import RootfsWriter, UnpackLimits
from kiln.runtimes.catalog import RuntimeImage, describe_rootfs

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


def rootfs_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "rootfs" / digest_hex(digest, "image digest")


def load_image_archive(
    path: Path,
    cache_dir: Path,
    *,
    name: str | None = None,
    limits: UnpackLimits | None = None,
    progress: Progress | None = None,
) -> RuntimeImage:
    """Verify and unpack an ``oci-archive`` or ``docker-archive`` tar into the cache and
    describe it. Adding an image already cached only reads its index/manifest/config.
    Raises :class:`~kiln.build.oci.archive.ImageArchiveError` (an ``InvalidInput``), or
    ``QuotaExceeded`` when the cache's filesystem is full."""
    limits = limits or UnpackLimits()
    try:
        return _load(Path(path), cache_dir, name, limits, progress)
    except (tarfile.TarError, EOFError) as exc:  # the outer archive, truncated or damaged
        raise ImageArchiveError(f"{Path(path).name} is a damaged tar archive: {exc}") from exc


def _load(
    path: Path,
    cache_dir: Path,
    name: str | None,
    limits: UnpackLimits,
    progress: Progress | None,
) -> RuntimeImage:
    with ImageArchive(path) as archive:
        plan = archive.plan()
        key = digest_hex(plan.config_digest, "image config")
        parent = cache_dir / "rootfs"
        parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        final = parent / key
        with _image_lock(cache_dir, key):
            if not final.is_dir():
                _unpack(archive, plan, parent, final, limits, progress)
            size = _cached_size(cache_dir, key, final)
    if progress is not None:
        progress(1, 1, "done")
    return describe_rootfs(
        name=name or plan.ref_name or f"sha256:{key[:12]}",
        digest=plan.config_digest,
        rootfs=final,
        source=plan.format,
        config=plan.config,
        size_bytes=size,
    )


def _unpack(
    archive: ImageArchive,
    plan: ImagePlan,
    parent: Path,
    final: Path,
    limits: UnpackLimits,
    progress: Progress | None,
) -> None:
    key = final.name
    for stale in parent.glob(f"{_TMP_PREFIX}{key}-*"):
        log.warning("removing %s, left by an interrupted add of the same image", stale)
        shutil.rmtree(stale, ignore_errors=True)
    total = archive.verify_layers(plan, progress)  # every blob checked before writing
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # noqa: S103 (the workload uid must read the rootfs)
        root_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            writer = RootfsWriter(root_fd, limits)
            done = 0
            for number, layer in enumerate(plan.layers, 1):
                what = f"layer {number}"
                writer.add_layer(
                    functools.partial(archive.open_member, layer.member, what), layer.diff_id, what
                )
                done += archive.member_size(layer.member, what)
                if progress is not None:
                    progress(done, total, "unpack")
            writer.finish()
        finally:
            os.close(root_fd)
        _write_meta(final.parent.parent, key, {"size_bytes": tree_size(tmp)})
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "unpacked image sha256:%s (%d bytes written) into %s", key, writer.bytes_written, final
    )


@contextmanager
def _image_lock(cache_dir: Path, key: str) -> Iterator[None]:
    locks = cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _meta_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "meta" / f"{key}.json"


def _write_meta(cache_dir: Path, key: str, meta: dict[str, Any]) -> None:
    target = _meta_path(cache_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, target)


def tree_size(root: Path) -> int:
    """Bytes of the regular files under ``root``, each inode once (hard links share)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for directory, _dirs, files in os.walk(root):
        for file in files:
            st = os.lstat(os.path.join(directory, file))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    return size


def _cached_size(cache_dir: Path, key: str, rootfs: Path) -> int:
    """From the meta file written at unpack time; recomputed (and rewritten) if it is
    missing, e.g. after a crash between writing it and the rename."""
    try:
        return int(json.loads(_meta_path(cache_dir, key).read_text())["size_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        size = tree_size(rootfs)
        _write_meta(cache_dir, key, {"size_bytes": size})
        return size
