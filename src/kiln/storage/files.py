"""Project files: list, read, write, delete, mkdir, move.

Every path goes through ``kiln.storage.safepath`` (no traversal, no symlink ever followed).
Every change is one git commit of exactly the paths it changed, authored by the user, made
under the project's ``repo_lock`` so that file writes and git pushes never interleave. Files
that the project's ``.gitignore`` excludes are written but not committed.

Writes stream into a temporary file in the target's folder and are renamed into place only
when complete and within limits; a failed write leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from anyio import to_thread

from kiln.db.models import User
from kiln.domain.errors import BadPath, Conflict, InvalidInput, NotFound, QuotaExceeded, TooLarge
from kiln.storage.git import commit_paths, repo_lock, repo_owner
from kiln.storage.safepath import (
    DIR_FLAGS,
    MAX_WALK_DEPTH,
    TEMP_PREFIX,
    ProjectFS,
    SafePath,
    give_to_workloads,
    kind_of,
    lstat_at,
    os_errors,
    scan_dir,
    symlink_refused,
)

CHUNK = 64 * 1024
Author = tuple[str, str]


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # "file" | "dir" | "symlink"
    size: int | None  # None for folders
    modified: datetime
    path: str  # project-relative; folders end with "/"


@dataclass(frozen=True)
class Listing:
    path: str
    entries: list[Entry]
    next_cursor: str | None


@dataclass(frozen=True)
class Written:
    path: str
    size: int
    modified: datetime
    created: bool


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    quota_bytes: int
    # What else counts against the quota besides the files: the project's images.
    other_bytes: int = 0


def commit_author(user: User, domain: str) -> Author:
    """The git identity of a user: their name and e-mail, or stand-ins from the username."""
    name = "".join(c for c in (user.full_name or user.username) if c not in "<>\n\r")
    email = user.email or f"{user.username}@{domain}"
    return name.strip() or user.username, email


def _entry(path: SafePath, st: os.stat_result) -> Entry | None:
    kind = kind_of(st.st_mode)
    if kind == "special":
        return None  # sockets and FIFOs a workload made: nothing the file API can serve
    shown = str(path) + ("/" if kind == "dir" else "")
    return Entry(
        name=path.name,
        type=kind,
        size=None if kind == "dir" else st.st_size,
        modified=datetime.fromtimestamp(st.st_mtime, UTC),
        path=shown,
    )


def _literal(path: SafePath) -> str:
    # Without this, a file named '*' or ':(exclude)x' would be a git pathspec pattern.
    return f":(literal){path}"


def _commit(project_dir: Path, message: str, paths: list[SafePath], author: Author) -> None:
    """Commit exactly ``paths``; those git ignores (and does not track) are left out by the
    commit script itself, in the same sandbox (``kiln.storage.git.commit_paths``)."""
    commit_paths(project_dir, message, [_literal(p) for p in paths], author)


def usage_bytes(fs: ProjectFS) -> int:
    """Bytes of the project's files (apparent sizes; .git excluded: history is Kiln's).
    A lean walk through fds (one per level), never following links."""
    total = 0

    def scan(fd: int) -> Iterator[str]:
        nonlocal total
        subdirs = []
        for name, st in scan_dir(fd):
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
            else:
                total += st.st_size
        return iter(subdirs)

    frames: list[tuple[int, Iterator[str]]] = [(os.dup(fs.root_fd), iter(()))]
    try:
        frames[0] = (frames[0][0], scan(frames[0][0]))
        while frames:
            fd, pending = frames[-1]
            name = next(pending, None)
            if name is None:
                os.close(fd)
                frames.pop()
                continue
            if len(frames) >= MAX_WALK_DEPTH:
                continue
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # gone, or swapped for a link, since it was listed
            frames.append((child, iter(())))
            frames[-1] = (child, scan(child))
    finally:
        for fd, _ in frames:
            os.close(fd)
    return total


class UsageCache:
    """Project usage, remembered for a few seconds and kept current by this process's own
    writes, so that a write to a large project does not walk it twice. Changes made by
    workloads are seen within ``ttl``; the disk itself still refuses when full (507)."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._known: dict[Path, tuple[int, float]] = {}
        self._guard = threading.Lock()

    def get(self, fs: ProjectFS) -> int:
        key = fs.project_dir
        with self._guard:
            known = self._known.get(key)
        if known is not None and time.monotonic() - known[1] < self.ttl:
            return known[0]
        used = usage_bytes(fs)
        with self._guard:
            self._known[key] = (used, time.monotonic())
        return used

    def add(self, project_dir: Path, delta: int) -> None:
        with self._guard:
            known = self._known.get(project_dir)
            if known is not None:
                self._known[project_dir] = (known[0] + delta, known[1])

    def forget(self, project_dir: Path) -> None:
        with self._guard:
            self._known.pop(project_dir, None)


