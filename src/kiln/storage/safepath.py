"""Safe paths inside a project directory: the one gate every file operation goes through.

Two layers, both needed:

1. ``parse_path`` turns the text a user sent into a ``SafePath`` (a tuple of plain names) or
   refuses it: no ``..``, no absolute paths, no empty or ``.`` components, no NUL or control
   characters, no backslashes, no name over 255 bytes, no path over 4096 bytes, no ``.git``
   anywhere (a hook written there would run on the server), and no name that a second
   percent-decoding would turn into ``.`` or ``..`` (``%2e%2e``).
2. ``ProjectFS`` resolves a ``SafePath`` against an open file descriptor of the project
   directory, one component at a time, with ``openat(..., O_NOFOLLOW)``. Nothing is looked up
   by its full path string, so a directory swapped for a symlink between a check and its use
   is still refused: the kernel checks every component at the moment it is opened.

Policy: symbolic links are listed (type ``symlink``) but never followed by the file API.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn
from urllib.parse import unquote

from kiln.domain.errors import BadPath, Conflict, Forbidden, KilnError, NotFound, QuotaExceeded
from kiln.storage.git import repo_owner

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
GIT_DIR = ".git"

# Walks stop descending here: each level holds one open fd, and no real project is deeper.
MAX_WALK_DEPTH = 128
# Temporary files of writes in progress: hidden from listings, archives and usage.
TEMP_PREFIX = ".kiln-upload-"

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO a workload left in the project must not hang the server.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class SafePath:
    """A validated path relative to a project's top directory; ``parts == ()`` is the top."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return "/".join(self.parts)

    @property
    def is_root(self) -> bool:
        return not self.parts

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""

    @property
    def parent(self) -> SafePath:
        return SafePath(self.parts[:-1])

    def child(self, name: str) -> SafePath:
        return SafePath((*self.parts, name))

    def is_within(self, other: SafePath) -> bool:
        """True when self is ``other`` or lies inside it."""
        return self.parts[: len(other.parts)] == other.parts


ROOT = SafePath(())


def _shown(raw: str) -> str:
    return repr(raw[:200])


def is_git_dir_name(name: str) -> bool:
    # Case-insensitive: on a case-insensitive file system (a user's clone) ".GIT" is ".git".
    return name.lower() == GIT_DIR


def _decodes_to_dots(name: str, rounds: int = 4) -> bool:
    for _ in range(rounds):
        decoded = unquote(name)
        if decoded in (".", ".."):
            return True
        if decoded == name:
            return False
        name = decoded
    return False


def check_name(name: str, whole: str | None = None) -> str:
    """Refuse a single path component that is unsafe anywhere in a project."""
    shown = _shown(whole if whole is not None else name)
    if name in ("", ".", ".."):
        what = "an empty component" if not name else f"a {name!r} component"
        raise BadPath(f"path {shown} has {what}; use a plain path such as 'dir/file.txt'")
    for ch in name:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise BadPath(f"path {shown} contains a control character (U+{code:04X})")
    if "\\" in name:
        raise BadPath(f"path {shown} contains a backslash; separate folders with '/'")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise BadPath(f"path {shown} is not valid UTF-8") from exc
    if size > MAX_NAME_BYTES:
        raise BadPath(
            f"name {_shown(name)} is {size} bytes long; names are limited to {MAX_NAME_BYTES}"
        )
    if "%" in name and _decodes_to_dots(name):
        # The server decodes the URL once; a name that decodes again to a traversal is
        # refused so that no other layer (a proxy, a client, a UI link) can be tricked.
        raise BadPath(f"path {shown} contains an encoded '.' or '..' component")
    if is_git_dir_name(name):
        raise BadPath(f"path {shown} is inside .git, which the file API never reads or writes")
    if name.startswith(TEMP_PREFIX):
        raise BadPath(f"names starting with {TEMP_PREFIX!r} are reserved for Kiln's own use")
    return name


