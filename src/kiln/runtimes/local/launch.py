"""Creating one sandbox: the I/O half of the local runtime's ``start``.

The pure half — mounts, argument lists, firewall rules, limits — is in ``sandbox.py``; the
long-lived half (watching, stopping, re-attaching) is in ``runtime.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtimes.base import SANDBOX_HOME, Endpoint, StartFailed, WorkloadSpec
from kiln.runtimes.local import cgroups, network, proc, sandbox
from kiln.runtimes.local.exec import HOST_ENV, make_env_fd
from kiln.runtimes.local.host import Features, host_addresses, reachable, rootfs_facts
from kiln.runtimes.local.logsink import CHUNK, LogSink
from kiln.runtimes.local.ownership import adopt_tree

log = logging.getLogger("kiln.runtimes.local")

PIPE_BYTES = 1024 * 1024  # output buffered in the kernel while no runner reads it


@dataclass(frozen=True)
class Host:
    """What a launch needs to know about this machine and this runtime's configuration."""

    features: Features
    facts: sandbox.HostFacts
    uid: int
    gid: int
    site: str  # short, stable tag of this runtime's state directory


@dataclass
class Workload:
    id: str
    dir: Path
    sink: LogSink
    port: int | None = None
    working_dir: str = sandbox.SANDBOX_HOME
    outer_pid: int = 0  # the bwrap monitor (our child, unless re-attached)
    outer_start: int | None = None
    pid1: int = 0  # the sandbox's init
    pid1_start: int | None = None
    pidns: int = 0  # inode of the sandbox's pid namespace
    cgroups: dict[str, str] = field(default_factory=dict)
    slirp_pid: int | None = None
    slirp_start: int | None = None
    keeper_pid: int | None = None  # holds the output pipe open (see start_keeper)
    keeper_start: int | None = None
    keeper: subprocess.Popen[bytes] | None = None
    host_port: int | None = None
    # The extra declared ports: [guest port, host port] pairs (a list: the state is JSON).
    port_forwards: list[list[int]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    result: dict[str, Any] | None = None
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    fifo_fd: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    starting: bool = True

    @property
    def stop_flag(self) -> Path:
        return self.dir / "stop-requested"

    def endpoint(self) -> Endpoint | None:
        return Endpoint("127.0.0.1", self.host_port) if self.host_port else None

    def port_endpoints(self) -> dict[int, Endpoint]:
        found = {guest: Endpoint("127.0.0.1", host) for guest, host in self.port_forwards}
        if self.port and self.host_port:
            found[self.port] = Endpoint("127.0.0.1", self.host_port)
        return found


def read_status(path: Path) -> int | None:
    """bubblewrap's --json-status-fd file: several JSON documents; the last has exit-code."""
    try:
        text = path.read_text()
    except OSError:
        return None
    decoder, pos, code = json.JSONDecoder(), 0, None
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        if isinstance(doc, dict) and isinstance(doc.get("exit-code"), int):
            code = doc["exit-code"]
    return code


def pids_in_namespace(pidns: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}/ns/pid").st_ino == pidns:
                    found.append(int(name))
    return found


def write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)  # no fsync: a crash of the machine ends the workload anyway
    finally:
        os.close(fd)
    os.replace(tmp, path)


def image_home_dir(root: Path) -> str:
    """The image's ``home/cdsw`` as a bind source: real directories all the way (a symlink
    there would have bubblewrap bind whatever host path it names), else ``StartFailed``."""
    path = root
    for part in SANDBOX_HOME.strip("/").split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise StartFailed(f"the image has no {SANDBOX_HOME} (its code layer)") from None
        if not stat.S_ISDIR(mode):
            raise StartFailed(f"the image's /{path.relative_to(root)} is not a directory")
    return str(path)


