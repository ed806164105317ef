"""The dependency step as a pod, where workloads are pods (the ``kubernetes`` runtime).

A Pod Security ``restricted`` pod cannot create the user namespace bubblewrap needs, and a
pod can be bound nothing from the builder's disk. So in a cluster the install runs in a pod
of the build's *base image* in the tenant's namespace (the same quota, NetworkPolicy and
compute pool as the tenant's other workloads), as the workload uid, with a read-only root
and the same three size-capped memory-backed scratch directories as the local sandbox
(``/opt/kiln/deps``, ``/tmp``, ``/home/cdsw``). What crosses goes through the API server:

1. the pod starts ``kiln-build.py hold`` (it only keeps the pod up);
2. ``exec unpack``: the snapshot is written to its stdin, a stream;
3. ``exec install``: ``cdsw-build.sh`` or ``pip install``, its output copied into the build
   log as it comes; its exit status is the step's;
4. ``exec layer``: the deterministic tar of ``/opt/kiln/deps`` read from its stdout into the
   builder's work directory, **capped here**: a pod that sends more fails the build and
   nothing more is read.

The pod holds no credential (no service-account token; the pull secret is the kubelet's),
and Kiln only stores, hashes and compresses the bytes it reads, as with the local sandbox.
The pod is deleted at the end, whatever happened; a builder that dies mid-build leaves a
pod that ends itself at the build's deadline, and the next builder's recovery deletes it
(its runtime state is recorded like a sandbox's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kiln.build import in_sandbox
from kiln.build.deps import (
    DEPS_PREFIX,
    SCRIPT_IN_SANDBOX,
    InstallFailed,
    InstallStopped,
    SandboxLimits,
)
from kiln.runtimes.base import (
    ExecProcess,
    ExitReason,
    Placement,
    WorkloadRuntime,
    WorkloadRuntimeError,
    WorkloadSpec,
)

STDIN_CHUNK = 256 * 1024
READ_WAIT = 0.2  # seconds between checks for a stop while the install prints nothing
STEP_TIMEOUT = 120.0  # unpacking and reading the layer: data moves, or something is wrong
OOM_EXIT = 137  # SIGKILL: what the kernel's OOM killer sends


@dataclass(frozen=True)
class PodTarget:
    """Where a build's install pod runs: the tenant whose namespace (and quota) it uses,
    and the registry host the nodes pull the base image from (``""``: its reference as is)."""

    tenant_kind: str
    tenant: str
    project_id: int
    registry: str = ""

    def placement(self, repository: str, digest: str) -> Placement:
        image = f"{repository}@{digest}"
        if self.registry:
            image = f"{self.registry}/{image}"
        return Placement(self.tenant_kind, self.tenant, self.project_id, "build", image)


def install_pod_spec(
    workload_id: str,
    empty_dir: Path,
    env: Mapping[str, str],
    limits: SandboxLimits,
    home_bytes: int,
    placement: Placement,
) -> WorkloadSpec:
    """The install pod: no project volume (its /home/cdsw is the snapshot, unpacked into
    scratch space), the step script shown read-only, nothing else. ``empty_dir``: an empty
    directory of the builder's, named as the project directory only because a workload
    must name one (no project is mounted: a runtime that mounts it anyway hides it)."""
    return WorkloadSpec(
        id=workload_id,
        project_dir=empty_dir,
        command=("python3", SCRIPT_IN_SANDBOX, "hold"),
        env=dict(env),
        cpu=limits.cpu,
        memory_bytes=limits.memory_bytes,
        pids_max=limits.pids_max,
        network=limits.network,
        log_max_bytes=64 * 1024,  # the holder prints nothing; the steps' output is exec's
        readonly_binds=((Path(in_sandbox.__file__), SCRIPT_IN_SANDBOX),),
        tmpfs=(
            (DEPS_PREFIX, limits.deps_max_bytes),
            ("/tmp", limits.tmp_bytes),  # noqa: S108  (the pod's own)
            ("/home/cdsw", home_bytes),
        ),
        project_mount=False,
        placement=placement,
    )


@dataclass
class _Watch:
    """When to give up on a step: the build's deadline and its stop request."""

    deadline: float
    should_stop: Callable[[], bool]

    def over(self) -> bool:
        return time.time() > self.deadline or self.should_stop()


def _step(runtime: WorkloadRuntime, workload_id: str, name: str) -> ExecProcess:
    try:
        return runtime.exec(workload_id, ["python3", SCRIPT_IN_SANDBOX, name])
    except WorkloadRuntimeError:
        raise
    except Exception as exc:  # the API server's or the connection's refusal, in its words
        raise WorkloadRuntimeError(f"exec {name}: {exc}") from None


