"""Running git on the server, hardened.

Git reads configuration from several places and some keys run programs (hooks, fsmonitor,
pagers, editors). The server never wants any of that: it ignores system and global config,
points hooks at nothing and turns fsmonitor off on every invocation. Users cannot write a
project's ``.git`` through the file API or a push, so its repository config stays Kiln's.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.domain.errors import KilnError

_HARDENING = [
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.pager=cat",
    "-c",
    "core.editor=true",
    "-c",
    "protocol.file.allow=never",
    "-c",
    "safe.directory=*",
]

KILN_AUTHOR = ("Kiln", "kiln@localhost")


class GitError(KilnError):
    status = 500
    title = "git failed"


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": "/nonexistent",
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
    }
    if extra:
        env.update(extra)
    return env


class UnsafeRepoConfig(KilnError):
    status = 409
    title = "Unsafe repository configuration"


# A project's .git/config can be written by its workloads (a session's terminal), and some
# keys make git run programs: filter drivers (applied through .gitattributes), diff and
# merge drivers, credential helpers, includes of other files... Command-line overrides cannot
# neutralise every driver name, so the server refuses to run git in a repository whose own
# config holds anything outside this list of sections and keys.
_SAFE_SECTIONS = frozenset(
    {
        "branch",
        "remote",
        "user",
        "receive",
        "http",
        "transfer",
        "fetch",
        "pack",
        "gc",
        "init",
        "push",
        "pull",
        "advice",
        "color",
        "index",
        "status",
        "log",
        "tag",
        "submodule",
    }
)
_SAFE_CORE_KEYS = frozenset(
    {
        "repositoryformatversion",
        "filemode",
        "bare",
        "logallrefupdates",
        "symlinks",
        "ignorecase",
        "precomposeunicode",
        "autocrlf",
        "eol",
        "safecrlf",
        "quotepath",
        "compression",
        "looseCompression".lower(),
        "bigfilethreshold",
        "excludesfile",
        "abbrev",
        "untrackedcache",
        "checkstat",
        "trustctime",
        "sharedrepository",
    }
)
# Keys of otherwise safe sections that name a program to run.
_PROGRAM_KEYS = {
    "remote": {"uploadpack", "receivepack", "vcs", "proxy"},
    "submodule": {"update"},
}
_UNSAFE_SUFFIXES = (".command", ".cmd", ".program", ".helper", ".sshcommand")


def unsafe_config_keys(repo: Path) -> list[str]:
    """Keys of ``repo``'s own .git/config that could make git run a program (reading the file
    with ``git config --file`` runs nothing and does not follow includes)."""
    config = repo / ".git" / "config"
    if not config.is_file():
        return []
    proc = subprocess.run(
        ["git", "config", "--file", str(config), "--list", "--name-only"],
        env=git_env(),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        return ["(unreadable .git/config)"]
    bad = []
    for key in proc.stdout.decode(errors="replace").splitlines():
        key = key.strip().lower()
        section, _, rest = key.partition(".")
        name = rest.rpartition(".")[2]
        if section == "core":
            ok = name in _SAFE_CORE_KEYS
        else:
            ok = (
                section in _SAFE_SECTIONS
                and not key.endswith(_UNSAFE_SUFFIXES)
                and name not in _PROGRAM_KEYS.get(section, set())
            )
        if not ok:
            bad.append(key)
    return bad


def check_repo_config(repo: Path) -> None:
    bad = unsafe_config_keys(repo)
    if bad:
        raise UnsafeRepoConfig(
            "the project's .git/config has settings Kiln will not run git with (they can run "
            f"programs on the server): {', '.join(sorted(set(bad))[:10])}; remove them from a "
            "session's terminal (git config --unset ...) and try again"
        )


def run_git(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    check_repo_config(repo)
    proc = subprocess.run(
        ["git", *_HARDENING, "-C", str(repo), *args],
        env=git_env(env),
        input=input,
        capture_output=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise GitError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc


def init_repo(repo: Path) -> None:
    run_git(repo, "init", "-q", "-b", "main")
    # Pushes land in the working tree and are refused when it has uncommitted changes.
    run_git(repo, "config", "receive.denyCurrentBranch", "updateInstead")
    run_git(repo, "config", "receive.fsckObjects", "true")
    run_git(repo, "config", "transfer.fsckObjects", "true")
    run_git(repo, "config", "http.receivepack", "true")
    run_git(repo, "config", "core.symlinks", "true")


def commit_paths(
    repo: Path, message: str, paths: list[str], author: tuple[str, str] = KILN_AUTHOR
) -> None:
    """Commit exactly ``paths`` (added, changed or removed), leaving other changes alone."""
    name, email = author
    ident = {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": KILN_AUTHOR[0],
        "GIT_COMMITTER_EMAIL": KILN_AUTHOR[1],
    }
    run_git(repo, "add", "-A", "--", *paths, env=ident)
    staged = run_git(repo, "diff", "--cached", "--quiet", "--", *paths, check=False)
    if staged.returncode == 0:
        return  # nothing changed
    run_git(repo, "commit", "-q", "--no-verify", "-m", message, "--", *paths, env=ident)


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
