"""Build snapshots with real git: the working tree as a commit without touching the user's
branch or index, .gitignore honoured, symlinks stored as links, size limit, named commits."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.build.snapshot import (
    Snapshot,
    SnapshotError,
    check_committish,
    read_snapshot,
    take_snapshot,
)
from kiln.domain.errors import InvalidInput
from kiln.runtimes.local.ownership import adopt_tree
from kiln.storage.git import commit_all, init_repo, repo_owner, run_git

LIMIT = 1024**2


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    owner = repo_owner()
    if owner is not None:  # as Kiln keeps project trees: owned by the workload uid
        adopt_tree(repo, owner, owner)
    init_repo(repo)
    (repo / "main.py").write_text("print('one')\n")
    (repo / ".gitignore").write_text("data/\n")
    (repo / "requirements.txt").write_text("humanize==4.9.0\n")
    commit_all(repo, "first")
    return repo


def git(repo: Path, *args: str) -> str:
    """Read-only looks with the host's git (as root: it must not write into the repo)."""
    return subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def archive(repo: Path, snap: Snapshot) -> bytes:
    return read_snapshot(repo, snap).code_tar


def names(repo: Path, snap: Snapshot) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive(repo, snap))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_clean_tree_builds_head(repo: Path) -> None:
    snap = take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    assert snap.commit == git(repo, "rev-parse", "HEAD") == snap.head
    assert snap.from_working_tree and snap.files == 3
    assert git(repo, "rev-parse", "refs/kiln/builds/b1") == snap.commit


def test_the_working_tree_without_touching_branch_or_index(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    (repo / "main.py").write_text("print('two')\n")
    (repo / "new.py").write_text("x = 1\n")
    (repo / "data").mkdir()
    (repo / "data" / "big.csv").write_text("ignored\n")
    status = git(repo, "status", "--porcelain")
    first = take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    again = take_snapshot(repo, "b2", commit=None, max_file_bytes=LIMIT)
    assert first.commit == again.commit != head  # same files, same HEAD: the same commit
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == status
    assert git(repo, "log", "-1", "--format=%P", first.commit) == head
    entries = names(repo, first)
    assert "home/cdsw/new.py" in entries and "home/cdsw/data/big.csv" not in entries
    assert all(m.mtime == first.time for m in entries.values())
    # A file that is tracked although ignored stays in.
    ident = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    ident |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_git(repo, "add", "-f", "data/big.csv")
    run_git(repo, "commit", "-qm", "force", env=ident)
    tracked = take_snapshot(repo, "b3", commit=None, max_file_bytes=LIMIT)
    assert "home/cdsw/data/big.csv" in names(repo, tracked)


def test_head_moving_on_between_snapshots(repo: Path) -> None:
    (repo / "main.py").write_text("print('dirty')\n")
    take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    (repo / "main.py").write_text("print('committed')\n")
    commit_all(repo, "second")
    (repo / "main.py").write_text("print('dirty again')\n")
    snap = take_snapshot(repo, "b2", commit=None, max_file_bytes=LIMIT)
    assert b"dirty again" in archive(repo, snap)


def test_symlinks_are_stored_as_links(repo: Path) -> None:
    os.symlink("/etc/passwd", repo / "passwd")
    os.symlink("/", repo / "root")
    snap = take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    entries = names(repo, snap)
    assert entries["home/cdsw/passwd"].issym()
    assert entries["home/cdsw/passwd"].linkname == "/etc/passwd"
    assert entries["home/cdsw/root"].issym() and "home/cdsw/root/etc" not in entries
    assert b"root:x:0:0" not in archive(repo, snap)


def test_files_over_the_limit_are_named(repo: Path) -> None:
    (repo / "weights.bin").write_bytes(b"w" * (LIMIT + 1))
    (repo / "other.bin").write_bytes(b"o" * (3 * LIMIT))
    with pytest.raises(SnapshotError) as caught:
        take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    assert "other.bin (3.0 MiB)" in caught.value.detail and "weights.bin" in caught.value.detail
    assert caught.value.status == 422


def test_named_commits(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    (repo / "main.py").write_text("print('two')\n")
    commit_all(repo, "second")
    assert take_snapshot(repo, "b1", commit="HEAD~1", max_file_bytes=LIMIT).commit == first
    assert take_snapshot(repo, "b2", commit=first[:10], max_file_bytes=LIMIT).commit == first
    with pytest.raises(SnapshotError, match="no commit 'nope'"):
        take_snapshot(repo, "b3", commit="nope", max_file_bytes=LIMIT)


@pytest.mark.parametrize("bad", ["--output=/tmp/x", "a..b", "a b", "x;y", "", "-"])
def test_commit_names_are_checked(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_committish(bad)


def test_dependency_files(repo: Path) -> None:
    (repo / "cdsw-build.sh").symlink_to("requirements.txt")
    snap = take_snapshot(repo, "b1", commit=None, max_file_bytes=LIMIT)
    found = read_snapshot(repo, snap).dependencies
    assert found["requirements.txt"].data == b"humanize==4.9.0\n"
    assert found["cdsw-build.sh"].symlink and found["cdsw-build.sh"].data is None
