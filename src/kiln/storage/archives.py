"""Project archives, both ways.

Download: a folder streamed as ``.tar.gz`` or ``.zip`` while it is read (no temporary file),
through ``ProjectFS.walk``; .git, symlinks and special files are left out.

Upload: an archive (``.tar.gz``/``.tgz``/``.tar``/``.zip``) extracted into an empty folder
under the safe-path rules. Refused outright: entry names that escape (``..``, absolute),
links of any kind, device and FIFO entries. Capped: the number of entries and the bytes
actually written (counted while extracting, so a zip bomb's declared sizes do not matter),
the decompressed tar stream, and tar extension headers (which ``tarfile`` reads into memory).
``.git`` entries and macOS ``__MACOSX`` folders are skipped. When everything sits in one
top-level folder, that folder becomes the top.
"""

from __future__ import annotations

import gzip
import os
import secrets
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from kiln.domain.errors import BadPath, InvalidInput, TooLarge
from kiln.storage.safepath import (
    MAX_PATH_BYTES,
    READ_FLAGS,
    ProjectFS,
    SafePath,
    check_name,
    is_git_dir_name,
    os_errors,
)

CHUNK = 64 * 1024
DOWNLOAD_FORMATS = {"tar.gz": "application/gzip", "zip": "application/zip"}
UPLOAD_SUFFIXES = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar", ".zip": "zip"}
# pax and GNU long-name headers are read whole into memory by tarfile: keep them small.
MAX_TAR_HEADER_BYTES = 1024 * 1024
_TAR_HEADER_TYPES = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
_TAR_HEADER_TYPES |= {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


class BadArchive(InvalidInput):
    title = "Invalid archive"


# ---- download ---------------------------------------------------------------------------


def _read_exactly(fd: int, size: int) -> Iterator[bytes]:
    """``size`` bytes of ``fd``: the size already announced in the archive's header. A file
    that shrank meanwhile is padded with zeros, one that grew is cut."""
    left = size
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left)) or b"\0" * min(CHUNK, left)
        left -= len(chunk)
        yield chunk


@dataclass
class _Member:
    name: str  # archive name, "/"-separated, no trailing slash
    is_dir: bool
    mode: int
    mtime: float
    size: int
    fd: int  # -1 for folders


def _members(project_dir: Path, folder: SafePath, top_name: str) -> Iterator[_Member]:
    with ProjectFS(project_dir) as fs:
        yield _Member(top_name, True, 0o755, time.time(), 0, -1)
        for item in fs.walk(folder):
            name = "/".join((top_name, *item.path.parts[len(folder.parts) :]))
            if stat.S_ISDIR(item.st.st_mode):
                yield _Member(name, True, 0o755, item.st.st_mtime, 0, -1)
            elif stat.S_ISREG(item.st.st_mode):
                try:
                    fd = os.open(item.path.name, READ_FLAGS, dir_fd=item.dir_fd)
                except OSError:
                    continue  # removed or swapped for a link since it was listed
                try:
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode):
                        mode = 0o755 if st.st_mode & 0o111 else 0o644
                        yield _Member(name, False, mode, st.st_mtime, st.st_size, fd)
                finally:
                    os.close(fd)


