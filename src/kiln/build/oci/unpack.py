"""Unpacking image layers into a root filesystem without trusting them.

Every path is walked component by component from a directory descriptor of the rootfs with
``O_NOFOLLOW``: a symlink planted by an earlier entry or layer (``lib -> /etc``) is an error,
never a way out. Each layer is read twice: a *scan* (names, types, caps, whiteouts, and the
sha256 of the uncompressed stream against the config's diff_id) before anything is written,
then the *extraction*. Whiteouts only hide lower layers, so applying them between the two
passes gives exactly the OCI semantics whatever their order inside the layer.

Refused: absolute names, ``..``, device nodes and FIFOs (never created: an image has no
business shipping them, and the sandbox mounts its own /dev), hard links to missing or
directory targets, unknown entry types. Stripped: setuid/setgid bits. Files are owned by the
unpacking user; modes are kept otherwise.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from kiln.build.oci.archive import CHUNK, ImageArchiveError
from kiln.domain.errors import KilnError, QuotaExceeded

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class UnpackLimits:
    """Caps over the whole image (all layers together, overwritten files counted)."""

    max_bytes: int = 16 << 30
    max_entries: int = 1_000_000

    @property
    def max_stream_bytes(self) -> int:
        # What a legitimate layer can decompress to: its files plus tar/pax headers.
        return self.max_bytes + 4096 * self.max_entries + (1 << 20)


class _HashingReader(io.RawIOBase):
    """Hashes what passes through and refuses to yield more than ``limit`` bytes, so a
    decompression bomb hidden after the tar's end marker is caught too."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self.inner, self.limit, self.what = inner, limit, what
        self.sha256 = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        self.count += len(data)
        if self.count > self.limit:
            raise ImageArchiveError(
                f"{self.what} decompresses to more than {self.limit} bytes (the unpack cap)"
            )
        self.sha256.update(data)
        buffer[: len(data)] = data
        return len(data)