usage_cache = UsageCache()


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


def project_usage(fs: ProjectFS) -> int:
    """What the project takes now. On its own filesystem that is the filesystem's count of
    allocated bytes (everything, ``.git`` too, each inode once, whoever wrote it; O(1));
    plain directories are walked and cached (``UsageCache``)."""
    if os.path.ismount(fs.project_dir):
        st = os.fstatvfs(fs.root_fd)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    return usage_cache.get(fs)


def _size_counted(fs: ProjectFS, st: os.stat_result) -> int:
    """What removing a file gives back, in the units ``project_usage`` counts."""
    return _allocated(st) if os.path.ismount(fs.project_dir) else st.st_size


def _quota_error(used: int, limit: int, adding: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Quota exceeded: the project uses {used} of its {limit} bytes and this write needs "
        f"{adding}; delete files or ask an administrator for a larger quota"
    )


# ---- reading --------------------------------------------------------------------------


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("cursor is not valid; use the next_cursor of a previous page") from exc


def list_dir(project_dir: Path, path: SafePath, limit: int, cursor: str | None) -> Listing:
    """One page of a folder's entries, sorted by name."""
    after = _decode_cursor(cursor) if cursor else None
    with ProjectFS(project_dir) as fs:
        fd = fs.open_dir(path)
        try:
            with os_errors(path):
                found = scan_dir(fd)
        finally:
            os.close(fd)
    entries: list[Entry] = []
    next_cursor = None
    for name, st in found:
        if after is not None and name <= after:
            continue
        entry = _entry(path.child(name), st)
        if entry is None:
            continue
        if len(entries) == limit:
            next_cursor = _encode_cursor(entries[-1].name)
            break
        entries.append(entry)
    return Listing(path=f"{path}/" if path.parts else "", entries=entries, next_cursor=next_cursor)


def open_for_read(project_dir: Path, path: SafePath) -> tuple[int, os.stat_result]:
    """An open fd of a regular file (never through a symlink) and its stat; caller closes."""
    with ProjectFS(project_dir) as fs:
        return fs.open_file(path)


