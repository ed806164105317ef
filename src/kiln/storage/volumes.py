"""Each project's files on a filesystem of their own: the disk quota as a hard limit.

Workloads write their project's tree directly, so only the kernel can bound what they write:
``fallocate``, sparse files, many small files and hard links all count, each inode once. This
kernel has no project quotas (ext4 ``prjquota``, XFS), but it loop-mounts filesystem images.
So each project is an ext4 image (sparse: it takes only the space that is written) mounted at
``projects/<id>``:

- the *limit* is the quota plus a margin, ``max(256 MiB, 5 %)``: the file API and git pushes
  refuse at the quota itself (a clean 507); a workload can go past it by at most the margin,
  and then its writes fail with "No space left on device";
- the limit is set with ext4's *reserved blocks*, which only root may use: the image is
  twice the limit and everything above the limit is reserved. ``tune2fs -r`` changes that on
  a mounted filesystem and the kernel honours it at once — so a quota can grow (up to twice
  its first size) or shrink while sessions run. (``resize2fs`` cannot grow a mounted
  filesystem here: online resizing needs CAP_SYS_RESOURCE, which this host's containers
  lack.) Changes beyond that range resize the image offline, which needs the project's
  workloads stopped. The web tier is root and could use the reserve, so it checks the quota
  itself before every write;
- usage is what the filesystem says it has allocated (``statvfs``): O(1), never a walk of a
  100 000-file project, and the same figure for the file API, git and the project page;
- the mount is ``nodev,nosuid``.

Where loop mounts are not possible (Kiln not root, no ``mkfs.ext4``, or the setting is off),
projects are plain directories: the file API still enforces the quota (by walking the tree),
but workloads are not bounded, and the log says so once, loudly.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kiln.domain.errors import Conflict, InvalidInput, KilnError

log = logging.getLogger("kiln.storage")

MIN_MARGIN_BYTES = 256 * 1024**2
BLOCK = 4096
MARGIN_FRACTION = 0.05
_SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Mounted without device nodes or set-uid programs; inode tables are not zeroed (the image
# is sparse, so unwritten tables already read as zeros, and zeroing would allocate them).
MOUNT_OPTIONS = "loop,nodev,nosuid,noatime,noinit_itable"
# e2fsck: 0 clean, 1 errors corrected (e.g. after a crash); anything else needs a person.
E2FSCK_OK = (0, 1)


class VolumeError(KilnError):
    status = 500
    title = "Project storage failed"


class _OutOfRange(Exception):
    """The image cannot hold this limit through its reserve alone."""


def _superblock(device: str) -> dict[str, int]:
    """The numeric fields of ``tune2fs -l`` (reading the superblock of a mounted ext4)."""
    fields = {}
    for line in _run("tune2fs", "-l", device).splitlines():
        name, _, value = line.partition(":")
        if value.strip().isdigit():
            fields[name.strip()] = int(value)
    return fields


def margin_bytes(quota: int) -> int:
    """How far past its quota a workload can take a project before writes fail."""
    return max(MIN_MARGIN_BYTES, int(quota * MARGIN_FRACTION))


def limit_bytes(quota: int) -> int:
    """The hard limit for workloads: what the project may hold at most."""
    return quota + margin_bytes(quota)


def image_bytes(quota: int) -> int:
    """The image is twice the limit (sparse), so the limit can move within it online."""
    size = 2 * limit_bytes(quota)
    return size - size % BLOCK


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    size_bytes: int | None  # the hard limit for workloads; None for plain directories

    @property
    def free_bytes(self) -> int | None:
        return None if self.size_bytes is None else max(0, self.size_bytes - self.used_bytes)


def _run(*argv: str, timeout: float = 120, ok: tuple[int, ...] = (0,)) -> str:
    try:
        proc = subprocess.run(
            argv,
            env={"PATH": _SYSTEM_PATH, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VolumeError(f"{argv[0]} failed: {exc}") from exc
    if proc.returncode not in ok:
        raise VolumeError(f"{argv[0]} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


def loop_supported() -> tuple[bool, str]:
    """Whether this process can make and mount project filesystems, and if not why."""
    if os.geteuid() != 0:
        return False, "Kiln does not run as root, so it cannot mount project filesystems"
    for tool in ("mkfs.ext4", "mount", "umount", "findmnt", "tune2fs", "resize2fs", "e2fsck"):
        if shutil.which(tool, path=_SYSTEM_PATH) is None:
            return False, f"{tool} is missing (Debian packages e2fsprogs, mount)"
    if not Path("/dev/loop-control").exists():
        return False, "this host has no loop devices (/dev/loop-control)"
    return True, ""


class ProjectVolumes:
    """The filesystems of all projects of one data dir."""

    def __init__(self, projects_root: Path, images_root: Path, owner_uid: int | None) -> None:
        self.projects_root = projects_root
        self.images_root = images_root
        self.owner_uid = owner_uid

    def image(self, project_id: int | str) -> Path:
        return self.images_root / f"{project_id}.ext4"

    def mountpoint(self, project_id: int | str) -> Path:
        return self.projects_root / str(project_id)

    @contextmanager
    def _locked(self, project_id: int | str) -> Iterator[None]:
        self.images_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.images_root / f".{project_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- life cycle --------------------------------------------------------------------

    def create(self, key: int | str, quota: int) -> Path:
        """A new, empty, mounted filesystem for ``key`` (a project id, or a staging name);
        its top directory is owned by the workload uid."""
        with self._locked(key):
            image, target = self.image(key), self.mountpoint(key)
            if image.exists() or os.path.ismount(target):
                raise VolumeError(f"a filesystem for {key} exists already")
            try:
                with open(image, "xb") as f:
                    f.truncate(image_bytes(quota))
                owner = self.owner_uid or 0
                _run(
                    "mkfs.ext4",
                    "-q",
                    "-b",
                    str(BLOCK),
                    "-m",
                    "0",
                    "-L",
                    f"kiln-{key}"[:16],
                    "-E",
                    f"root_owner={owner}:{owner},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    str(image),
                )
                target.mkdir(mode=0o755, exist_ok=True)
                self._mount(image, target)
                lost_found = target / "lost+found"
                if lost_found.is_dir() and not lost_found.is_symlink():
                    lost_found.rmdir()  # e2fsck makes it again when it needs it
                self._set_limit(target, limit_bytes(quota))
            except BaseException:
                self._discard(image, target)
                raise
            return target

    def ensure_mounted(self, project_id: int) -> Path:
        """The project's directory, mounting its filesystem if it is not (after a reboot)."""
        target = self.mountpoint(project_id)
        if os.path.ismount(target):
            return target
        with self._locked(project_id):
            image = self.image(project_id)
            if os.path.ismount(target) or not image.exists():
                return target  # mounted meanwhile, or a plain directory (older install)
            target.mkdir(mode=0o755, exist_ok=True)
            if any(target.iterdir()):
                raise VolumeError(
                    f"{target} is not empty but should be the mount point of {image}; "
                    "move its contents away and restart"
                )
            _run(
                "e2fsck", "-p", str(image), timeout=600, ok=E2FSCK_OK
            )  # a crash may have left it unclean
            self._mount(image, target)
            return target

    def rename(self, old: int | str, new: int) -> Path:
        """Give a staging filesystem its project's id (unmount, rename, mount again)."""
        with self._locked(old), self._locked(new):
            source, target = self.image(old), self.image(new)
            if target.exists():
                raise VolumeError(f"a filesystem for project {new} exists already")
            self._unmount(self.mountpoint(old))
            self.mountpoint(old).rmdir()
            source.rename(target)
        return self.ensure_mounted(new)

    def remove(self, key: int | str) -> None:
        with self._locked(key):
            self._discard(self.image(key), self.mountpoint(key))
            # Keys are never used again (project ids are not reused; staging keys are
            # random), so the lock file can go with what it guarded.
            (self.images_root / f".{key}.lock").unlink(missing_ok=True)

    def mount_all(self) -> int:
        """Mount every project filesystem that is not (at start-up); returns how many."""
        if not self.images_root.is_dir():
            return 0
        mounted = 0
        for image in sorted(self.images_root.glob("*.ext4")):
            if image.stem.isdigit() and not os.path.ismount(self.mountpoint(image.stem)):
                self.ensure_mounted(int(image.stem))
                mounted += 1
        return mounted

    def unmount_all(self) -> None:
        """Unmount every project filesystem of this data dir (tests, ``kiln down``)."""
        if not self.images_root.is_dir():
            return
        for image in self.images_root.glob("*.ext4"):
            target = self.mountpoint(image.stem)
            if os.path.ismount(target):
                self._unmount(target)

    # ---- size ---------------------------------------------------------------------------

    def usage(self, project_id: int) -> Usage:
        st = os.statvfs(self.mountpoint(project_id))
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        # A workload (not root) can write until nothing is available to it.
        return Usage(used, used + st.f_bavail * st.f_frsize)

    def is_volume(self, project_id: int) -> bool:
        return os.path.ismount(self.mountpoint(project_id))

    def resize(self, project_id: int, quota: int, *, offline_ok: bool) -> None:
        """Make the project's limit fit ``quota``: online when the image has room for it
        (up to twice the quota it was made for, or down to half); otherwise the image is
        resized offline, which needs ``offline_ok`` (nothing of the project runs). Never
        below what the project holds."""
        target = self.ensure_mounted(project_id)
        with self._locked(project_id):
            used = self.usage(project_id).used_bytes
            if used > quota:
                raise Conflict(
                    f"the project holds {used} bytes, more than the new quota of {quota}; "
                    "delete files first"
                )
            try:
                self._set_limit(target, limit_bytes(quota))
                return
            except _OutOfRange:
                if not offline_ok:
                    raise Conflict(
                        "this quota change resizes the project's filesystem, which needs its "
                        "sessions, jobs and other workloads stopped first"
                    ) from None
            image = self.image(project_id)
            self._unmount(target)
            try:
                _run("e2fsck", "-f", "-y", str(image), timeout=600, ok=E2FSCK_OK)
                wanted = image_bytes(quota)
                if wanted > image.stat().st_size:
                    _grow_sparse(image, wanted, quota)
                _run("resize2fs", str(image), f"{wanted // 1024}K", timeout=600)
                with open(image, "r+b") as f:
                    f.truncate(wanted)
            finally:
                self._mount(image, target)
            self._set_limit(target, limit_bytes(quota))

    # ---- helpers --------------------------------------------------------------------------

    def _set_limit(self, target: Path, limit: int) -> None:
        """Reserve every block above ``limit`` (for root): what workloads can use stops
        there. ``_OutOfRange`` when the image cannot express it (too small, or the reserve
        would pass ext4's cap of half the blocks)."""
        device = self._device(target)
        fields = _superblock(device)
        total, reserved = fields["Block count"], fields["Reserved block count"]
        st = os.statvfs(target)
        # ext4 keeps a small reserve of its own (for metadata) on top of ours.
        own_reserve = st.f_bfree - st.f_bavail - reserved
        wanted = st.f_blocks - own_reserve - -(-limit // BLOCK)
        if wanted < 0 or wanted > total // 2:
            raise _OutOfRange(limit)
        if wanted != reserved:
            _run("tune2fs", "-r", str(wanted), device)

    def _mount(self, image: Path, target: Path) -> None:
        _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(target))

    def _unmount(self, target: Path) -> None:
        if os.path.ismount(target):
            # Lazy: a sandbox still inside keeps its own reference; the loop device is freed
            # (autoclear) when the last one goes.
            _run("umount", "--lazy", str(target))

    @staticmethod
    def _device(target: Path) -> str:
        return _run("findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(target)).strip()

    def _discard(self, image: Path, target: Path) -> None:
        self._unmount(target)
        if target.is_dir() and not target.is_symlink() and not os.path.ismount(target):
            shutil.rmtree(target, ignore_errors=True)
        image.unlink(missing_ok=True)


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this mount namespace, deepest first."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if (point + "/").startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_below(root: Path) -> int:
    """Unmount (lazily) every filesystem mounted below ``root``: a test's data dir."""
    points = mounts_below(root)
    for point in points:
        _run("umount", "--lazy", str(point))
    return len(points)


def _grow_sparse(image: Path, size: int, quota: int) -> None:
    """Extend the (sparse) image file; a size the host's filesystem cannot hold is the
    caller's mistake, said in words, with nothing changed (the image keeps its size)."""
    try:
        with open(image, "r+b") as f:
            f.truncate(size)
    except OSError as exc:  # EFBIG past the host's largest file, EINVAL, ENOSPC
        raise InvalidInput(
            f"a quota of {quota} bytes needs a filesystem image of {size} bytes, which this "
            f"host's disk cannot hold ({exc.strerror}); choose a smaller quota"
        ) from None
