"""The dependency layer: its cache key, and the sandboxed install that makes it.

The install runs as a workload through the ``WorkloadRuntime`` seam, on the base image's root
filesystem (read-only) with nothing writable but three private, size-capped tmpfs
directories (``/opt/kiln/deps``, ``/tmp``, ``/home/cdsw``) and one output file on the host,
bound at ``/kiln/out/deps.tar`` and capped by ``RLIMIT_FSIZE``. It has the site's egress
policy for jobs, a CPU, memory and process limit, a deadline, and no credentials: no Kiln
token, certificate or password is in its environment or its view. A fork bomb hits the pids
limit, a disk filler its tmpfs (``No space left on device``), a script that never ends the
deadline; the build fails, saying which.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kiln.build import in_sandbox
from kiln.build.layers import canonical_json
from kiln.build.snapshot import DependencyFile
from kiln.runtimes.base import NetworkPolicy, WorkloadRuntime, WorkloadRuntimeError, WorkloadSpec

DEPS_PREFIX = "/opt/kiln/deps"
DEPS_VERSION = 1  # bump when the layer's layout or the install's behaviour changes
SOURCE_DATE_EPOCH = 315532800  # 1980-01-01: the dependency layer's mtimes (zip-safe)
SCRIPT_IN_SANDBOX = "/kiln/bin/kiln-build.py"
OUTPUT_IN_SANDBOX = "/kiln/out/deps.tar"
_TAR_SLACK = 64 * 1024**2  # tar headers and padding on top of the files' bytes
DEADLINE_GRACE_SECONDS = 30


@dataclass(frozen=True)
class SandboxLimits:
    """What one build sandbox may use (``BuilderSettings`` fills it)."""

    cpu: float = 1.0
    memory_bytes: int = 4 * 1024**3
    pids_max: int = 1024
    deps_max_bytes: int = 3 * 1024**3
    tmp_bytes: int = 1024**3
    log_max_bytes: int = 16 * 1024**2
    network: NetworkPolicy = field(default_factory=NetworkPolicy)

    @property
    def layer_max_bytes(self) -> int:
        """The largest dependency layer an install may hand back (its tar)."""
        return self.deps_max_bytes + _TAR_SLACK


class InstallFailed(Exception):
    """The install exited non-zero or was killed; ``reason`` is for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InstallStopped(Exception):
    """The install was stopped: the build was cancelled or ran out of time."""


def pip_environment(index_url: str | None, extra_index_url: str | None) -> dict[str, str]:
    """The site's pip settings, as pip reads them from its environment."""
    env = {}
    if index_url:
        env["PIP_INDEX_URL"] = index_url
    if extra_index_url:
        env["PIP_EXTRA_INDEX_URL"] = extra_index_url
    return env


def dependency_key(
    base_digest: str,
    files: Mapping[str, DependencyFile],
    tree: str,
    env: Mapping[str, str],
) -> str:
    """The cache key of a dependency layer: the base, ``requirements.txt`` and
    ``cdsw-build.sh`` (their bytes; a symlinked one is only known inside the sandbox, so
    then the whole snapshot's tree counts), and pip's settings (every ``PIP_*`` variable of
    the build's environment)."""
    material: dict[str, object] = {"version": DEPS_VERSION, "base": base_digest}
    for name in ("requirements.txt", "cdsw-build.sh"):
        found = files.get(name)
        if found is None:
            material[name] = None
        elif found.data is None:
            material[name] = f"symlink in tree {tree}"
        else:
            material[name] = hashlib.sha256(found.data).hexdigest()
    material["pip"] = {k: v for k, v in sorted(env.items()) if k.startswith("PIP_")}
    return "sha256:" + hashlib.sha256(canonical_json(material)).hexdigest()


def build_environment(
    base_env: Mapping[str, str], project_env: Mapping[str, str], deadline: float
) -> dict[str, str]:
    """base image's Env < the project's < what makes every ``pip install`` land in the
    dependency prefix reproducibly (these must hold, so they win)."""
    path = base_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env = {**base_env, **project_env}
    env.update(
        {
            "PATH": f"{DEPS_PREFIX}/bin:{path}",
            "PYTHONUSERBASE": DEPS_PREFIX,
            "PIP_USER": "1",
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
            "PIP_NO_WARN_SCRIPT_LOCATION": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "PIP_PROGRESS_BAR": "off",
            "PIP_ROOT_USER_ACTION": "ignore",
            # Compiled .pyc files are hash-checked, not stamped with the install time.
            "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
            "PYTHONDONTWRITEBYTECODE": "1",
            # The sandbox's own backstop, after the builder's deadline: it matters only
            # when no builder is left to stop the install.
            "KILN_BUILD_DEADLINE": str(int(deadline) + DEADLINE_GRACE_SECONDS),
        }
    )
    return env


