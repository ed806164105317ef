"""A project's recent git history, for its pages: the last commits, and the last commit that
touched each entry of a folder (as GitHub and GitLab show beside every file).

Every page asks git once: one bounded ``git log`` through ``kiln.storage.git.run_git`` (which
runs git hardened, and never runs it another way), parsed here. Nothing reads ``.git``
directly. A folder's entries are matched against the newest ``SCAN_COMMITS`` commits that
touched the folder; an entry last changed before those gets no commit (the page says
"older"), which keeps a page on a long history as fast as on a short one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kiln.storage.git import GitError, run_git
from kiln.storage.safepath import SafePath

SCAN_COMMITS = 500
RECENT_COMMITS = 5
# One commit of `git log -z --name-only` with this format: RS, the fields separated by US,
# NUL, then the changed paths (newline first) each ended by NUL.
_FIELDS = ("%H", "%an", "%ae", "%aI", "%s")
_FORMAT = "--format=%x1e" + "%x1f".join(_FIELDS)
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_NO_COMMITS = "does not have any commits yet"


@dataclass(frozen=True)
class Commit:
    sha: str
    author: str
    email: str
    at: datetime
    subject: str
    paths: tuple[str, ...] = field(default=(), repr=False)

    @property
    def short(self) -> str:
        return self.sha[:10]


def _parse(output: bytes) -> list[Commit]:
    commits = []
    for chunk in output.split(b"\x1e"):
        header, _, names = chunk.partition(b"\0")
        fields = header.decode("utf-8", errors="replace").split("\x1f")
        # A commit message cannot smuggle in a separator unnoticed: a record that does not
        # have the expected shape is skipped rather than shown wrong.
        if len(fields) != len(_FIELDS) or not _SHA.fullmatch(fields[0]):
            continue
        sha, author, email, at, subject = fields
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            continue
        paths = tuple(os.fsdecode(n) for n in names.lstrip(b"\n").split(b"\0") if n)
        commits.append(Commit(sha, author, email, when, subject, paths))
    return commits


def _log(repo: Path, *args: str) -> list[Commit]:
    """``git log`` with the given options on the current branch; [] when it has no commits."""
    proc = run_git(repo, "log", "-z", "--no-renames", "--no-color", _FORMAT, *args, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        if _NO_COMMITS in message:
            return []
        raise GitError(f"git log failed: {message}")
    return _parse(proc.stdout)


def recent_commits(repo: Path, limit: int = RECENT_COMMITS) -> list[Commit]:
    """The newest ``limit`` commits of the project, newest first."""
    return _log(repo, f"--max-count={limit}")


@dataclass(frozen=True)
class FolderHistory:
    last: dict[str, Commit]  # entry name -> the newest commit that touched it
    complete: bool  # False: the scan stopped at SCAN_COMMITS; unmatched entries are older


def folder_history(repo: Path, folder: SafePath, scan: int = SCAN_COMMITS) -> FolderHistory:
    """For each entry of ``folder``, the newest commit that changed it (or anything in it)."""
    prefix = f"{folder}/" if folder.parts else ""
    # ':(literal)': the folder's name is a path, never a glob pattern.
    pathspec = ["--", f":(literal){folder}"] if folder.parts else []
    commits = _log(repo, "--name-only", f"--max-count={scan}", *pathspec)
    last: dict[str, Commit] = {}
    for commit in commits:
        for path in commit.paths:
            if path.startswith(prefix):
                last.setdefault(path[len(prefix) :].split("/", 1)[0], commit)
    return FolderHistory(last, complete=len(commits) < scan)


__all__ = ["Commit", "FolderHistory", "folder_history", "recent_commits"]
