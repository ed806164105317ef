"""cgroup v1 limits for sandboxes: memory (+ OOM detection), pids, cpu.

Each workload gets ``<runner's own cgroup>/kiln/<workload id>`` in every usable controller, so
workloads stay accounted inside whatever limits the host gave the runner. ``probe`` finds out
once which controllers are mounted *and writable*; the runtime falls back to rlimits for the
rest and says so loudly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kiln.runtimes.local")

CONTROLLERS = ("memory", "pids", "cpu")
# Files that are nice to have; their absence (no swap accounting, say) is not an error.
OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swappiness"})


def _v1_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """controller → (mount point, root of the hierarchy that is mounted there)."""
    found: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        for option in rfields[2].split(","):
            if option in CONTROLLERS and option not in found:
                found[option] = (fields[4], fields[3])
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def parent_dirs(mountinfo: str, proc_cgroup: str, name: str) -> dict[str, Path]:
    """Where each controller's ``kiln`` parent lives (pure; tested with canned /proc text)."""
    own = _own_paths(proc_cgroup)
    dirs: dict[str, Path] = {}
    for controller, (mountpoint, mount_root) in _v1_mounts(mountinfo).items():
        path = own.get(controller)
        if path is None:
            continue
        # Inside a container the mount may expose only a subtree: strip its root.
        rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path
        rel = "" if rel == "." else rel.lstrip("/")
        dirs[controller] = Path(mountpoint, rel, name)
    return dirs


@dataclass
class Cgroups:
    """The usable controllers, and why the others are not."""

    parents: dict[str, Path] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def probe(cls, name: str = "kiln", parents: Mapping[str, Path] | None = None) -> Cgroups:
        found = cls()
        if parents is None:
            try:
                parents = parent_dirs(
                    Path("/proc/self/mountinfo").read_text(),
                    Path("/proc/self/cgroup").read_text(),
                    name,
                )
            except OSError as exc:
                parents = {}
                log.warning("cannot read cgroup mounts: %s", exc)
        probe_limit = {
            "memory": "memory.limit_in_bytes",
            "pids": "pids.max",
            "cpu": "cpu.cfs_quota_us",
        }
        for controller in CONTROLLERS:
            parent = parents.get(controller)
            if parent is None:
                found.unavailable[controller] = "no cgroup v1 hierarchy with this controller"
                continue
            probe_dir = parent / f".probe-{os.getpid()}"
            try:
                parent.mkdir(exist_ok=True)
                probe_dir.mkdir(exist_ok=True)
                target = probe_dir / probe_limit[controller]
                target.write_text(target.read_text().strip())
                found.parents[controller] = parent
            except OSError as exc:
                found.unavailable[controller] = f"{parent}: {exc.strerror or exc}"
            finally:
                with contextlib.suppress(OSError):
                    probe_dir.rmdir()
        return found

    def create(self, workload_id: str, limits: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Create the workload's cgroups and write its limits; returns controller → path.
        On any failure everything created is removed again."""
        created: dict[str, str] = {}
        try:
            for controller, parent in self.parents.items():
                # Another runtime's close() may have removed the empty parent meanwhile.
                parent.mkdir(exist_ok=True)
                path = parent / workload_id
                path.mkdir()
                created[controller] = str(path)
                for filename, value in limits.get(controller, {}).items():
                    try:
                        (path / filename).write_text(value)
                    except OSError as exc:
                        if filename in OPTIONAL_FILES:
                            log.info("cgroup %s: %s not set (%s)", path, filename, exc.strerror)
                            continue
                        raise
        except BaseException:
            remove(created)
            raise
        return created

    def remove_parents(self) -> None:
        """Leave no empty ``kiln`` directories behind in the host's hierarchy."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()


def procs_files(paths: Mapping[str, str]) -> list[str]:
    return [str(Path(p) / "cgroup.procs") for _, p in sorted(paths.items())]


def member_pids(paths: Mapping[str, str]) -> list[int]:
    """Every process in the workload's cgroup (pids is the cheapest controller to read)."""
    for controller in ("pids", "memory", "cpu"):
        if controller in paths:
            try:
                text = (Path(paths[controller]) / "cgroup.procs").read_text()
            except OSError:
                return []
            return [int(p) for p in text.split()]
    return []


def memory_usage(paths: Mapping[str, str]) -> int | None:
    """Bytes the workload's memory cgroup holds now (None without one)."""
    if "memory" not in paths:
        return None
    try:
        return int((Path(paths["memory"]) / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None


def oom_kills(paths: Mapping[str, str]) -> int:
    """How many processes the kernel OOM-killed in the workload's memory cgroup."""
    if "memory" not in paths:
        return 0
    try:
        text = (Path(paths["memory"]) / "memory.oom_control").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def remove(paths: Mapping[str, str], wait: float = 0.0) -> bool:
    """rmdir each cgroup; True when all are gone. A cgroup whose last process is still exiting
    is busy for a moment, so ``wait`` retries for that long."""
    deadline = time.monotonic() + wait
    pending = dict(paths)
    while True:
        for controller, path in list(pending.items()):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", path, exc)
                continue
            del pending[controller]
        if not pending or time.monotonic() >= deadline:
            return not pending
        time.sleep(0.02)