def install_spec(
    workload_id: str,
    work: Path,
    rootfs: Path,
    env: Mapping[str, str],
    limits: SandboxLimits,
    home_bytes: int,
) -> WorkloadSpec:
    """The sandbox of one install. ``work`` holds ``in/code.tar`` (read-only inside),
    ``out/deps.tar`` (the one writable host file) and an empty ``home`` (the runtime's
    project directory, hidden under a tmpfs)."""
    return WorkloadSpec(
        id=workload_id,
        project_dir=work / "home",
        command=("python3", SCRIPT_IN_SANDBOX),
        env=dict(env),
        cpu=limits.cpu,
        memory_bytes=limits.memory_bytes,
        pids_max=limits.pids_max,
        network=limits.network,
        log_max_bytes=limits.log_max_bytes,
        runtime_root=rootfs,
        readonly_binds=(
            (work / "in", "/kiln/in"),
            (Path(in_sandbox.__file__), SCRIPT_IN_SANDBOX),
        ),
        writable_binds=((work / "out" / "deps.tar", OUTPUT_IN_SANDBOX),),
        tmpfs=(
            (DEPS_PREFIX, limits.deps_max_bytes),
            ("/tmp", limits.tmp_bytes),  # noqa: S108  (the sandbox's own)
            ("/home/cdsw", home_bytes),
        ),
        max_file_bytes=limits.layer_max_bytes,
    )


def prepare_workdir(work: Path, code_tar: bytes) -> None:
    """Lay out ``work`` for ``install_spec`` (root-owned; the output file is handed to the
    workload uid by the runtime)."""
    for name in ("in", "out", "home"):
        (work / name).mkdir(mode=0o755 if name == "in" else 0o700, exist_ok=True)
    (work / "in" / "code.tar").write_bytes(code_tar)
    (work / "in" / "code.tar").chmod(0o644)
    out = work / "out" / "deps.tar"
    out.unlink(missing_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def run_install(
    runtime: WorkloadRuntime,
    spec: WorkloadSpec,
    *,
    deadline: float,
    log: Callable[[bytes], None],
    should_stop: Callable[[], bool],
    started: Callable[[str], None] = lambda _id: None,
    poll_seconds: float = 0.2,
) -> None:
    """Start the install, copy its output into the build log as it comes, and wait.
    ``InstallFailed`` when it fails, ``InstallStopped`` (after stopping it) when
    ``should_stop()`` says so or ``deadline`` passes. The workload is removed at the end."""
    runtime.start(spec)
    started(spec.id)
    offset = 0
    stopped = False
    try:
        while True:
            for chunk in runtime.logs(spec.id, since=offset):
                offset += len(chunk)
                log(chunk)
            status = runtime.status(spec.id)
            if not status.running:
                for chunk in runtime.logs(spec.id, since=offset):  # what came last
                    offset += len(chunk)
                    log(chunk)
                break
            if not stopped and (should_stop() or time.time() > deadline):
                runtime.stop(spec.id, grace=2)
                stopped = True
                continue
            time.sleep(poll_seconds)
        if stopped or time.time() > deadline:
            raise InstallStopped()
        if status.exit_code != 0:
            if status.reason == "oom":
                raise InstallFailed(
                    "the install ran out of memory (the build's memory limit counts the "
                    "installed files too); ask an admin for a larger build memory limit"
                )
            if status.log_truncated:
                log(b"\n[kiln: the install's output was longer than the log limit]\n")
            raise InstallFailed(
                f"the install failed (exit code {status.exit_code}); see the log above"
            )
    finally:
        with contextlib.suppress(WorkloadRuntimeError):
            if runtime.poll(spec.id) is None:  # an error of ours while it still runs
                runtime.stop(spec.id, grace=1)
        with contextlib.suppress(WorkloadRuntimeError):
            runtime.remove(spec.id)
