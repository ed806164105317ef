"""The content-addressed rootfs cache, kept layer by layer: ``cache_dir/rootfs/<chain id>/``.

An image's layers ``L1..Ln`` are unpacked as a chain of snapshots: ``rootfs/<ChainID(L1)>``
holds L1 applied, ``rootfs/<ChainID(L1..L2)>`` L1 and L2, and so on; an image's rootfs is the
snapshot of its whole chain (``ChainID`` as the OCI image spec defines it, from the verified
``diff_ids``, so a snapshot's name says exactly what it contains). A new image on a cached
base clones the longest cached prefix of its chain — hard links, no file data copied — and
unpacks only the layers after it. Files are never modified in place (the writer unlinks before
it writes), so snapshots sharing inodes stay immutable.

A snapshot directory exists only once complete: every new snapshot of an add is built in a
private temporary directory beside it and they are all renamed into place only after the
last layer succeeded. A per-image ``flock`` serialises concurrent adds of the same chain;
under it any leftover temporary directory of the same snapshot is a crashed add and is
removed. Failures remove the temporary directories: nothing partial is ever visible.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

from kiln.build.oci.archive import (
    ImageArchive,
    ImageArchiveError,
    ImagePlan,
    Layer,
    Progress,
    digest_hex,
)
from kiln.build.oci.unpack import RootfsWriter, UnpackLimits
from kiln.runtimes.catalog import RuntimeImage, describe_rootfs

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


class LayerSource(Protocol):
    """Where an image's layer blobs come from (an archive, the registry's store)."""

    def verify_layers(
        self, plan: ImagePlan, progress: Progress | None = None, first: int = 0
    ) -> int: ...

    def open_member(self, member: str, what: str) -> IO[bytes]: ...

    def member_size(self, member: str, what: str) -> int: ...


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI ChainIDs of a layer stack: ``ChainID(L1) = DiffID(L1)``, then
    ``ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " + DiffID(Ln))``."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            joined = f"{chains[-1]} {diff_id}".encode()
            chains.append(f"sha256:{hashlib.sha256(joined).hexdigest()}")
    return chains


def rootfs_path(cache_dir: Path, chain_id: str) -> Path:
    return cache_dir / "rootfs" / digest_hex(chain_id, "layer chain")


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
    try:
        with ImageArchive(Path(path)) as archive:
            plan = archive.plan()
            return unpack_image(
                archive,
                plan,
                cache_dir,
                name=name or plan.ref_name or f"sha256:{plan.config_digest[7:19]}",
                limits=limits,
                progress=progress,
            )
    except (tarfile.TarError, EOFError) as exc:  # the outer archive, truncated or damaged
        raise ImageArchiveError(f"{Path(path).name} is a damaged tar archive: {exc}") from exc


def unpack_image(
    source: LayerSource,
    plan: ImagePlan,
    cache_dir: Path,
    *,
    name: str,
    limits: UnpackLimits | None = None,
    progress: Progress | None = None,
) -> RuntimeImage:
    """Unpack ``plan``'s layers from ``source`` into the cache (only those after the longest
    cached prefix of its chain) and describe the image."""
    if not plan.layers:
        raise ImageArchiveError("the image has no layers: nothing to run")
    chains = chain_ids([layer.diff_id for layer in plan.layers])
    parent = cache_dir / "rootfs"
    parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    final = rootfs_path(cache_dir, chains[-1])
    with _image_lock(cache_dir, final.name):
        if not final.is_dir():
            _unpack(source, plan, chains, parent, limits or UnpackLimits(), progress)
        size = _cached_size(cache_dir, final.name, final)
    if progress is not None:
        progress(1, 1, "done")
    return describe_rootfs(
        name=name,
        digest=plan.config_digest,
        rootfs=final,
        source=plan.format,
        config=plan.config,
        size_bytes=size,
    )


def _unpack(
    source: LayerSource,
    plan: ImagePlan,
    chains: list[str],
    parent: Path,
    limits: UnpackLimits,
    progress: Progress | None,
) -> None:
    cached = 0  # how many leading layers are in the cache already
    for depth in range(len(chains) - 1, 0, -1):
        if (parent / digest_hex(chains[depth - 1], "layer chain")).is_dir():
            cached = depth
            break
    todo = list(range(cached, len(chains)))
    for index in todo:
        key = digest_hex(chains[index], "layer chain")
        for stale in parent.glob(f"{_TMP_PREFIX}{key}-*"):
            log.warning("removing %s, left by an interrupted add of the same image", stale)
            shutil.rmtree(stale, ignore_errors=True)
    total = source.verify_layers(plan, progress, cached)  # each new blob, before writing
    base = parent / digest_hex(chains[cached - 1], "layer chain") if cached else None
    built: list[tuple[Path, Path]] = []
    writer: RootfsWriter | None = None
    done = 0
    try:
        for index in todo:
            key = digest_hex(chains[index], "layer chain")
            tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-", dir=parent))
            built.append((tmp, parent / key))
            modes = _clone(base, tmp) if base is not None else {}
            writer = _apply_layer(source, plan.layers[index], index + 1, tmp, limits, modes, writer)
            done += source.member_size(plan.layers[index].member, f"layer {index + 1}")
            if progress is not None:
                progress(done, total, "unpack")
            _write_meta(parent.parent, key, {"size_bytes": tree_size(tmp)})
            base = tmp
        for tmp, final in built:
            try:
                os.rename(tmp, final)
            except OSError:  # another add of an image on the same base made it meanwhile
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        for tmp, _ in built:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "unpacked image %s: %d of %d layers new (%d cached), into %s",
        plan.config_digest,
        len(todo),
        len(chains),
        cached,
        built[-1][1],
    )


def _apply_layer(
    source: LayerSource,
    layer: Layer,
    number: int,
    root: Path,
    limits: UnpackLimits,
    dir_modes: dict[tuple[str, ...], int],
    previous: RootfsWriter | None,
) -> RootfsWriter:
    """One layer on top of the (cloned) tree at ``root``; the caps count every layer of
    this add together (``previous`` carries the counts)."""
    os.chmod(root, 0o755)  # noqa: S103 (the workload uid must read the rootfs)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        writer = RootfsWriter(root_fd, limits)
        writer.inherit(previous, dir_modes)
        what = f"layer {number}"
        writer.add_layer(
            functools.partial(source.open_member, layer.member, what), layer.diff_id, what
        )
        writer.finish()
        return writer
    finally:
        os.close(root_fd)


def _clone(source: Path, target: Path) -> dict[tuple[str, ...], int]:
    """Hard-link copy of snapshot ``source`` into the empty directory ``target``. Returns
    the directory modes to restore once the next layer is written: directories the
    unpacking user cannot write are made writable meanwhile."""
    subprocess.run(
        ["cp", "-a", "--link", "--no-target-directory", f"{source}/.", str(target)],
        check=True,
        capture_output=True,
    )
    modes: dict[tuple[str, ...], int] = {}
    if os.geteuid() == 0:
        return modes  # root writes anywhere: nothing to loosen
    for directory, _dirs, _files in os.walk(target):
        mode = os.lstat(directory).st_mode
        if not mode & stat.S_IWUSR:
            rel = Path(directory).relative_to(target).parts
            modes[rel] = stat.S_IMODE(mode)
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IWUSR | stat.S_IXUSR)
    return modes


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
