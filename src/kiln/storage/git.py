"""Running git on the server: always sandboxed, always as the workloads' uid.

A project's ``.git`` and working tree are written by its workloads, and git reads
configuration, attributes, hooks, alternates, ``gitdir:`` files and more from them — some of
which run programs. So every server-side git command runs through ``kiln.storage.gitsandbox``:
bound to that one project's tree, with no network, as the uid its workloads run as. Whatever
git follows there does no more than the user's own job could (see docs/architecture.md,
"Security"). The project tree is owned by that uid, so git's ownership check passes without
``safe.directory`` exceptions.

On top of the sandbox, each command still turns off what the server never wants: hooks,
fsmonitor, pagers, editors, the file:// transport; system and global config are ignored.
These settings travel in ``GIT_CONFIG_*`` variables, which rank like ``-c`` and reach every
git process a command starts.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from kiln.domain.errors import KilnError
from kiln.storage.gitsandbox import SANDBOX_REPO, GitSandbox

KILN_AUTHOR = ("Kiln", "kiln@localhost")
# The uid workloads run as unless the site says otherwise (RunnerSettings.host_uid).
DEFAULT_WORKLOAD_UID = 8536
# A planted filter or a huge repository must not hold a request (and the repository lock)
# for ever; the sandbox dies with its monitor process.
GIT_TIMEOUT_SECONDS = 120.0

SERVER_CONFIG: tuple[tuple[str, str], ...] = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.pager", "cat"),
    ("core.editor", "true"),
    ("protocol.file.allow", "never"),
    ("core.protectHFS", "true"),
    ("core.protectNTFS", "true"),
)

_sandbox = GitSandbox.for_this_process(DEFAULT_WORKLOAD_UID)


def configure(workload_uid: int) -> None:
    """Run server-side git as ``workload_uid`` (when this process is root). Called by each
    service at start-up with the site's ``KILN_RUNNER_HOST_UID``."""
    global _sandbox
    _sandbox = GitSandbox.for_this_process(workload_uid)
    _sandbox.check_available()


def sandbox() -> GitSandbox:
    return _sandbox


def repo_owner() -> int | None:
    """The uid that must own project trees for server-side git (None: whoever runs Kiln)."""
    return _sandbox.uid


class GitError(KilnError):
    """Git refused or failed. Its own message is the detail: the repository's state (often
    something a workload did to it) is what the user must fix, so this is a 409."""

    status = 409
    title = "git failed"