def _tar_gz(members: Iterator[_Member]) -> Iterator[bytes]:
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    for m in members:
        info = tarfile.TarInfo(m.name + "/" if m.is_dir else m.name)
        info.type = tarfile.DIRTYPE if m.is_dir else tarfile.REGTYPE
        info.mode, info.mtime, info.size = m.mode, int(m.mtime), m.size
        yield gz.compress(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if not m.is_dir:
            for chunk in _read_exactly(m.fd, m.size):
                yield gz.compress(chunk)
            yield gz.compress(b"\0" * (-m.size % tarfile.BLOCKSIZE))
    yield gz.compress(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    yield gz.flush()


class _Sink:
    """A write-only file for zipfile whose bytes are handed out as they come."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def _zip_info(m: _Member) -> zipfile.ZipInfo:
    when = time.gmtime(max(m.mtime, 315532800))[:6]  # zip cannot express dates before 1980
    info = zipfile.ZipInfo(m.name + "/" if m.is_dir else m.name, date_time=when)
    kind = stat.S_IFDIR if m.is_dir else stat.S_IFREG
    info.external_attr = (kind | m.mode) << 16 | (0x10 if m.is_dir else 0)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size = m.size
    return info


def _zip(members: Iterator[_Member]) -> Iterator[bytes]:
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in members:
            info = _zip_info(m)
            if m.is_dir:
                zf.writestr(info, b"")
            else:
                with zf.open(info, "w") as dest:
                    for chunk in _read_exactly(m.fd, m.size):
                        dest.write(chunk)
                        yield sink.drain()
            yield sink.drain()
    yield sink.drain()


def folder_archive(project_dir: Path, folder: SafePath, fmt: str, top_name: str) -> Iterator[bytes]:
    """The folder as a streamed archive whose entries sit under ``top_name/``. The folder is
    checked now, so that a bad path is a 4xx before the response starts."""
    if fmt not in DOWNLOAD_FORMATS:
        raise InvalidInput(f"format must be one of: {', '.join(DOWNLOAD_FORMATS)}")
    with ProjectFS(project_dir) as fs:
        os.close(fs.open_dir(folder))
    build = _tar_gz if fmt == "tar.gz" else _zip
    return (chunk for chunk in build(_members(project_dir, folder, top_name)) if chunk)


# ---- upload -----------------------------------------------------------------------------


def upload_kind(filename: str) -> str:
    lower = filename.lower()
    for suffix, kind in UPLOAD_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    raise BadArchive(
        f"{filename[:100]!r} is not a supported archive; upload a .tar.gz, .tgz, .tar or .zip"
    )


@dataclass
class ExtractStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Budget:
    """A reader that refuses to deliver more than ``limit`` bytes in total."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self.inner, self.limit, self.total = inner, limit, 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit - self.total + 1 if size < 0 else min(size, self.limit - self.total + 1)
        data = self.inner.read(max(want, 0))
        self.total += len(data)
        if self.total > self.limit:
            raise TooLarge(f"the archive expands to more than {self.limit} bytes")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in _TAR_HEADER_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise BadArchive(f"the archive has an extension header of {self.size} bytes")
        return super()._proc_member(tarfile)  # type: ignore[misc]


def archive_entry_path(raw: str) -> SafePath | None:
    """The safe project path of an archive entry; None for entries that are skipped (the
    archive's own top ``./``, .git, __MACOSX). Escaping names refuse the whole archive."""
    shown = repr(raw[:200])
    if raw.startswith("/"):
        raise BadPath(f"archive entry {shown} is an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadPath(f"archive entry {shown} points outside its folder ('..')")
    if not parts or parts[0] == "__MACOSX" or any(is_git_dir_name(p) for p in parts):
        return None
    if len("/".join(parts).encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise BadPath(f"archive entry {shown} is longer than {MAX_PATH_BYTES} bytes")
    return SafePath(tuple(check_name(p, raw) for p in parts))


class _Extractor:
    """Writes entries below an empty folder, through fds, counting entries and bytes."""

    def __init__(self, dest: Path, max_bytes: int, max_entries: int) -> None:
        self.fs = ProjectFS(dest)
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.stats = ExtractStats()

    def count_entry(self) -> None:
        self.stats.entries += 1
        if self.stats.entries > self.max_entries:
            raise TooLarge(f"the archive has more than {self.max_entries} entries")

    def add_dir(self, path: SafePath) -> None:
        os.close(self.fs.open_dir(path, create=True))

    def add_file(self, path: SafePath, source: IO[bytes], executable: bool) -> None:
        parent = self.fs.open_dir(path.parent, create=True)
        try:
            try:
                fd = os.open(
                    path.name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o755 if executable else 0o644,
                    dir_fd=parent,
                )
            except FileExistsError as exc:
                raise BadArchive(f"the archive contains {str(path)!r} more than once") from exc
        finally:
            os.close(parent)
        try:
            while chunk := source.read(CHUNK):
                self.stats.bytes += len(chunk)
                if self.stats.bytes > self.max_bytes:
                    raise TooLarge(f"the archive expands to more than {self.max_bytes} bytes")
                with os_errors(path):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.stats.files += 1


def _refuse_link_or_device(name: str, what: str) -> BadArchive:
    return BadArchive(f"archive entry {name[:200]!r} is {what}; archives may hold only files")


def _extract_tar(archive: IO[bytes], gzipped: bool, ex: _Extractor) -> None:
    source: _Readable = gzip.GzipFile(fileobj=archive, mode="rb") if gzipped else archive
    # Headers and padding take at most a few KiB per entry beside the files' bytes.
    budget = _Budget(source, ex.max_bytes + (ex.max_entries + 10) * 4 * tarfile.BLOCKSIZE)
    with tarfile.open(fileobj=budget, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
        for member in tar:
            ex.count_entry()
            if member.issym() or member.islnk():
                raise _refuse_link_or_device(member.name, "a link")
            if not (member.isreg() or member.isdir()):
                raise _refuse_link_or_device(member.name, "a device, FIFO or special file")
            path = archive_entry_path(member.name)
            if path is None:
                continue
            if member.isdir():
                ex.add_dir(path)
                continue
            data = tar.extractfile(member)
            assert data is not None  # regular members always have data
            ex.add_file(path, data, bool(member.mode & 0o111))


def _extract_zip(archive: IO[bytes], ex: _Extractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > ex.max_entries:
            raise TooLarge(f"the archive has more than {ex.max_entries} entries")
        if sum(i.file_size for i in infos) > ex.max_bytes:
            raise TooLarge(f"the archive expands to more than {ex.max_bytes} bytes")
        for info in infos:
            ex.count_entry()
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix
            if stat.S_ISLNK(mode):
                raise _refuse_link_or_device(info.filename, "a link")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse_link_or_device(info.filename, "a device, FIFO or special file")
            # Some Windows tools write '\' between folders; '..\' is refused like '../'.
            path = archive_entry_path(info.filename.replace("\\", "/"))
            if path is None:
                continue
            if info.flag_bits & 0x1:
                raise BadArchive(f"archive entry {info.filename[:200]!r} is encrypted")
            if info.is_dir():
                ex.add_dir(path)
                continue
            with zf.open(info) as data:
                ex.add_file(path, data, bool(mode & 0o111))


def hoist_single_folder(dest: Path) -> None:
    """When ``dest`` holds exactly one folder, make that folder's contents the top. Entries
    move within ``dest`` (which may be the mount point of the project's filesystem, so it
    stays where it is)."""
    names = os.listdir(dest)
    if len(names) != 1 or not stat.S_ISDIR(os.lstat(dest / names[0]).st_mode):
        return
    hoisted = dest / f".kiln-hoist-{secrets.token_hex(8)}"
    os.rename(dest / names[0], hoisted)
    for name in os.listdir(hoisted):
        os.rename(hoisted / name, dest / name)
    os.rmdir(hoisted)


def _is_gzip(archive: IO[bytes]) -> bool:
    """Sniffed, not taken from the name: a gzipped '.tar' is common enough."""
    head = archive.read(2)
    archive.seek(0)
    return head == b"\x1f\x8b"


def extract_archive(
    archive: IO[bytes], filename: str, dest: Path, *, max_bytes: int, max_entries: int
) -> ExtractStats:
    """Extract an uploaded archive into the empty folder ``dest``. On error, ``dest`` may hold
    a partial extraction: the caller removes it."""
    kind = upload_kind(filename)
    ex = _Extractor(dest, max_bytes, max_entries)
    try:
        if kind == "zip":
            _extract_zip(archive, ex)
        else:
            _extract_tar(archive, _is_gzip(archive), ex)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise BadArchive(f"{filename[:100]!r} is not a valid {kind} archive: {exc}") from exc
    except NotImplementedError as exc:  # zip compression methods Python lacks
        raise BadArchive(f"{filename[:100]!r} uses an unsupported compression: {exc}") from exc
    finally:
        ex.fs.close()
    hoist_single_folder(dest)
    return ex.stats