def decompressed(raw: IO[bytes], what: str) -> IO[bytes]:
    """gzip, zstd (when the ``zstandard`` package is installed) or a plain tar, by magic."""
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[type-var]
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        try:
            import zstandard
        except ImportError:
            raise ImageArchiveError(
                f"{what}: unsupported compression zstd (install the zstandard package)"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(buffered)
    return buffered


def entry_parts(name: str, what: str) -> list[str]:
    if name.startswith("/"):
        raise ImageArchiveError(f"{what}: absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageArchiveError(f"{what}: path {name!r} escapes with '..'")
    return parts


@dataclass
class _LayerScan:
    opaque_dirs: list[list[str]] = field(default_factory=list)
    whiteouts: list[list[str]] = field(default_factory=list)


@dataclass
class RootfsWriter:
    """Writes layers, in order, into ``root_fd`` (an open directory: the future rootfs)."""

    root_fd: int
    limits: UnpackLimits
    bytes_written: int = 0
    entries: int = 0
    _declared_bytes: int = 0
    _dir_modes: dict[tuple[str, ...], int] = field(default_factory=dict)

    def inherit(self, previous: RootfsWriter | None, dir_modes: dict[tuple[str, ...], int]) -> None:
        """Carry on from ``previous`` (an earlier layer of the same add, written into another
        snapshot): its counts against the caps; and restore ``dir_modes`` (directories a
        clone loosened) at ``finish``."""
        if previous is not None:
            self.entries = previous.entries
            self.bytes_written = previous.bytes_written
            self._declared_bytes = previous._declared_bytes
        self._dir_modes.update(dir_modes)

    def add_layer(self, open_blob: Callable[[], IO[bytes]], diff_id: str, what: str) -> None:
        with open_blob() as raw:
            reader = _HashingReader(decompressed(raw, what), self.limits.max_stream_bytes, what)
            with _tar_errors(what):
                scan = self._scan(io.BufferedReader(reader, CHUNK), what)
                while reader.read(CHUNK):  # the diff_id covers the whole stream
                    pass
        if f"sha256:{reader.sha256.hexdigest()}" != diff_id:
            raise ImageArchiveError(
                f"{what}: uncompressed digest mismatch (expected {diff_id}, "
                f"got sha256:{reader.sha256.hexdigest()})"
            )
        for parts in scan.opaque_dirs:
            self._clear_dir(parts, what)
        for parts in scan.whiteouts:
            self._remove(parts, what)
        with (
            open_blob() as raw,
            _tar_errors(what),
            tarfile.open(fileobj=decompressed(raw, what), mode="r|") as tar,
        ):
            for member in tar:
                parts = entry_parts(member.name, what)
                if parts and not parts[-1].startswith(WHITEOUT):
                    try:
                        self._extract(tar, member, parts, what)
                    except OSError as exc:
                        raise _write_error(exc, what, member.name) from exc

    def finish(self) -> None:
        """Directory modes last (deepest first): a read-only dir must not stop its own
        children from being written."""
        for parts in sorted(self._dir_modes, key=len, reverse=True):
            try:
                fd = self._walk(list(parts), what="", create=False)
            except ImageArchiveError:
                continue  # replaced by a non-directory in a later layer
            if fd is not None:
                try:
                    os.fchmod(fd, self._dir_modes[parts])
                finally:
                    os.close(fd)

    # -- pass 1 ---------------------------------------------------------------------------
    def _scan(self, stream: IO[bytes], what: str) -> _LayerScan:
        scan = _LayerScan()
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                where = f"{what}: {member.name!r}"
                parts = entry_parts(member.name, what)
                self.entries += 1
                if self.entries > self.limits.max_entries:
                    raise ImageArchiveError(
                        f"{what}: the image has more than {self.limits.max_entries} entries "
                        "(the unpack cap)"
                    )
                if member.ischr() or member.isblk() or member.isfifo():
                    kind = "a FIFO" if member.isfifo() else "a device node"
                    raise ImageArchiveError(f"{where} is {kind}; images may not contain those")
                if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    raise ImageArchiveError(f"{where} has unsupported type {member.type!r}")
                if member.islnk():
                    entry_parts(member.linkname, f"{where} (hard link target)")
                if member.isreg():
                    self._declared_bytes += member.size
                    if self._declared_bytes > self.limits.max_bytes:
                        raise ImageArchiveError(
                            f"{what}: the image unpacks to more than {self.limits.max_bytes} "
                            "bytes (the unpack cap)"
                        )
                if not parts:
                    continue
                name = parts[-1]
                if name == OPAQUE:
                    scan.opaque_dirs.append(parts[:-1])
                elif name.startswith(WHITEOUT + WHITEOUT):
                    continue  # aufs bookkeeping (.wh..wh.plnk), not a deletion
                elif name.startswith(WHITEOUT):
                    scan.whiteouts.append([*parts[:-1], name.removeprefix(WHITEOUT)])
        return scan

    # -- paths ----------------------------------------------------------------------------
    def _walk(
        self, parts: list[str], what: str, create: bool, entry: str | None = None
    ) -> int | None:
        """An fd of directory ``parts`` reached without following any symlink; missing
        directories are made when ``create`` (else None)."""
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(parts):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(part, dir_fd=fd)
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                    raise ImageArchiveError(
                        f"{what}: path {entry or '/'.join(parts)!r} goes through "
                        f"{'/'.join(parts[: depth + 1])!r}, which is {kind}"
                    ) from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def _parent(self, parts: list[str], what: str, create: bool) -> Iterator[int | None]:
        fd = self._walk(parts[:-1], what, create, entry="/".join(parts))
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _remove(self, parts: list[str], what: str) -> None:
        with self._parent(parts, what, create=False) as fd:
            if fd is not None:
                _remove_at(fd, parts[-1])
                self._forget_modes(parts, include_self=True)

    def _forget_modes(self, parts: list[str], include_self: bool) -> None:
        """Deleted directories' recorded modes must not land on whatever a later layer
        creates at the same path."""
        prefix = tuple(parts)
        for key in [k for k in self._dir_modes if k[: len(prefix)] == prefix]:
            if include_self or len(key) > len(prefix):
                del self._dir_modes[key]

    def _clear_dir(self, parts: list[str], what: str) -> None:
        try:
            fd = self._walk(parts, what, create=False)
        except ImageArchiveError:
            return  # not a directory below: the layer replaces it anyway
        if fd is None:
            return
        try:
            for name in os.listdir(fd):
                _remove_at(fd, name)
        finally:
            os.close(fd)
        self._forget_modes(parts, include_self=False)

    # -- pass 2 ---------------------------------------------------------------------------
    def _extract(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str], what: str
    ) -> None:
        leaf = parts[-1]
        with self._parent(parts, what, create=True) as fd:
            assert fd is not None
            if member.isdir():
                existing = _lstat_at(fd, leaf)
                if existing is not None and not stat.S_ISDIR(existing.st_mode):
                    _remove_at(fd, leaf)
                    existing = None
                if existing is None:
                    os.mkdir(leaf, 0o755, dir_fd=fd)
                self._dir_modes[tuple(parts)] = _safe_mode(member.mode, parts, 0o1777)
                return
            if member.islnk():
                self._hard_link(fd, member, parts, what)
                return
            if _remove_at(fd, leaf):
                self._forget_modes(parts, include_self=True)
            if member.issym():
                os.symlink(member.linkname, leaf, dir_fd=fd)
                return
            source = tar.extractfile(member)
            assert source is not None
            out_fd = os.open(
                leaf,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=fd,
            )
            with open(out_fd, "wb", closefd=True) as out:
                shutil.copyfileobj(source, out, CHUNK)
                os.fchmod(out.fileno(), _safe_mode(member.mode, parts, 0o777))
                os.utime(out.fileno(), (member.mtime, member.mtime))
            self.bytes_written += member.size

    def _hard_link(self, fd: int, member: tarfile.TarInfo, parts: list[str], what: str) -> None:
        target = entry_parts(member.linkname, what)
        where = f"{what}: hard link {'/'.join(parts)!r} -> {member.linkname!r}"
        if not target:
            raise ImageArchiveError(f"{where} points to the root directory")
        if target == parts:
            return
        with self._parent(target, what, create=False) as target_fd:
            found = None if target_fd is None else _lstat_at(target_fd, target[-1])
            if target_fd is None or found is None:
                raise ImageArchiveError(f"{where} points to a file that does not exist")
            if stat.S_ISDIR(found.st_mode):
                raise ImageArchiveError(f"{where} points to a directory")
            if _remove_at(fd, parts[-1]):
                self._forget_modes(parts, include_self=True)
            os.link(
                target[-1], parts[-1], src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False
            )


def _safe_mode(mode: int, parts: list[str], keep: int) -> int:
    if mode & (stat.S_ISUID | stat.S_ISGID):
        log.info("image entry %s: setuid/setgid bits stripped", "/".join(parts))
    return mode & keep


def _lstat_at(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


def _remove_at(fd: int, name: str) -> bool:
    """Remove ``name`` whatever it is; True when it was a directory."""
    st = _lstat_at(fd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=fd)
        return True
    os.unlink(name, dir_fd=fd)
    return False


def _write_error(exc: OSError, what: str, name: str) -> KilnError:
    """The host running out of room is not the image's fault (507); anything else the
    filesystem refuses (a name too long, ...) is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return QuotaExceeded(f"no space left to unpack the image ({what}: {name!r})")
    return ImageArchiveError(f"{what}: cannot write {name!r}: {exc.strerror or exc}")


@contextmanager
def _tar_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageArchiveError(f"{what} is not a valid (compressed) tar: {exc}") from exc