def config_env(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``GIT_CONFIG_COUNT``/``KEY_n``/``VALUE_n``: inherited by every git process started
    below, with the precedence of ``-c``."""
    env: dict[str, str] = {}
    count = 0
    for count, (key, value) in enumerate(pairs, start=1):
        env[f"GIT_CONFIG_KEY_{count - 1}"] = key
        env[f"GIT_CONFIG_VALUE_{count - 1}"] = value
    env["GIT_CONFIG_COUNT"] = str(count)
    return env


def git_env(
    extra: Mapping[str, str] | None = None, *, config: Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The whole environment git gets inside the sandbox."""
    env = {
        "PATH": "/usr/bin:/bin",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": "/nonexistent",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CEILING_DIRECTORIES": "/home",
        "LC_ALL": "C",
        "TMPDIR": "/tmp",  # noqa: S108 (the sandbox's own, private)
    }
    env.update(config_env([*SERVER_CONFIG, *config]))
    if extra:
        env.update(extra)
    return env


def sandboxed(
    repo: Path, argv: list[str], env: Mapping[str, str] | None = None, *, writable: bool = True
) -> list[str]:
    """The full command line that runs ``argv`` (git, or a shell running git) on ``repo``."""
    return _sandbox.command(repo, argv, git_env(env), writable=writable)


def _run(
    repo: Path,
    argv: list[str],
    *,
    env: Mapping[str, str] | None,
    input: bytes | None,
    check: bool,
    timeout: float,
    what: str,
) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            sandboxed(repo, argv, env),
            env=_sandbox.root_env,
            input=input,
            capture_output=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {what} did not finish within {timeout:.0f} s; stopped") from exc
    if check and proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise GitError(f"git {what} failed: {message or f'exit code {proc.returncode}'}")
    return proc


def run_git(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT_SECONDS,
) -> subprocess.CompletedProcess[bytes]:
    """``git ARGS`` in ``repo``'s sandbox (the repository is ``/home/cdsw`` in there)."""
    return _run(
        repo, ["git", *args], env=env, input=input, check=check, timeout=timeout, what=args[0]
    )


def run_git_script(
    repo: Path,
    script: str,
    *args: str,
    what: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT_SECONDS,
) -> subprocess.CompletedProcess[bytes]:
    """Several git commands in one sandbox (one start-up instead of several): ``script`` is
    POSIX sh (dash starts faster than bash) with the arguments as ``"$@"``; user data only
    ever travels in arguments and environment variables, never in the script text."""
    argv = ["/bin/sh", "-c", script, "kiln-git", *args]
    return _run(repo, argv, env=env, input=None, check=check, timeout=timeout, what=what)


_INIT_SCRIPT = """set -e
git init -q -b main
# Pushes land in the working tree and are refused when it has uncommitted changes.
git config receive.denyCurrentBranch updateInstead
git config receive.fsckObjects true
git config transfer.fsckObjects true
git config http.receivepack true
git config core.symlinks true
"""


def init_repo(repo: Path) -> None:
    run_git_script(repo, _INIT_SCRIPT, what="init")


# Commit exactly the given pathspecs, leaving other changes alone; pathspecs git neither
# tracks nor would add (ignored by .gitignore) are left out, and nothing to commit is fine.
# (The loop keeps in "$@" only the pathspecs that pass: "for" iterates over a copy.)
_COMMIT_SCRIPT = """set -e
for spec do
  shift
  # An assignment keeps git's exit status, so "set -e" stops on a broken repository
  # (inside "[ ... ]" a failing git would just look like "nothing to commit").
  listed=$(git ls-files -z --cached --others --exclude-standard -- "$spec")
  if [ -n "$listed" ]; then
    set -- "$@" "$spec"
  fi
done
[ $# -gt 0 ] || exit 0
git add -A -- "$@"
git commit -q --no-verify -m "$KILN_COMMIT_MESSAGE" -- "$@" 2>"$TMPDIR/commit.err" && exit 0
# It failed: fine when there was nothing to commit, else git's reason.
git diff --cached --quiet -- "$@" && exit 0
cat "$TMPDIR/commit.err" >&2
exit 1
"""


def commit_paths(
    repo: Path, message: str, paths: list[str], author: tuple[str, str] = KILN_AUTHOR
) -> None:
    """Commit exactly ``paths`` (pathspecs: added, changed or removed) as ``author``."""
    name, email = author
    env = {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": KILN_AUTHOR[0],
        "GIT_COMMITTER_EMAIL": KILN_AUTHOR[1],
        "KILN_COMMIT_MESSAGE": message,
    }
    run_git_script(repo, _COMMIT_SCRIPT, *paths, what="commit", env=env)


def commit_all(repo: Path, message: str, author: tuple[str, str] = KILN_AUTHOR) -> None:
    commit_paths(repo, message, ["."], author)


_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def repo_lock(repo: Path) -> Iterator[None]:
    """Serialize changes to one project's repository and files: file-API writes (each a
    commit) and git pushes. A thread lock within this process, plus an advisory file lock
    beside the repository so other processes (the runner, a second web worker) wait too."""
    key = repo.resolve()
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        lock_path = key.parent / f".{key.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


__all__ = [
    "KILN_AUTHOR",
    "SANDBOX_REPO",
    "GitError",
    "commit_all",
    "commit_paths",
    "configure",
    "git_env",
    "init_repo",
    "repo_lock",
    "run_git",
    "run_git_script",
    "sandboxed",
]
