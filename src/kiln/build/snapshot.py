"""A build's snapshot of the project: a git commit, taken and read with git alone.

The project tree and its ``.git`` are written by the project's workloads, so Kiln never
reads them itself: every step is a git command through ``kiln.storage.git.run_git`` (which
runs git sandboxed as the workload uid), and what Kiln keeps is git's output.

- **The working tree** (the default) is committed without touching the user's branch,
  index or HEAD: ``git add -A`` into a separate index file (``.git/kiln-snapshot.index``,
  kept between builds so unchanged files are not hashed again), ``write-tree``, and — only
  if the tree differs from HEAD's — ``commit-tree`` with HEAD as parent and HEAD's commit
  time as its dates. The same files on the same HEAD therefore always give the same
  commit, and the same code layer. ``.gitignore`` is honoured; files HEAD tracks stay in
  even if ignored; a symlink is stored as a symlink (never followed), wherever it points.
- **A named commit** is used as it is.

Either way the commit gets a ref, ``refs/kiln/builds/<build>``, so it outlives a ``git gc``
and the image's ``commit`` label can always be checked out. Tracked files over the size limit
fail the snapshot, naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kiln.domain.errors import InvalidInput
from kiln.storage.git import GitError, repo_lock, run_git

SNAPSHOT_INDEX = ".git/kiln-snapshot.index"  # relative to the repository (git's cwd)
SNAPSHOT_MESSAGE = "Kiln build snapshot of the working tree\n"
DEPENDENCY_FILES = ("requirements.txt", "cdsw-build.sh")
_COMMITTISH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@{}~^-]{0,199}$")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


class SnapshotError(InvalidInput):
    """The project cannot be snapshot as asked (an unknown commit, a file over the limit)."""

    title = "Snapshot failed"


@dataclass(frozen=True)
class Snapshot:
    commit: str  # what the image holds
    tree: str
    head: str | None  # the branch's commit when the snapshot was taken
    from_working_tree: bool
    time: int  # the commit's time: mtimes in the code layer, the image's "created"
    files: int
    size: int  # bytes of all files


@dataclass(frozen=True)
class DependencyFile:
    """``requirements.txt`` or ``cdsw-build.sh`` at the snapshot: its bytes (regular file)
    or, for a symlink, nothing readable here (it is resolved inside the build sandbox)."""

    name: str
    data: bytes | None
    symlink: bool = False


def check_committish(text: str) -> str:
    """A commit name a user may give (a sha, a branch, a tag, ``HEAD~2``): no options, no
    paths, nothing git would read as something else."""
    if not _COMMITTISH.match(text) or ".." in text or text.startswith("-"):
        raise InvalidInput(
            f"commit {text[:100]!r} is not a commit name (a hash, a branch or a tag)"
        )
    return text


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return run_git(repo, *args, env=env).stdout.decode().strip()


def _head(repo: Path) -> str | None:
    proc = run_git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    return proc.stdout.decode().strip() or None if proc.returncode == 0 else None


def _working_tree_commit(repo: Path, head: str | None) -> str:
    index = {"GIT_INDEX_FILE": SNAPSHOT_INDEX}
    if head is not None:
        # Start from HEAD (so tracked-but-ignored files stay), reusing the stat data of
        # the last snapshot where the content still matches (--reset: whatever the last
        # snapshot's index held, never refuse).
        run_git(repo, "read-tree", "--reset", head, env=index)
    else:
        run_git(repo, "read-tree", "--empty", env=index)
    run_git(repo, "add", "-A", env=index)
    tree = _git(repo, "write-tree", env=index)
    if head is not None and _git(repo, "rev-parse", f"{head}^{{tree}}") == tree:
        return head  # nothing changed since the last commit: build that commit
    when = _git(repo, "log", "-1", "--format=%ct", head) if head else "0"
    ident = {
        "GIT_AUTHOR_NAME": "Kiln",
        "GIT_AUTHOR_EMAIL": "kiln@localhost",
        "GIT_COMMITTER_NAME": "Kiln",
        "GIT_COMMITTER_EMAIL": "kiln@localhost",
        "GIT_AUTHOR_DATE": f"@{when} +0000",
        "GIT_COMMITTER_DATE": f"@{when} +0000",
    }
    parents = ["-p", head] if head else []
    return (
        run_git(repo, "commit-tree", tree, *parents, env=ident, input=SNAPSHOT_MESSAGE.encode())
        .stdout.decode()
        .strip()
    )


def _named_commit(repo: Path, name: str) -> str:
    proc = run_git(
        repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}",
        check=False,
    )  # fmt: skip
    sha = proc.stdout.decode().strip()
    if proc.returncode != 0 or not _SHA.match(sha):
        raise SnapshotError(f"the project has no commit {name!r}")
    return sha


def take_snapshot(repo: Path, build: str, *, commit: str | None, max_file_bytes: int) -> Snapshot:
    """Snapshot the project for build ``build`` (see the module docstring)."""
    with repo_lock(repo):
        head = _head(repo)
        sha = _named_commit(repo, commit) if commit else _working_tree_commit(repo, head)
        run_git(repo, "update-ref", f"refs/kiln/builds/{build}", sha)
    tree = _git(repo, "rev-parse", f"{sha}^{{tree}}")
    time = int(_git(repo, "log", "-1", "--format=%ct", sha))
    listing = run_git(repo, "ls-tree", "-r", "-l", "-z", "--full-tree", sha).stdout
    files = size = 0
    too_big: list[tuple[str, int]] = []
    for entry in filter(None, listing.split(b"\0")):
        meta, _, path = entry.partition(b"\t")
        parts = meta.split()
        if len(parts) != 4 or parts[1] != b"blob":
            continue  # a submodule (commit) has no size here
        files += 1
        blob_size = int(parts[3])
        size += blob_size
        if blob_size > max_file_bytes:
            too_big.append((path.decode(errors="replace"), blob_size))
    if too_big:
        names = ", ".join(f"{p} ({s / 1024**2:.1f} MiB)" for p, s in too_big[:5])
        more = f" and {len(too_big) - 5} more" if len(too_big) > 5 else ""
        raise SnapshotError(
            f"files over the {max_file_bytes / 1024**2:g} MiB limit are in the snapshot: "
            f"{names}{more}. Add them to .gitignore (and `git rm --cached` them if they are "
            "committed), then build again"
        )
    return Snapshot(sha, tree, head, commit is None, time, files, size)


def dependency_files(repo: Path, commit: str) -> dict[str, DependencyFile]:
    """The snapshot's ``requirements.txt`` and ``cdsw-build.sh`` (those that exist)."""
    found: dict[str, DependencyFile] = {}
    listing = run_git(repo, "ls-tree", "-z", commit, "--", *DEPENDENCY_FILES).stdout
    for entry in filter(None, listing.split(b"\0")):
        meta, _, path = entry.partition(b"\t")
        mode, kind, oid = meta.decode().split()
        name = path.decode()
        if kind != "blob":
            continue
        if mode == "120000":
            found[name] = DependencyFile(name, None, symlink=True)
        else:
            found[name] = DependencyFile(name, run_git(repo, "cat-file", "blob", oid).stdout)
    return found


def archive(repo: Path, commit: str) -> bytes:
    """The commit as a tar with every path under ``home/cdsw/``: git's own, deterministic
    for a commit (mtimes are the commit's time, owners root)."""
    try:
        return run_git(repo, "archive", "--format=tar", "--prefix=home/cdsw/", commit).stdout
    except GitError as exc:
        raise SnapshotError(f"cannot archive the snapshot: {exc.detail}") from exc
