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

Taking it is one script in one git sandbox (``run_git_script``), reading it another: the
code layer (``git archive``) and the bytes of ``requirements.txt`` and ``cdsw-build.sh``
(``git cat-file --batch``).

Either way the commit gets a ref, ``refs/kiln/builds/<build>``, so it outlives a ``git gc``
and the image's ``commit`` label can always be checked out. Tracked files over the size limit
fail the snapshot, naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kiln.domain.errors import InvalidInput
from kiln.storage.git import GitError, repo_lock, run_git_script

SNAPSHOT_INDEX = ".git/kiln-snapshot.index"  # relative to the repository (git's cwd)
SNAPSHOT_MESSAGE = "Kiln build snapshot of the working tree\n"
DEPENDENCY_FILES = ("requirements.txt", "cdsw-build.sh")
_COMMITTISH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@{}~^-]{0,199}$")


class SnapshotError(InvalidInput):
    """The project cannot be snapshot as asked (an unknown commit, a file over the limit)."""

    title = "Snapshot failed"


@dataclass(frozen=True)
class DependencyFile:
    """``requirements.txt`` or ``cdsw-build.sh`` at the snapshot: its bytes (regular file)
    or, for a symlink, nothing readable here (it is resolved inside the build sandbox)."""

    name: str
    data: bytes | None
    symlink: bool = False


@dataclass(frozen=True)
class Snapshot:
    commit: str  # what the image holds
    tree: str
    head: str | None  # the branch's commit when the snapshot was taken
    from_working_tree: bool
    time: int  # the commit's time: mtimes in the code layer, the image's "created"
    files: int
    size: int  # bytes of all files
    # requirements.txt / cdsw-build.sh in the commit: name -> git mode ("120000": a symlink)
    dependency_modes: dict[str, str] = field(default_factory=dict)


def check_committish(text: str) -> str:
    """A commit name a user may give (a sha, a branch, a tag, ``HEAD~2``): no options, no
    paths, nothing git would read as something else."""
    if not _COMMITTISH.match(text) or ".." in text or text.startswith("-"):
        raise InvalidInput(
            f"commit {text[:100]!r} is not a commit name (a hash, a branch or a tag)"
        )
    return text


# The whole snapshot in one sandbox (each start of one costs ~30 ms). $1: the commit to
# build ("" = the working tree), $2: the build's ref name; the index and the message come
# in the environment. Prints "<commit> <tree> <head or -> <commit time>", a newline, then
# the commit's full listing (ls-tree -r -l -z). Exit 3: there is no such commit.
_SNAPSHOT_SCRIPT = """set -e
head=$(git rev-parse --verify --quiet 'HEAD^{commit}') || head=
if [ -n "$1" ]; then
  sha=$(git rev-parse --verify --quiet --end-of-options "$1^{commit}") || exit 3
else
  if [ -n "$head" ]; then git read-tree --reset "$head"; else git read-tree --empty; fi
  git add -A
  tree=$(git write-tree)
  if [ -n "$head" ] && [ "$tree" = "$(git rev-parse "$head^{tree}")" ]; then
    sha=$head
  elif [ -n "$head" ]; then
    when=$(git log -1 --format=%ct "$head")
    export GIT_AUTHOR_DATE="@$when +0000" GIT_COMMITTER_DATE="@$when +0000"
    sha=$(printf '%s' "$KILN_SNAPSHOT_MESSAGE" | git commit-tree "$tree" -p "$head")
  else
    export GIT_AUTHOR_DATE="@0 +0000" GIT_COMMITTER_DATE="@0 +0000"
    sha=$(printf '%s' "$KILN_SNAPSHOT_MESSAGE" | git commit-tree "$tree")
  fi
fi
git update-ref "refs/kiln/builds/$2" "$sha"
printf '%s %s %s %s\n' "$sha" "$(git rev-parse "$sha^{tree}")" "${head:--}" \
  "$(git log -1 --format=%ct "$sha")"
git ls-tree -r -l -z --full-tree "$sha"
"""
_SNAPSHOT_ENV = {
    "GIT_INDEX_FILE": SNAPSHOT_INDEX,
    "KILN_SNAPSHOT_MESSAGE": SNAPSHOT_MESSAGE,
    "GIT_AUTHOR_NAME": "Kiln",
    "GIT_AUTHOR_EMAIL": "kiln@localhost",
    "GIT_COMMITTER_NAME": "Kiln",
    "GIT_COMMITTER_EMAIL": "kiln@localhost",
}


