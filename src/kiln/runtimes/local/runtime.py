"""The ``local`` runtime: each workload is a process tree in a bubblewrap sandbox.

Per workload the runtime keeps a directory ``<state_dir>/<id>/`` (root, 0700):

- ``output.fifo`` — the workload's stdout+stderr. A keeper process (``sleep``) holds it open
  read-write, so the workload never gets SIGPIPE and its last output is not lost while no
  runner reads (a restart); the watcher drains it.
- ``output.log`` (+ ``output.log.truncated``) — the capped console log.
- ``status.json`` — written by bubblewrap itself when the command ends: the exit status
  survives a runner that was down at the time.
- ``result.json`` — the final status with its reason, once known.
- ``env.json`` — the environment, for ``exec`` (kept out of ``get_state``: it may hold tokens).
- ``slirp.sock``/``slirp.log`` — the user-mode network of the sandbox, if it has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kiln.runtimes.base import (
    Endpoint,
    ExitReason,
    RuntimeUnavailable,
    StartFailed,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadRuntime,
    WorkloadRuntimeError,
    WorkloadSpec,
    WorkloadStatus,
    register_runtime,
)
from kiln.runtimes.local import cgroups, proc, sandbox
from kiln.runtimes.local.builtin import prepare_python_env
from kiln.runtimes.local.exec import LocalExec, exec_env, make_env_fd
from kiln.runtimes.local.host import (
    Features,
    builtin_facts,
    probe_features,
    probe_user_namespaces,
    python_facts,
)
from kiln.runtimes.local.launch import (
    Host,
    Workload,
    abort,
    drain,
    launch,
    pids_in_namespace,
    read_status,
    stop_keeper,
    write_private,
)
from kiln.runtimes.local.logsink import CHUNK, LogSink
from kiln.runtimes.local.watcher import Watcher

log = logging.getLogger("kiln.runtimes.local")

DEFAULT_HOST_UID = 8536  # CML's `cdsw` uid; inside the sandbox it is uid 1000
STATE_VERSION = 1
_STATE_FIELDS = (
    "port", "working_dir", "outer_pid", "outer_start", "pid1", "pid1_start", "pidns",
    "cgroups", "slirp_pid", "slirp_start", "keeper_pid", "keeper_start", "host_port",
    "started_at", "port_forwards",
)  # fmt: skip
# Fields a workload started by an older runner may lack in its saved state.
_STATE_DEFAULTS: dict[str, Any] = {"port_forwards": []}


class NotRunning(WorkloadRuntimeError):
    """The workload has ended; there is nothing to exec into."""


@register_runtime("local")
class LocalRuntime(WorkloadRuntime):
    """See README.md in this package for the design and its pitfalls."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host_uid: int = DEFAULT_HOST_UID,
        host_gid: int | None = None,
        cgroup_parents: dict[str, Path] | None = None,
        use_cgroups: bool = True,
        features: Features | None = None,
    ) -> None:
        if host_uid == 0 or host_gid == 0:
            raise ValueError("workloads never run as host root: pick a non-zero host_uid")
        if os.geteuid() != 0:
            raise RuntimeUnavailable(
                "the local runtime must run as root: it stages mounts, writes cgroups and "
                "drops each workload to an unprivileged uid (rootless mode is not built yet)"
            )
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir.chmod(0o700)
        self.host_uid = host_uid
        self.host_gid = host_uid if host_gid is None else host_gid
        self.features = features or probe_features(cgroup_parents)
        if not use_cgroups:
            self.features.cgroups = cgroups.Cgroups(unavailable={"*": "disabled by config"})
            log.error("LOCAL RUNTIME: cgroups disabled by configuration; rlimits only")
        # The staging mount point (used only inside private mount namespaces) must exist.
        os.makedirs(sandbox.STAGE_DIR, mode=0o755, exist_ok=True)
        probe_user_namespaces(self.host_uid, self.host_gid)
        site = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        facts = builtin_facts()
        # The built-in runtime's bin/ and pyvenv.cfg (builtin.py); ".": never a workload id.
        python_env = prepare_python_env(
            self.state_dir / ".builtin-python", python_facts(), own_env=facts.kiln_env is None
        )
        facts = dataclasses.replace(facts, python_env=str(python_env))
        self._host = Host(self.features, facts, self.host_uid, self.host_gid, site)
        self._workloads: dict[str, Workload] = {}
        self._lock = threading.Lock()
        self._busy_cgroups: list[dict[str, str]] = []
        self._watcher = Watcher()
        self._watcher.every_second(self._flush_cgroups)

    # ----------------------------------------------------------------- start

    def start(self, spec: WorkloadSpec) -> Endpoint | None:
        spec.check()
        wdir = self.state_dir / spec.id
        with self._lock:
            if spec.id in self._workloads:
                raise WorkloadExists(f"workload {spec.id} exists")
            try:
                wdir.mkdir(mode=0o700)
            except FileExistsError:
                raise WorkloadExists(f"workload {spec.id} has state in {wdir}") from None
            rec = Workload(spec.id, wdir, LogSink(wdir / "output.log", spec.log_max_bytes))
            rec.port, rec.working_dir = spec.port, spec.working_dir
            self._workloads[spec.id] = rec
        try:
            launch(self._host, spec, rec)
        except BaseException as exc:
            abort(rec)
            with self._lock:
                self._workloads.pop(rec.id, None)
            if isinstance(exc, (WorkloadRuntimeError, ValueError)):
                raise
            raise StartFailed(f"cannot start the sandbox: {exc}") from exc
        self._watch(rec)
        rec.starting = False
        return rec.endpoint()

    # ----------------------------------------------------------- watching

    def _watch(self, rec: Workload) -> None:
        if rec.fifo_fd is not None:
            self._watcher.add(rec.fifo_fd, functools.partial(self._on_output, rec))
        if rec.pidfd is not None:
            self._watcher.add(rec.pidfd, functools.partial(self._on_exit, rec))

    def _on_output(self, rec: Workload, _fd: int) -> None:
        if rec.fifo_fd is None:
            return
        try:
            data = os.read(rec.fifo_fd, CHUNK)
        except BlockingIOError:
            return
        if data:
            rec.sink.feed(data)

    def _on_exit(self, rec: Workload, _fd: int) -> None:
        # bwrap's monitor exits with its command's status; status.json is preferred (it is
        # there for a re-attached runner too), this is the fallback.
        fallback = None
        if rec.popen is not None:
            returncode = rec.popen.poll()
            if returncode is not None:
                fallback = 128 - returncode if returncode < 0 else returncode
        else:
            raw = proc.reap(rec.outer_pid)
            fallback = None if raw is None else proc.shell_status(raw)
        drain(rec)
        self._finalize(rec, fallback)

    def _finalize(self, rec: Workload, fallback: int | None = None) -> None:
        """Record how the workload ended and release everything but its log."""
        code = read_status(rec.dir / "status.json")
        oom = cgroups.oom_kills(rec.cgroups)
        # If only the monitor died (someone killed it), take the sandbox down with it.
        proc.signal_checked(rec.pid1, rec.pid1_start, signal.SIGKILL)
        if rec.stop_flag.exists():
            reason, message = ExitReason.STOPPED, "stopped on request"
            code = code if code is not None else fallback
        elif code is None:
            code = fallback if fallback is not None else 255
            reason, message = ExitReason.LOST, "the sandbox ended without recording an exit status"
        elif oom and code != 0:
            reason = ExitReason.OUT_OF_MEMORY
            message = f"out of memory: the kernel killed {oom} process(es) over the memory limit"
        else:
            reason, message = ExitReason.EXITED, f"exited with status {code}"
        if code is None:
            code = 137
        rec.result = {
            "exit_code": code,
            "reason": str(reason),
            "message": message,
            "finished_at": time.time(),
        }
        write_private(rec.dir / "result.json", json.dumps(rec.result).encode())
        for fd in (rec.pidfd, rec.fifo_fd):
            if fd is not None:
                self._watcher.discard(fd)
        self._watcher.call_soon(lambda: self._close_fds(rec))
        rec.sink.finish()
        if rec.slirp_pid:
            proc.signal_checked(rec.slirp_pid, rec.slirp_start, signal.SIGKILL)
        stop_keeper(rec)
        self._release_cgroups(rec.cgroups)
        rec.done.set()
        self.notify_exit(rec.id)

    @staticmethod
    def _close_fds(rec: Workload) -> None:
        for name in ("pidfd", "fifo_fd"):
            fd = getattr(rec, name)
            if fd is not None:
                setattr(rec, name, None)
                os.close(fd)

    # ----------------------------------------------------------- queries

    def _get(self, workload_id: str) -> Workload:
        with self._lock:
            rec = self._workloads.get(workload_id)
        if rec is None:
            raise WorkloadNotFound(f"no workload {workload_id!r} in this runtime")
        return rec

    def status(self, workload_id: str) -> WorkloadStatus:
        rec = self._get(workload_id)
        result = rec.result
        return WorkloadStatus(
            id=rec.id,
            running=result is None,
            exit_code=None if result is None else result["exit_code"],
            reason=None if result is None else ExitReason(result["reason"]),
            message="starting" if rec.starting else ("" if result is None else result["message"]),
            endpoint=rec.endpoint() if result is None else None,
            port_endpoints=rec.port_endpoints() if result is None else {},
            started_at=rec.started_at,
            finished_at=None if result is None else result["finished_at"],
            log_bytes=rec.sink.size,
            log_truncated=rec.sink.truncated,
            memory_used_bytes=cgroups.memory_usage(rec.cgroups) if result is None else None,
        )

    def logs(self, workload_id: str, since: int = 0, follow: bool = False) -> Iterator[bytes]:
        return self._get(workload_id).sink.read(since, follow)

    def wait(self, workload_id: str, timeout: float | None = None) -> int | None:
        """Block until the workload ends (or ``timeout``); its exit status or None."""
        rec = self._get(workload_id)
        rec.done.wait(timeout)
        return self.poll(workload_id)

    # ------------------------------------------------------------- stop

    def stop(self, workload_id: str, grace: float = 10.0) -> None:
        rec = self._get(workload_id)
        if rec.done.is_set():
            return
        rec.stop_flag.touch(mode=0o600)
        # SIGTERM everything inside the sandbox but its init (which would take the rest down
        # without their chance to clean up), like `docker stop` does to a container.
        for pid in pids_in_namespace(rec.pidns) if rec.pidns else []:
            if pid != rec.pid1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        if rec.done.wait(grace):
            return
        log.info("workload %s ignored SIGTERM for %.1fs: SIGKILL", rec.id, grace)
        proc.signal_checked(rec.pid1, rec.pid1_start, signal.SIGKILL)
        if rec.done.wait(10):
            return
        if rec.pidfd is not None:
            proc.signal_pidfd(rec.pidfd, signal.SIGKILL)
        if not rec.done.wait(10):
            raise WorkloadRuntimeError(f"workload {rec.id} did not die after SIGKILL")

    # ------------------------------------------------------------- exec

    def exec(
        self,
        workload_id: str,
        argv: list[str],
        tty: bool = False,
        env: Mapping[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> LocalExec:
        rec = self._get(workload_id)
        if rec.result is not None or rec.starting or not proc.running(rec.pid1, rec.pid1_start):
            raise NotRunning(f"workload {workload_id} is not running")
        if not argv:
            raise ValueError("argv must not be empty")
        base = json.loads((rec.dir / "env.json").read_text())
        script = sandbox.env_script(exec_env(base, env, tty))
        env_fd = make_env_fd(script)
        host_argv = sandbox.exec_argv(
            rec.pid1, cgroups.procs_files(rec.cgroups), rec.working_dir, argv, tty
        )
        return LocalExec(host_argv, env_fd, tty, rows, cols)

    def append_log(self, workload_id: str, data: bytes) -> None:
        rec = self._get(workload_id)
        if data and rec.result is None:
            # The sink is written only from the watcher thread (no lock on the hot path).
            self._watcher.call_soon(functools.partial(rec.sink.feed, data))

    # ---------------------------------------------------- state / re-attach

    def get_state(self, workload_id: str) -> dict[str, Any]:
        rec = self._get(workload_id)
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "runtime": self.name,
            "id": rec.id,
            "dir": str(rec.dir),
            "log_path": str(rec.sink.path),
            "log_max_bytes": rec.sink.cap,
        }
        state.update({key: getattr(rec, key) for key in _STATE_FIELDS})
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("runtime") != self.name or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a local runtime state (version {STATE_VERSION}): {state!r}")
        wdir = Path(state["dir"])
        if wdir != self.state_dir / str(state["id"]):
            raise ValueError(f"state dir {wdir} is not this runtime's for {state['id']!r}")
        self._check_cgroup_paths(state["id"], state["cgroups"])
        if not wdir.is_dir():
            raise WorkloadNotFound(f"workload {state['id']}: its state {wdir} is gone")
        # Paths are derived, never taken from the state: it may not point root elsewhere.
        rec = Workload(state["id"], wdir, LogSink(wdir / "output.log", state["log_max_bytes"]))
        for key in _STATE_FIELDS:
            setattr(rec, key, state[key] if key in state else _STATE_DEFAULTS[key])
        rec.starting = False
        with self._lock:
            if rec.id in self._workloads:
                rec.sink.finish()
                raise WorkloadExists(f"workload {rec.id} is already attached")
            self._workloads[rec.id] = rec
        result_path = wdir / "result.json"
        if result_path.exists():
            rec.result = json.loads(result_path.read_text())
            rec.sink.finish()
            rec.done.set()
            return
        rec.fifo_fd = os.open(wdir / "output.fifo", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        rec.pidfd = proc.open_pidfd(rec.outer_pid, rec.outer_start)
        if rec.pidfd is None:  # it ended while nobody was watching
            proc.reap(rec.outer_pid)
            drain(rec)
            self._finalize(rec)
            return
        self._watch(rec)

    def list_workloads(self) -> list[str]:
        with self._lock:
            return sorted(self._workloads)

    def _check_cgroup_paths(self, workload_id: str, paths: Mapping[str, str]) -> None:
        # The runner may come back in another cgroup of its own, so the parent may differ;
        # the workload's own directory name may not.
        for path in map(Path, paths.values()):
            if (
                not str(path).startswith("/sys/fs/cgroup/")
                or ".." in path.parts
                or path.parent.name != "kiln"
                or path.name != f"{workload_id}-{self._host.site}"
            ):
                raise ValueError(f"cgroup {path} in the state is not this workload's")

    def remove(self, workload_id: str) -> None:
        rec = self._get(workload_id)
        # Its exit status is published a moment before the clean-up after it is finished.
        if rec.result is None or not rec.done.wait(30):
            raise WorkloadRuntimeError(f"workload {workload_id} is still running; stop it first")
        self._release_cgroups(rec.cgroups)
        shutil.rmtree(rec.dir, ignore_errors=True)
        with self._lock:
            self._workloads.pop(workload_id, None)

    def close(self) -> None:
        """Stop watching. Workloads keep running and can be re-attached with ``load_state``."""
        self._watcher.close()
        with self._lock:
            records = list(self._workloads.values())
            self._workloads.clear()
        for rec in records:
            self._close_fds(rec)
            rec.sink.finish()
        self._flush_cgroups(timeout=10)
        self.features.cgroups.remove_parents()

    def _release_cgroups(self, paths: dict[str, str]) -> None:
        """Remove a finished workload's cgroups, now or soon: they stay busy while the
        sandbox's last zombie waits for the host's init to reap it (seconds, on some hosts)."""
        if paths and not cgroups.remove(paths):
            with self._lock:
                self._busy_cgroups.append(dict(paths))

    def _flush_cgroups(self, timeout: float = 0.0) -> None:
        with self._lock:
            pending, self._busy_cgroups = self._busy_cgroups, []
        left = [p for p in pending if not cgroups.remove(p, wait=timeout)]
        if left and timeout:
            log.warning("cgroups still busy, left behind: %s", left)
        with self._lock:
            self._busy_cgroups.extend(left)