def parse_path(raw: str, *, allow_root: bool = False) -> SafePath:
    """Validate a project-relative path as sent by a user (already URL-decoded once).

    A trailing '/' is allowed (it marks a folder); everything else must be plain names.
    """
    if "\x00" in raw:
        raise BadPath(f"path {_shown(raw)} contains a NUL character")
    if raw.startswith("/"):
        raise BadPath(f"path {_shown(raw)} is absolute; paths are relative to the project")
    try:
        total = len(raw.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise BadPath(f"path {_shown(raw)} is not valid UTF-8") from exc
    if total > MAX_PATH_BYTES:
        raise BadPath(f"path is {total} bytes long; paths are limited to {MAX_PATH_BYTES}")
    body = raw[:-1] if raw.endswith("/") else raw
    if not body:
        if allow_root:
            return ROOT
        raise BadPath("a path is required here; the project's top folder cannot be used")
    return SafePath(tuple(check_name(part, raw) for part in body.split("/")))


# ---- resolution through file descriptors ------------------------------------------------


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special"


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def symlink_refused(path: SafePath | str) -> BadPath:
    return BadPath(
        f"{str(path)!r} is a symbolic link; the file API lists links but never follows them"
    )


def translate(exc: OSError, path: SafePath | str) -> Exception:
    """The precise 4xx error for an OS error a user can cause; anything else unchanged."""
    shown = repr(str(path)[:200])
    mapped: dict[int, Exception] = {
        errno.ENOENT: NotFound(f"{shown} does not exist"),
        errno.EEXIST: Conflict(f"{shown} already exists"),
        errno.ENOTEMPTY: Conflict(f"folder {shown} is not empty; delete it with recursive=true"),
        errno.EISDIR: Conflict(f"{shown} is a folder"),
        errno.ENOTDIR: BadPath(f"a part of {shown} is a file, not a folder"),
        errno.ELOOP: symlink_refused(path),
        errno.ENAMETOOLONG: BadPath(f"{shown} is too long"),
        errno.ENOSPC: QuotaExceeded("Quota exceeded: the server's disk for files is full"),
        errno.EDQUOT: QuotaExceeded("Quota exceeded: the server's disk quota is used up"),
        errno.EACCES: Forbidden(f"the file system refused access to {shown}"),
        errno.EPERM: Forbidden(f"the file system refused access to {shown}"),
        errno.EINVAL: BadPath(f"invalid operation on {shown}"),
    }
    return mapped.get(exc.errno or 0, exc)


def raise_translated(exc: OSError, path: SafePath | str) -> NoReturn:
    error = translate(exc, path)
    if error is exc:
        raise exc
    raise error from exc


@contextmanager
def os_errors(path: SafePath | str) -> Iterator[None]:
    """Raise OS errors a user can cause as precise 4xx errors; others stay 500s."""
    try:
        yield
    except OSError as exc:
        raise_translated(exc, path)


@dataclass(frozen=True)
class WalkItem:
    """One entry met by ``ProjectFS.walk``; ``dir_fd`` is its folder, open while it is current."""

    path: SafePath
    st: os.stat_result
    dir_fd: int


def _listable(name: str) -> bool:
    if is_git_dir_name(name) or name.startswith(TEMP_PREFIX):
        return False
    try:
        name.encode("utf-8")  # a name that is not UTF-8 cannot be addressed through the API
    except UnicodeEncodeError:
        return False
    return True


def scan_dir(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """The entries of an open folder, sorted by name, without .git, temporary files and names
    that are not UTF-8; each with its lstat (links are never followed)."""
    found = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if not _listable(entry.name):
                continue
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # removed while listing
    found.sort(key=lambda item: item[0])
    return found


def give_to_workloads(dir_fd: int, name: str) -> None:
    """Hand an entry Kiln just made (as root) to the workloads' uid, which owns every project
    tree: its sessions can change it, and server-side git (run as that uid) accepts it."""
    owner = repo_owner()
    if owner is not None:
        os.chown(name, owner, owner, dir_fd=dir_fd, follow_symlinks=False)


class ProjectFS:
    """An open project directory. Every lookup below it goes through directory fds with
    O_NOFOLLOW, so no symlink anywhere in a path (or swapped into it meanwhile) is followed.

    Use as a context manager; returned fds belong to the caller, who closes them.
    """

    def __init__(self, project_dir: Path) -> None:
        self.project_dir = project_dir
        try:
            self.root_fd = os.open(project_dir, DIR_FLAGS)
        except FileNotFoundError as exc:
            raise NotFound("the project's files are missing on the server") from exc

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> ProjectFS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open_dir(
        self, path: SafePath, *, create: bool = False, created: list[SafePath] | None = None
    ) -> int:
        """An fd of the folder ``path``; with ``create``, missing folders are made (and
        appended to ``created`` so that a failed operation can remove them again)."""
        fd = os.dup(self.root_fd)
        try:
            for depth, name in enumerate(path.parts, start=1):
                sub = SafePath(path.parts[:depth])
                next_fd = self._open_child_dir(fd, name, sub, create, created)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child_dir(
        self,
        fd: int,
        name: str,
        sub: SafePath,
        create: bool,
        created: list[SafePath] | None,
    ) -> int:
        for attempt in range(2):
            try:
                return os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise self._not_a_dir(fd, name, sub) from exc
                if exc.errno != errno.ENOENT or not create or attempt:
                    raise_translated(exc, sub)
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
                give_to_workloads(fd, name)
                if created is not None:
                    created.append(sub)
            except FileExistsError:
                pass  # made by someone else meanwhile; opened (and checked) next
            except OSError as exc:
                raise_translated(exc, sub)
        raise AssertionError("unreachable")

    @staticmethod
    def _not_a_dir(fd: int, name: str, sub: SafePath) -> KilnError:
        st = lstat_at(fd, name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return symlink_refused(sub)
        return BadPath(f"{str(sub)!r} is a file, not a folder")

    def open_file(self, path: SafePath) -> tuple[int, os.stat_result]:
        """An fd for reading the regular file ``path``, and its stat."""
        parent = self.open_dir(path.parent)
        try:
            with os_errors(path):
                fd = os.open(path.name, READ_FLAGS, dir_fd=parent)
        finally:
            os.close(parent)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise BadPath(f"{str(path)!r} is a folder; add a trailing '/' to list it")
            raise BadPath(f"{str(path)!r} is not a regular file")
        return fd, st

    def walk(self, start: SafePath = ROOT) -> Iterator[WalkItem]:
        """Every entry below ``start``, depth first, sorted, folders before their contents.

        Symlinks are reported, never followed; .git folders are skipped at every level; the
        walk holds one fd per level and stops descending at ``MAX_WALK_DEPTH``."""
        stack: list[tuple[int, SafePath, Iterator[tuple[str, os.stat_result]]]] = []
        try:
            top = self.open_dir(start)
            stack.append((top, start, iter(())))
            stack[-1] = (top, start, iter(scan_dir(top)))
            while stack:
                fd, where, pending = stack[-1]
                item = next(pending, None)
                if item is None:
                    os.close(fd)
                    stack.pop()
                    continue
                name, st = item
                path = where.child(name)
                yield WalkItem(path, st, fd)
                if stat.S_ISDIR(st.st_mode) and len(stack) < MAX_WALK_DEPTH:
                    try:
                        child = os.open(name, DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue  # removed or swapped for a link meanwhile
                    stack.append((child, path, iter(())))  # owned by the stack from here on
                    try:
                        stack[-1] = (child, path, iter(scan_dir(child)))
                    except OSError:
                        continue  # unreadable: its (empty) frame is closed next round
        finally:
            for fd, _, _ in stack:
                os.close(fd)

    def remove_created(self, created: list[SafePath]) -> None:
        """Undo folders made by ``open_dir(create=True)``, deepest first, when still empty."""
        for path in reversed(created):
            try:
                parent = self.open_dir(path.parent)
            except KilnError:
                continue
            try:
                os.rmdir(path.name, dir_fd=parent)
            except OSError:
                pass  # something was put there meanwhile: it is not ours to remove
            finally:
                os.close(parent)
        created.clear()