def launch(host: Host, spec: WorkloadSpec, rec: Workload) -> None:
    """Create the sandbox for ``spec`` and fill in ``rec``; on failure the caller aborts."""
    policy = spec.network
    ports = [p for p in (spec.port, *spec.extra_ports) if p is not None]
    wants_net = bool(ports) or policy.wants_network
    if wants_net and not host.features.network:
        raise StartFailed(
            "this host cannot give workloads a network ("
            + "; ".join(host.features.notes)
            + "): start it without a port and with egress off"
        )
    if not spec.project_dir.is_dir():
        raise StartFailed(f"project directory {spec.project_dir} does not exist")
    var_tmp = None
    if spec.runtime_root is not None:
        facts = rootfs_facts(spec.runtime_root)
        root = sandbox.rootfs_mounts(facts)
        roots, path_dirs = [facts.path], []
        var_tmp = facts.var_entries.get("tmp")
    else:
        builtin = host.facts
        root = sandbox.builtin_mounts(builtin)
        roots = [*builtin.python_prefixes, *filter(None, [builtin.kiln_env, builtin.python_env])]
        path_dirs = sandbox.path_dirs_for(builtin)
    image_home = None
    if not spec.project_mount and spec.runtime_root is not None and not spec.home_is_scratch:
        image_home = image_home_dir(spec.runtime_root)
    files = sandbox.generated_files(spec, egress=policy.egress)
    mounts = sandbox.workload_mounts(spec, root, files, var_tmp, image_home)
    binds = (*spec.readonly_binds, *spec.writable_binds)
    roots += [str(spec.project_dir), *(str(src) for src, _ in binds)]
    hidden = [r for r in roots if not reachable(r, host.uid, host.gid)]
    staged, mounts = sandbox.plan_staging(mounts, hidden)
    # Kiln keeps project trees owned by the workload uid (the file API hands over what it
    # writes; server-side git runs as that uid). A tree whose top is not (made outside Kiln,
    # or by an older version) is handed over whole, once.
    if os.lstat(spec.project_dir).st_uid != host.uid:
        adopt_tree(spec.project_dir, host.uid, host.gid)
    for source, _ in spec.writable_binds:
        if source.is_dir():
            adopt_tree(source, host.uid, host.gid)
        else:  # a single file (never through a symlink)
            os.chown(source, host.uid, host.gid, follow_symlinks=False)
    env = sandbox.base_env(spec, path_dirs)
    write_private(rec.dir / "env.json", json.dumps(env).encode())

    # Two Kiln sites on one host may both run a workload "session-1": suffix the site.
    cgroup_name = f"{spec.id}-{host.site}"
    rec.cgroups = host.features.cgroups.create(cgroup_name, sandbox.cgroup_limits(spec))
    rlimits = _fallback_rlimits(host, spec)

    fifo = rec.dir / "output.fifo"
    os.mkfifo(fifo, 0o600)
    child_fds: list[int] = []  # handed to the launcher, closed here after the spawn
    to_close: list[int] = []
    try:
        rec.fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        out_w = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        to_close.append(out_w)
        with contextlib.suppress(OSError):
            fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        start_keeper(rec, fifo)
        status_fd = os.open(rec.dir / "status.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        child_fds.append(status_fd)
        info_r, info_w = os.pipe()
        child_fds.append(info_w)
        block_r = block_w = slirp_exit_r = slirp_exit_w = -1
        if wants_net:
            block_r, block_w = os.pipe()
            slirp_exit_r, slirp_exit_w = os.pipe()
            child_fds += [block_r, slirp_exit_w]
        data_fds = {}
        for dest, content in files.items():
            data_fds[dest] = make_env_fd(content)
            child_fds.append(data_fds[dest])
        fds = sandbox.SandboxFds(info_w, status_fd, data_fds, block_r if wants_net else None)
        args = sandbox.bwrap_args(spec, mounts, fds, env)
        args_fd = make_env_fd(b"".join(a.encode() + b"\0" for a in args))
        child_fds.append(args_fd)
        argv = sandbox.launcher_argv(
            cgroups.procs_files(rec.cgroups), staged, host.uid, host.gid, args_fd,
            spec.command, rlimits,
        )  # fmt: skip
        rec.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            pass_fds=tuple(child_fds),
            start_new_session=True,  # a runner killed with its process group spares it
            env=HOST_ENV,
        )
        rec.outer_pid = rec.popen.pid
        rec.outer_start = proc.start_time(rec.outer_pid)
        rec.pidfd = os.pidfd_open(rec.outer_pid)
    finally:
        for fd in child_fds + to_close:
            os.close(fd)
    try:
        info = _read_info(info_r, rec)
    finally:
        os.close(info_r)
    rec.pid1, rec.pidns = info["child-pid"], info.get("pid-namespace", 0)
    rec.pid1_start = proc.start_time(rec.pid1)
    if wants_net:
        try:
            _wait_for_setup(rec)
            slirp = network.start_slirp(
                rec.pid1,
                rec.dir / "slirp.sock",
                rec.dir / "slirp.log",
                slirp_exit_r,
                host_loopback=bool(policy.host_ports),
            )
            rec.slirp_pid, rec.slirp_start = slirp.pid, proc.start_time(slirp.pid)
            network.apply_ruleset(rec.pid1, sandbox.egress_ruleset(policy, host_addresses()))
            if ports:
                network.reach_loopback(rec.pid1, ports)
            if spec.port is not None:
                rec.host_port = network.forward_port(rec.dir / "slirp.sock", spec.port)
            for guest in spec.extra_ports:
                forwarded = network.forward_port(rec.dir / "slirp.sock", guest)
                rec.port_forwards.append([guest, forwarded])
            os.write(block_w, b"go")
        except StartFailed as exc:
            if rec.popen.poll() is not None:  # the sandbox itself died: say why
                output = drain(rec, keep=False).decode(errors="replace").strip()
                raise StartFailed(f"the sandbox failed during setup: {output}") from exc
            raise
        finally:
            os.close(slirp_exit_r)
            os.close(block_w)
    _wait_for_command(rec)