def take_snapshot(repo: Path, build: str, *, commit: str | None, max_file_bytes: int) -> Snapshot:
    """Snapshot the project for build ``build`` (see the module docstring)."""
    with repo_lock(repo):
        proc = run_git_script(
            repo, _SNAPSHOT_SCRIPT, commit or "", build, what="snapshot", env=_SNAPSHOT_ENV,
            check=False,
        )  # fmt: skip
    if proc.returncode == 3:
        raise SnapshotError(f"the project has no commit {commit!r}")
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise GitError(f"git snapshot failed: {message or f'exit code {proc.returncode}'}")
    first, _, listing = proc.stdout.partition(b"\n")
    sha, tree, head, when = first.decode().split()
    files = size = 0
    too_big: list[tuple[str, int]] = []
    modes: dict[str, str] = {}
    for entry in filter(None, listing.split(b"\0")):
        meta, _, raw_path = entry.partition(b"\t")
        parts = meta.split()
        if len(parts) != 4 or parts[1] != b"blob":
            continue  # a submodule (commit) has no size here
        path = raw_path.decode(errors="replace")
        files += 1
        blob_size = int(parts[3])
        size += blob_size
        if blob_size > max_file_bytes:
            too_big.append((path, blob_size))
        if path in DEPENDENCY_FILES:
            modes[path] = parts[0].decode()
    if too_big:
        names = ", ".join(f"{p} ({s / 1024**2:.1f} MiB)" for p, s in too_big[:5])
        more = f" and {len(too_big) - 5} more" if len(too_big) > 5 else ""
        raise SnapshotError(
            f"files over the {max_file_bytes / 1024**2:g} MiB limit are in the snapshot: "
            f"{names}{more}. Add them to .gitignore (and `git rm --cached` them if they are "
            "committed), then build again"
        )
    return Snapshot(
        sha,
        tree,
        None if head == "-" else head,
        commit is None,
        int(when),
        files,
        size,
        modes,
    )


# The snapshot's contents in one sandbox: the dependency files (one cat-file --batch, its
# length first) and the code layer (git archive). $1: the commit.
_READ_SCRIPT = """set -e
printf '%s:requirements.txt\n%s:cdsw-build.sh\n' "$1" "$1" | git cat-file --batch \
  > "$TMPDIR/deps"
git archive --format=tar --prefix=home/cdsw/ "$1" > "$TMPDIR/code.tar"
wc -c < "$TMPDIR/deps"
cat "$TMPDIR/deps" "$TMPDIR/code.tar"
"""


@dataclass(frozen=True)
class Contents:
    code_tar: bytes  # every path under home/cdsw/: git's own tar, deterministic for a commit
    dependencies: dict[str, DependencyFile]


def read_snapshot(repo: Path, snap: Snapshot) -> Contents:
    """The code layer's tar (``git archive``: mtimes the commit's time, owners root) and the
    bytes of ``requirements.txt`` and ``cdsw-build.sh`` (a symlinked one is left for the
    sandbox to resolve)."""
    try:
        out = run_git_script(repo, _READ_SCRIPT, snap.commit, what="archive").stdout
    except GitError as exc:
        raise SnapshotError(f"cannot read the snapshot: {exc.detail}") from exc
    length, _, rest = out.partition(b"\n")
    batch, code_tar = rest[: int(length)], rest[int(length) :]
    found: dict[str, DependencyFile] = {}
    for name in DEPENDENCY_FILES:  # in the order the script asked for them
        header, _, batch = batch.partition(b"\n")
        if header.endswith(b" missing"):
            continue
        size = int(header.split()[2])
        data, batch = batch[:size], batch[size + 1 :]
        if snap.dependency_modes.get(name) == "120000":
            found[name] = DependencyFile(name, None, symlink=True)
        elif name in snap.dependency_modes:
            found[name] = DependencyFile(name, data)
    return Contents(code_tar, found)
