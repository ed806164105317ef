"""Every server-side git command on a project runs in a sandbox, as the workloads' uid.

A project's tree, ``.git`` included, is written by its workloads: a session's terminal can
plant a filter driver, a hook, an ``include.path``, a ``gitdir:`` file pointing elsewhere, an
alternates file, ``.gitattributes``... Git reads all of them, and several make it run
programs. No allow-list can keep up with git's configuration surface, so the server does not
try: it runs git where following any of it does no more than the user's own job could.

The sandbox (bubblewrap) binds only that project's tree (at ``/home/cdsw``, the same path its
workloads see, so a ``gitdir:`` pointer means the same thing in both) plus the host's system
directories read-only; it has no network, a private ``/tmp`` and ``/proc``, and runs as the
workloads' host uid with no capabilities and ``no_new_privs``. A planted command therefore
runs confined exactly like a job of the project, and nothing outside the project exists in
its view.

How it starts when Kiln runs as root (the data dir is ``0700``, so the workload uid cannot
reach the project's path itself)::

    unshare --mount --propagation private   root, private mount namespace
      sh -c 'mount --bind PROJECT STAGE'    make the tree reachable at STAGE, in there only
        setpriv --reuid=UID --no-new-privs  drop to the workload uid, no capabilities
          bwrap ... --bind STAGE /home/cdsw git ...

Without root (a developer's machine) bubblewrap runs as the current user directly.
The root-side steps get a fixed environment; git's variables reach it via ``--setenv``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SANDBOX_REPO = "/home/cdsw"
# Where the root-side step binds the project for the unprivileged bubblewrap to find it.
# Each sandbox has its own mount namespace, so concurrent sandboxes never see each other's.
STAGE_DIR = "/run/kiln-git-stage"
# What runs before the workload uid is taken: a fixed, minimal environment.
_ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
_STAGE_SCRIPT = 'mount --bind -- "$1" "$2" && shift 2 && exec "$@"'
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or, as root, unshare/setpriv) is missing: server-side git cannot run."""


@dataclass(frozen=True)
class GitSandbox:
    """How to wrap a git command. ``uid`` is the workloads' host uid when Kiln runs as root;
    None runs bubblewrap as the current (unprivileged) user."""

    uid: int | None

    @classmethod
    def for_this_process(cls, workload_uid: int) -> GitSandbox:
        return cls(uid=workload_uid if os.geteuid() == 0 else None)

    def command(
        self,
        repo: Path,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        writable: bool = True,
    ) -> list[str]:
        """The argv that runs ``argv`` with ``repo`` at ``/home/cdsw`` (read-only unless
        ``writable``) and exactly ``env`` as its environment."""
        bwrap = [*_bwrap_base(), "--bind" if writable else "--ro-bind"]
        if self.uid is None:
            return [*bwrap, str(repo), SANDBOX_REPO, *_bwrap_tail(env), *argv]
        _ensure_stage_dir()
        setpriv = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
        inner = [*setpriv, *bwrap, STAGE_DIR, SANDBOX_REPO, *_bwrap_tail(env), *argv]
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            _STAGE_SCRIPT,
            "sh",
            str(repo),
            STAGE_DIR,
            *inner,
        ]

    @property
    def root_env(self) -> dict[str, str]:
        """The environment of the process that is started (the root-side steps)."""
        return dict(_ROOT_ENV)

    def check_available(self) -> None:
        needed = ["bwrap"] if self.uid is None else ["bwrap", "unshare", "setpriv", "mount"]
        missing = [tool for tool in needed if shutil.which(tool, path=_ROOT_ENV["PATH"]) is None]
        if missing:
            raise SandboxUnavailable(
                f"server-side git runs in a sandbox and needs {', '.join(missing)} "
                "(Debian packages bubblewrap, util-linux); install them"
            )


def _bwrap_base() -> list[str]:
    args = [
        "bwrap",
        "--unshare-all",  # user, pid, ipc, uts, cgroup and network: no network at all
        "--die-with-parent",  # the server's timeout or cancellation ends the whole sandbox
        "--new-session",  # no TIOCSTI into a terminal that is not there anyway
        "--cap-drop",
        "ALL",
    ]
    for name in _SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # noqa: S108 (private)
    return args


def _bwrap_tail(env: Mapping[str, str]) -> list[str]:
    args = ["--chdir", SANDBOX_REPO, "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    args.append("--")
    return args


def _ensure_stage_dir() -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(STAGE_DIR, 0o755)
