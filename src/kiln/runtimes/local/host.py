"""Facts about the host the local runtime needs, and a probe of what works here.

``probe_features`` is run once per runtime instance. Anything missing is logged at WARNING
(or ERROR when it weakens isolation) with the fallback chosen, so an operator reading the
runner's log knows exactly how workloads are confined on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kiln.runtimes.base import RuntimeUnavailable
from kiln.runtimes.local import sandbox
from kiln.runtimes.local.builtin import PythonFacts
from kiln.runtimes.local.cgroups import Cgroups
from kiln.runtimes.local.sandbox import HostFacts, RootfsFacts

log = logging.getLogger("kiln.runtimes.local")

REQUIRED_TOOLS = ("bwrap", "unshare", "setpriv", "nsenter", "mount", "sleep")


def _entry_kind(path: Path) -> str | None:
    try:
        if path.is_symlink():
            return "symlink:" + os.readlink(path)
        if path.is_dir():
            return "dir"
        if path.is_file():
            return "file"
    except OSError:
        return None
    return None


def list_dir(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    try:
        names = os.listdir(path)
    except OSError:
        return entries
    for name in names:
        kind = _entry_kind(path / name)
        if kind is not None:
            entries[name] = kind
    return entries


def host_addresses() -> tuple[str, ...]:
    """The host's own IPv4 addresses (all interfaces): a workload may never reach these
    unless its policy allows a specific one."""
    try:
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True, timeout=5
        ).stdout
        addresses = [
            info["local"] for link in json.loads(out) for info in link.get("addr_info", [])
        ]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        log.error("cannot list the host's addresses (%s): only loopback is known to be ours", exc)
        addresses = []
    return tuple(sorted(set(addresses)))


def builtin_facts() -> HostFacts:
    """The built-in runtime is this very Python: its prefix and the host's /usr."""
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    root = list_dir(Path("/"))
    return HostFacts(
        top_level={k: v for k, v in root.items() if k in ("usr", "bin", "sbin") or "lib" in k},
        etc_entries=frozenset(list_dir(Path("/etc"))),
        python_prefixes=tuple(sorted(prefixes)),
        # Kiln's own virtual environment (JupyterLab is one of its dependencies), if any.
        kiln_env=os.path.abspath(sys.prefix) if sys.prefix != sys.base_prefix else None,
    )


def python_facts() -> PythonFacts:
    """This Python as the built-in runtime's interpreter (see ``builtin.py``)."""
    executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    in_env = sys.prefix != sys.base_prefix
    scripts = os.path.join(sys.prefix, "bin") if in_env else os.path.dirname(executable)
    if not in_env and any(
        scripts == root or scripts.startswith(root + "/") for root in sandbox.PUBLIC_ROOTS
    ):
        scripts_dir = None  # /usr/bin and the like: on PATH already, their #! lines resolve
    else:
        scripts_dir = scripts
    names = ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}")
    dirs = dict.fromkeys([scripts, os.path.realpath(scripts)])
    return PythonFacts(
        executable=executable,
        version=".".join(map(str, sys.version_info[:3])),
        scripts_dir=scripts_dir,
        script_pythons=tuple(os.path.join(d, n) for d in dirs for n in names),
    )


def rootfs_facts(path: Path) -> RootfsFacts:
    if not (path / "usr").is_dir() and not (path / "bin").exists():
        raise RuntimeUnavailable(f"{path} does not look like a root filesystem (no /usr, /bin)")
    top = list_dir(path)
    var = list_dir(path / "var") if top.get("var") == "dir" else {}
    return RootfsFacts(str(path), top, list_dir(path / "etc"), var)


def reachable(path: str, uid: int, gid: int) -> bool:
    """Can ``uid:gid`` (no supplementary groups) walk down to ``path``? Bind sources it
    cannot reach must be staged by root first (see sandbox.plan_staging)."""
    current = Path(os.path.realpath(path))
    for directory in [*reversed(current.parents)]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            allowed = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            allowed = bool(st.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(st.st_mode & stat.S_IXOTH)
        if not allowed:
            return False
    return True


@dataclass
class Features:
    """What this host lets the local runtime do."""

    cgroups: Cgroups
    slirp4netns: bool
    nft: bool
    notes: list[str] = field(default_factory=list)

    @property
    def network(self) -> bool:
        """Egress and inbound ports need both: slirp carries packets, nft enforces policy."""
        return self.slirp4netns and self.nft


def probe_features(cgroup_parents: dict[str, Path] | None = None) -> Features:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeUnavailable(
            f"the local runtime needs {', '.join(missing)} (Debian: apt-get install bubblewrap "
            "util-linux mount)"
        )
    cgroups = Cgroups.probe(parents=cgroup_parents)
    features = Features(
        cgroups=cgroups,
        slirp4netns=shutil.which("slirp4netns") is not None,
        nft=shutil.which("nft") is not None,
    )
    for controller, why in cgroups.unavailable.items():
        fallback = {
            "memory": "RLIMIT_AS per process (virtual memory, not resident: weaker, and no "
            "out-of-memory reason)",
            "pids": "RLIMIT_NPROC, which counts every workload of the shared workload uid",
            "cpu": "nothing: CPU is NOT limited",
        }[controller]
        message = f"cgroup {controller} unavailable ({why}); falling back to {fallback}"
        features.notes.append(message)
        log.error("LOCAL RUNTIME: %s", message)
    if not features.slirp4netns:
        message = "slirp4netns missing: workloads get no network at all (no egress, no ports)"
        features.notes.append(message)
        log.error("LOCAL RUNTIME: %s", message)
    if not features.nft:
        message = "nft missing: egress policy cannot be enforced, so workloads get no network"
        features.notes.append(message)
        log.error("LOCAL RUNTIME: %s", message)
    for controller, parent in cgroups.parents.items():
        log.info("local runtime: cgroup %s limits under %s", controller, parent)
    return features


def probe_user_namespaces(host_uid: int, host_gid: int) -> None:
    """Start one trivial sandbox as the workload uid; refuse to run without one that works."""
    argv = [
        "setpriv", f"--reuid={host_uid}", f"--regid={host_gid}", "--clear-groups",
        "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
        "--", "/usr/bin/true",
    ]  # fmt: skip
    try:
        result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeUnavailable(f"cannot run bubblewrap: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeUnavailable(
            "bubblewrap cannot create an unprivileged sandbox here (user namespaces disabled? "
            "check /proc/sys/user/max_user_namespaces): "
            + result.stderr.decode(errors="replace").strip()
        )