def _copy_output(
    process: ExecProcess, log: Callable[[bytes], None], watch: _Watch, limit: float | None = None
) -> int:
    """Copy the process's output to ``log`` until it exits; its exit status.
    ``InstallStopped`` (after killing it) when ``watch`` says to stop; ``InstallFailed``
    when it runs longer than ``limit`` seconds."""
    give_up = None if limit is None else time.monotonic() + limit
    while True:
        try:
            chunk = process.read(timeout=READ_WAIT)
        except TimeoutError:
            chunk = None
        if chunk:
            log(chunk)
        elif chunk == b"":
            return process.wait(timeout=30)
        if watch.over():
            process.kill()
            raise InstallStopped()
        if give_up is not None and time.monotonic() > give_up:
            process.kill()
            raise InstallFailed(f"the build pod did not unpack the project within {limit:.0f} s")


def _unpack(
    runtime: WorkloadRuntime,
    workload_id: str,
    code_tar: bytes,
    log: Callable[[bytes], None],
    watch: _Watch,
) -> None:
    with _step(runtime, workload_id, "unpack") as process:
        view = memoryview(code_tar)
        for start in range(0, len(view), STDIN_CHUNK):
            process.write(bytes(view[start : start + STDIN_CHUNK]))
        process.close_stdin()
        if _copy_output(process, log, watch, STEP_TIMEOUT) != 0:
            raise InstallFailed("the build pod could not unpack the project (see the log)")


def _install(
    runtime: WorkloadRuntime, workload_id: str, log: Callable[[bytes], None], watch: _Watch
) -> None:
    with _step(runtime, workload_id, "install") as process:
        code = _copy_output(process, log, watch)
    if code == OOM_EXIT:
        raise InstallFailed(
            "the install was killed (exit code 137), most likely for running out of memory "
            "(the build's memory limit counts the installed files too); ask an admin for a "
            "larger build memory limit"
        )
    if code != 0:
        raise InstallFailed(f"the install failed (exit code {code}); see the log above")


def _read_layer(
    runtime: WorkloadRuntime, workload_id: str, out: Path, max_bytes: int, watch: _Watch
) -> None:
    """The layer's bytes into ``out``, at most ``max_bytes`` (nothing more is read)."""
    written = 0
    give_up = time.monotonic() + STEP_TIMEOUT
    with _step(runtime, workload_id, "layer") as process, out.open("wb") as f:
        while True:
            try:
                chunk = process.read(1024 * 1024, timeout=READ_WAIT)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                written += len(chunk)
                if written > max_bytes:
                    process.kill()
                    raise InstallFailed(
                        f"the dependency layer is too large: over {max_bytes / 1024**2:.0f} MiB"
                    )
                f.write(chunk)
                give_up = time.monotonic() + STEP_TIMEOUT  # it moves: more time
            elif watch.over():
                process.kill()
                raise InstallStopped()
            elif time.monotonic() > give_up:
                process.kill()
                raise InstallFailed("the build pod stopped sending the dependency layer")
        code = process.wait(timeout=30)
    if code != 0:
        raise InstallFailed(f"the build pod could not write the dependency layer ({code})")


def _pod_failure(runtime: WorkloadRuntime, workload_id: str, error: Exception) -> InstallFailed:
    """Why a step could not reach the pod, in the pod's own terms where it ended."""
    with contextlib.suppress(WorkloadRuntimeError):
        status = runtime.status(workload_id)
        if not status.running and status.reason == ExitReason.OUT_OF_MEMORY:
            return InstallFailed(
                "the build pod ran out of memory (the build's memory limit counts the "
                "installed files too); ask an admin for a larger build memory limit"
            )
        if not status.running:
            detail = status.message or f"exit code {status.exit_code}"
            return InstallFailed(f"the build pod ended ({detail})")
    return InstallFailed(f"the build pod failed: {error}")


def run_pod_install(
    runtime: WorkloadRuntime,
    spec: WorkloadSpec,
    code_tar: bytes,
    out: Path,
    *,
    max_layer_bytes: int,
    deadline: float,
    log: Callable[[bytes], None],
    should_stop: Callable[[], bool],
    started: Callable[[str], None] = lambda _id: None,
) -> None:
    """Start the pod, run the three steps in it, leave the layer's tar at ``out``.
    ``InstallFailed`` (with the reason) or ``InstallStopped``, as ``deps.run_install``;
    ``StartFailed`` with Kubernetes' reason when the pod cannot start. The pod is removed
    at the end."""
    watch = _Watch(deadline, should_stop)
    runtime.start(spec)
    try:
        started(spec.id)
        _unpack(runtime, spec.id, code_tar, log, watch)
        _install(runtime, spec.id, log, watch)
        _read_layer(runtime, spec.id, out, max_layer_bytes, watch)
    except WorkloadRuntimeError as exc:
        if watch.over():
            raise InstallStopped() from None
        raise _pod_failure(runtime, spec.id, exc) from None
    finally:
        with contextlib.suppress(WorkloadRuntimeError):
            runtime.stop(spec.id, grace=1)
        with contextlib.suppress(WorkloadRuntimeError):
            runtime.remove(spec.id)