def read_chunks(fd: int, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``fd`` (the length announced to the client), then closes it."""
    try:
        left = size
        while left > 0:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


def stat_entry(project_dir: Path, path: SafePath) -> Entry:
    with ProjectFS(project_dir) as fs:
        parent = fs.open_dir(path.parent)
        try:
            st = lstat_at(parent, path.name)
        finally:
            os.close(parent)
    entry = _entry(path, st) if st is not None else None
    if entry is None:
        raise NotFound(f"{str(path)!r} does not exist")
    return entry


# ---- writing --------------------------------------------------------------------------


class FileWrite:
    """One streamed write: ``start()``, ``feed(chunk)``..., then ``finish(author)``; any
    failure (or ``abort()``) removes the temporary file and the folders it created."""

    def __init__(
        self,
        project_dir: Path,
        path: SafePath,
        limits: Limits,
        expected_size: int | None = None,
    ) -> None:
        self.project_dir = project_dir
        self.path = path
        self.limits = limits
        self.expected_size = expected_size
        self.size = 0
        self._used = 0
        self._fs: ProjectFS | None = None
        self._parent_fd = -1
        self._fd = -1
        self._tmp_name = TEMP_PREFIX + secrets.token_hex(8)
        self._created: list[SafePath] = []
        self._placed = False

    def start(self) -> None:
        try:
            if self.expected_size is not None:
                self._check_limits(self.expected_size)
            self._fs = ProjectFS(self.project_dir)
            self._parent_fd = self._fs.open_dir(
                self.path.parent, create=True, created=self._created
            )
            self._used = self._usage_without(self._target_stat())
            if self.expected_size is not None:
                self._check_limits(self.expected_size)
            with os_errors(self.path):
                self._fd = os.open(
                    self._tmp_name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=self._parent_fd,
                )
                owner = repo_owner()
                if owner is not None:  # the workloads' uid owns every project tree
                    os.fchown(self._fd, owner, owner)
        except BaseException:
            self.abort()
            raise

    def feed(self, chunk: bytes) -> None:
        try:
            self._check_limits(self.size + len(chunk))
            view = memoryview(chunk)
            with os_errors(self.path):
                while view:
                    view = view[os.write(self._fd, view) :]
            self.size += len(chunk)
        except BaseException:
            self.abort()
            raise

    def finish(self, author: Author) -> Written:
        try:
            with os_errors(self.path):
                os.fsync(self._fd)
            with repo_lock(self.project_dir):
                replaced = self._target_stat()
                # Again (others may have written), without what this write's own temporary
                # file already holds: its size is what is checked.
                self._used = self._usage_without(replaced) - self._own_allocation()
                self._check_limits(self.size)
                with os_errors(self.path):
                    os.rename(
                        self._tmp_name,
                        self.path.name,
                        src_dir_fd=self._parent_fd,
                        dst_dir_fd=self._parent_fd,
                    )
                self._placed = True
                usage_cache.add(self.project_dir, self.size - (replaced.st_size if replaced else 0))
                existed = replaced is not None
                modified = datetime.fromtimestamp(os.fstat(self._fd).st_mtime, UTC)
                verb = "Update" if existed else "Add"
                _commit(self.project_dir, f"{verb} {self.path}", [self.path], author)
            return Written(str(self.path), self.size, modified, created=not existed)
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove what an unfinished write made; after a finished one, just close fds."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._parent_fd >= 0:
            if not self._placed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp_name, dir_fd=self._parent_fd)
            os.close(self._parent_fd)
            self._parent_fd = -1
        if self._fs is not None:
            if not self._placed:
                self._fs.remove_created(self._created)
            self._fs.close()
            self._fs = None

    def _check_limits(self, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise TooLarge(
                f"file {str(self.path)!r} is larger than the limit of "
                f"{self.limits.max_file_bytes} bytes per file"
            )
        if self._used + size > self.limits.quota_bytes:
            raise _quota_error(self._used, self.limits.quota_bytes, size)

    def _target_stat(self) -> os.stat_result | None:
        st = lstat_at(self._parent_fd, self.path.name)
        if st is not None:
            kind = kind_of(st.st_mode)
            if kind == "symlink":
                raise symlink_refused(self.path)
            if kind == "dir":
                raise Conflict(f"{str(self.path)!r} is a folder; a file cannot replace it")
            if kind != "file":
                raise BadPath(f"{str(self.path)!r} is not a regular file")
        return st

    def _own_allocation(self) -> int:
        assert self._fs is not None
        if not os.path.ismount(self._fs.project_dir):
            return 0  # a walk leaves temporary files out
        return _allocated(os.fstat(self._fd))

    def _usage_without(self, target: os.stat_result | None) -> int:
        assert self._fs is not None
        freed = _size_counted(self._fs, target) if target is not None else 0
        return project_usage(self._fs) + self.limits.other_bytes - freed


def write_file(
    project_dir: Path,
    path: SafePath,
    chunks: Iterable[bytes],
    limits: Limits,
    author: Author,
    expected_size: int | None = None,
) -> Written:
    writer = FileWrite(project_dir, path, limits, expected_size)
    writer.start()
    try:
        for chunk in chunks:
            writer.feed(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(author)


async def write_file_async(
    project_dir: Path,
    path: SafePath,
    chunks: AsyncIterable[bytes],
    limits: Limits,
    author: Author,
    expected_size: int | None = None,
) -> Written:
    """``write_file`` for a request body: the blocking steps run in worker threads."""
    writer = FileWrite(project_dir, path, limits, expected_size)
    await to_thread.run_sync(writer.start)
    try:
        async for chunk in chunks:
            writer.feed(chunk)
    except BaseException:
        writer.abort()
        raise
    return await to_thread.run_sync(writer.finish, author)


# ---- other changes ----------------------------------------------------------------------


def delete(project_dir: Path, path: SafePath, recursive: bool, author: Author) -> None:
    """Remove a file, a symlink (the link itself) or a folder (``recursive`` unless empty)."""
    with ProjectFS(project_dir) as fs, repo_lock(project_dir):
        parent = fs.open_dir(path.parent)
        try:
            st = lstat_at(parent, path.name)
            if st is None:
                raise NotFound(f"{str(path)!r} does not exist")
            with os_errors(path):
                if stat.S_ISDIR(st.st_mode):
                    _remove_dir(parent, path.name, recursive)
                else:
                    os.unlink(path.name, dir_fd=parent)
        finally:
            os.close(parent)
        usage_cache.forget(project_dir)
        _commit(project_dir, f"Delete {path}", [path], author)


def _remove_dir(parent_fd: int, name: str, recursive: bool) -> None:
    if not recursive:
        os.rmdir(name, dir_fd=parent_fd)  # ENOTEMPTY becomes a 409 that names recursive=true
        return
    # Rename first, so a delete that fails half-way leaves no half-folder under the old name;
    # rmtree with dir_fd works through fds and never follows a link out.
    trash = f"{TEMP_PREFIX}trash-{secrets.token_hex(8)}"
    os.rename(name, trash, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    shutil.rmtree(trash, dir_fd=parent_fd)


def mkdir(project_dir: Path, path: SafePath, author: Author) -> Entry:
    """Make a folder and any missing parents. (Git records no empty folder, so this commits
    nothing until a file is put inside.)"""
    with ProjectFS(project_dir) as fs, repo_lock(project_dir):
        created: list[SafePath] = []
        parent = fs.open_dir(path.parent, create=True, created=created)
        try:
            with os_errors(path):
                os.mkdir(path.name, 0o755, dir_fd=parent)
                give_to_workloads(parent, path.name)
        except BaseException:
            fs.remove_created(created)
            raise
        finally:
            os.close(parent)
        _commit(project_dir, f"Create folder {path}", [path], author)
    return stat_entry(project_dir, path)


def move(project_dir: Path, source: SafePath, destination: SafePath, author: Author) -> Entry:
    """Rename a file or folder; the destination must not exist (missing parents are made)."""
    if destination.is_within(source):
        raise BadPath(f"cannot move {str(source)!r} into itself")
    with ProjectFS(project_dir) as fs, repo_lock(project_dir):
        src_parent = fs.open_dir(source.parent)
        created: list[SafePath] = []
        dst_parent = -1
        try:
            st = lstat_at(src_parent, source.name)
            if st is None:
                raise NotFound(f"{str(source)!r} does not exist")
            if stat.S_ISLNK(st.st_mode):
                raise symlink_refused(source)
            dst_parent = fs.open_dir(destination.parent, create=True, created=created)
            if lstat_at(dst_parent, destination.name) is not None:
                raise Conflict(f"{str(destination)!r} already exists")
            with os_errors(destination):
                os.rename(
                    source.name, destination.name, src_dir_fd=src_parent, dst_dir_fd=dst_parent
                )
        except BaseException:
            fs.remove_created(created)
            raise
        finally:
            os.close(src_parent)
            if dst_parent >= 0:
                os.close(dst_parent)
        _commit(project_dir, f"Move {source} to {destination}", [source, destination], author)
    return stat_entry(project_dir, destination)