def _wait_for_setup(rec: Workload, timeout: float = 30.0) -> None:
    """With ``--block-fd`` bubblewrap finishes its setup (its own netlink talk to bring up
    the loopback included) and drops its capabilities just before it blocks. slirp4netns
    configuring the same namespace concurrently makes that setup fail, so wait for the drop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{rec.pid1}/status").read_text()
        except OSError:
            return  # it died; the caller finds out why
        if int(status.split("CapEff:")[1].split()[0], 16) == 0:
            return
        time.sleep(0.001)
    raise StartFailed(f"the sandbox did not finish its setup within {timeout:.0f}s")


def _wait_for_command(rec: Workload, timeout: float = 30.0) -> None:
    """bubblewrap reports its init before it has built the root filesystem; the command
    is forked once that is done. Wait for it, so that ``start`` returning means "the
    command runs" (and ``exec`` finds the finished filesystem)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.children(rec.pid1) or not proc.running(rec.pid1, rec.pid1_start):
            return
        time.sleep(0.002)
    raise StartFailed(f"the sandbox's command did not start within {timeout:.0f}s")


def start_keeper(rec: Workload, fifo: Path) -> None:
    """A process that only holds the output pipe open. Without it, output written while
    no runner reads — by a workload that then ends — would vanish with the last open
    descriptor, and a workload would get SIGPIPE while its runner restarts."""
    keep = os.open(fifo, os.O_RDWR)
    try:
        rec.keeper = subprocess.Popen(
            ["sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(keep,),
            start_new_session=True,
            env=HOST_ENV,
        )
    finally:
        os.close(keep)
    rec.keeper_pid, rec.keeper_start = rec.keeper.pid, proc.start_time(rec.keeper.pid)


def stop_keeper(rec: Workload) -> None:
    if rec.keeper_pid:
        proc.signal_checked(rec.keeper_pid, rec.keeper_start, signal.SIGKILL)
    if rec.keeper is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.keeper.wait(5)
    else:
        proc.reap(rec.keeper_pid or 0)


def _read_info(info_r: int, rec: Workload) -> dict[str, Any]:
    """bubblewrap reports the sandbox's init pid once its namespaces exist. If it never
    does, the sandbox failed: its error is in the output pipe."""
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        readable, _, _ = select.select([info_r], [], [], 0.5)
        if readable:
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
            with contextlib.suppress(ValueError):
                info: dict[str, Any] = json.loads(data)
                return info
    assert rec.popen is not None
    with contextlib.suppress(subprocess.TimeoutExpired):
        rec.popen.wait(5)
    detail = drain(rec, keep=False).decode(errors="replace").strip()
    raise StartFailed(f"the sandbox did not start: {detail or 'no error output'}")


def _fallback_rlimits(host: Host, spec: WorkloadSpec) -> sandbox.Rlimits | None:
    """The spec's file size limit, plus rlimits standing in for missing cgroups."""
    have = set(host.features.cgroups.parents)
    memory = None if "memory" in have else spec.memory_bytes
    nproc = None if "pids" in have else spec.pids_max
    if memory or nproc:
        log.warning(
            "workload %s: rlimits instead of cgroups (address space %s, nproc %s)",
            spec.id, memory, nproc,
        )  # fmt: skip
    limits = sandbox.Rlimits(memory, nproc, spec.max_file_bytes)
    return limits if limits.any else None


def drain(rec: Workload, keep: bool = True) -> bytes:
    """Read whatever is left in the output pipe (after the workload exited)."""
    got = b""
    while rec.fifo_fd is not None:
        try:
            data = os.read(rec.fifo_fd, CHUNK)
        except BlockingIOError:
            break
        if not data:
            break
        if keep:
            rec.sink.feed(data)
        elif len(got) < 65536:
            got += data
    return got


def abort(rec: Workload) -> None:
    """Undo a start that failed half-way; nothing of it may survive."""
    if rec.pid1:
        proc.signal_checked(rec.pid1, rec.pid1_start, signal.SIGKILL)
    if rec.popen is not None:
        with contextlib.suppress(ProcessLookupError):
            rec.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.popen.wait(10)
    if rec.slirp_pid:
        proc.signal_checked(rec.slirp_pid, rec.slirp_start, signal.SIGKILL)
    stop_keeper(rec)
    for fd in (rec.pidfd, rec.fifo_fd):
        if fd is not None:
            os.close(fd)
    rec.sink.finish()
    cgroups.remove(rec.cgroups, wait=5)
    shutil.rmtree(rec.dir, ignore_errors=True)
