"""Pure builders for the local runtime: mounts, the bubblewrap argument list, the launcher,
the egress firewall, cgroup limits. No I/O here: ``launch.py`` does it in one place.

How a workload is started (see README.md for why each step exists)::

    unshare --mount --propagation private       # root, private mount namespace
      sh -c LAUNCHER                            # join cgroups; stage hidden bind sources
        setpriv --reuid=HOST_UID ... --         # drop to the unprivileged host uid
          bwrap --args FD                       # user+pid+net+ipc+uts+cgroup namespaces, uid 1000
            COMMAND
"""

from __future__ import annotations

import ipaddress
import posixpath
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from kiln.runtimes.base import SANDBOX_HOME, TOOL_STATE_ENV, NetworkPolicy, WorkloadSpec
from kiln.runtimes.catalog import KILN_ENV_DIR
from kiln.runtimes.local.builtin import BUILTIN_PATH_DIRS

SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "cdsw"
STAGE_DIR = "/run/kiln-stage"
# Host trees the built-in runtime binds anyway (a Python under them needs no bind of its own).
PUBLIC_ROOTS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# /etc entries the built-in runtime shows (read-only). Never shadow, sudoers, ssh keys, ...
ETC_ALLOWED = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pip.conf",
    "profile",
    "profile.d",
    "protocols",
    "python3",  # and any python3.X: see _etc_allowed
    "services",
    "shells",
    "ssl",
    "terminfo",
    "timezone",
    "xdg",
)
GENERATED_ETC = ("passwd", "group", "hosts", "hostname", "resolv.conf", "profile")
# A login shell (a terminal: ``bash -l``, JupyterLab's terminals) reads /etc/profile, and the
# usual one sets PATH back to the system's default: the runtime's Python would vanish from a
# terminal while jobs still see it. This one keeps the workload's environment as it is and
# does the rest of the usual work.
LOGIN_PROFILE = """\
# /etc/profile of a Kiln sandbox: PATH and the rest of the environment are the workload's
# (the same in terminals, jobs and workers), so this file leaves them as they are.
if [ "${PS1-}" ] && [ "${BASH-}" ] && [ "$BASH" != /bin/sh ] && [ -r /etc/bash.bashrc ]; then
  . /etc/bash.bashrc
fi
if [ -d /etc/profile.d ]; then
  for i in /etc/profile.d/*.sh; do
    if [ -r "$i" ]; then . "$i"; fi
  done
  unset i
fi
"""
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"
SLIRP_GUEST = "10.0.2.100"

MountKind = Literal["ro-bind", "bind", "symlink", "dir", "tmpfs", "data"]


@dataclass(frozen=True)
class Mount:
    """One bubblewrap filesystem operation. ``source`` is a host path (binds), a link target
    (symlink) or a key into the generated files (data)."""

    kind: MountKind
    dest: str
    source: str = ""
    size: int | None = None  # tmpfs only: its size limit in bytes


@dataclass(frozen=True)
class HostFacts:
    """What the built-in runtime needs to know about the host (``host.builtin_facts``)."""

    top_level: Mapping[str, str]  # name in / → "dir" | "file" | "symlink:<target>"
    etc_entries: frozenset[str]  # names present in /etc
    python_prefixes: tuple[str, ...]  # sys.base_prefix and friends
    kiln_env: str | None = None  # the virtual environment Kiln runs from (sys.prefix)
    # The runtime's own bin/ and pyvenv.cfg for /opt/kiln (``builtin.prepare_python_env``).
    python_env: str | None = None


@dataclass(frozen=True)
class RootfsFacts:
    """Listing of an unpacked OCI root filesystem (top level and its /etc)."""

    path: str
    top_level: Mapping[str, str]
    etc_entries: Mapping[str, str] = field(default_factory=dict)
    var_entries: Mapping[str, str] = field(default_factory=dict)  # its /var, if a directory


def hostname_for(workload_id: str) -> str:
    return workload_id.replace("_", "-").replace(".", "-")[:63].strip("-") or "kiln"


def base_env(spec: WorkloadSpec, path_dirs: Sequence[str]) -> dict[str, str]:
    """Environment every workload gets; ``spec.env`` wins over these."""
    env = {
        "HOME": SANDBOX_HOME,
        "USER": SANDBOX_USER,
        "LOGNAME": SANDBOX_USER,
        "SHELL": "/bin/bash",
        "PATH": ":".join([*path_dirs, "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "HOSTNAME": hostname_for(spec.id),
        "TMPDIR": "/tmp",  # noqa: S108  (the sandbox's private tmpfs)
        # Console output is a pipe; without this Python buffers it and "live logs" lag.
        "PYTHONUNBUFFERED": "1",
        **TOOL_STATE_ENV,
    }
    env.update(spec.env)
    return env


def generated_files(spec: WorkloadSpec, egress: bool) -> dict[str, bytes]:
    """Small /etc files written for each sandbox (bound read-only from memory)."""
    hostname = hostname_for(spec.id)
    files = {
        "/etc/passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:Kiln workload:{SANDBOX_HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "/etc/group": f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "/etc/hostname": f"{hostname}\n",
        "/etc/hosts": f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {hostname}\n",
        "/etc/profile": LOGIN_PROFILE,
    }
    if egress:
        files["/etc/resolv.conf"] = f"nameserver {SLIRP_DNS}\n"
    return {k: v.encode() for k, v in files.items()}


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _top_level_mounts(
    top: Mapping[str, str], source_root: str, names: Iterable[str]
) -> list[Mount]:
    mounts = []
    for name in names:
        kind = top.get(name)
        if kind is None:
            continue
        if kind.startswith("symlink:"):
            mounts.append(Mount("symlink", f"/{name}", kind.removeprefix("symlink:")))
        elif kind == "dir":
            mounts.append(Mount("ro-bind", f"/{name}", posixpath.join(source_root, name)))
    return mounts


def builtin_mounts(facts: HostFacts) -> list[Mount]:
    """The built-in runtime: the host's /usr (and /bin, /lib* links) and its Python, read-only,
    plus a short list of harmless /etc files."""
    mounts = _top_level_mounts(facts.top_level, "/", SYSTEM_TOP)
    for name in sorted(facts.etc_entries):
        if (name in ETC_ALLOWED or name.startswith("python3.")) and name not in GENERATED_ETC:
            mounts.append(Mount("ro-bind", f"/etc/{name}", f"/etc/{name}"))
    seen: list[str] = []
    for prefix in sorted(set(facts.python_prefixes), key=len):
        if any(_is_under(prefix, r) for r in PUBLIC_ROOTS) or any(
            _is_under(prefix, s) for s in seen
        ):
            continue
        seen.append(prefix)
        mounts.append(Mount("ro-bind", prefix, prefix))
    # /opt/kiln: Kiln's environment with the runtime's bin/ and pyvenv.cfg over it, or the
    # runtime's own environment when Kiln runs from none (see builtin.py).
    if facts.kiln_env:
        mounts.append(Mount("ro-bind", KILN_ENV_DIR, facts.kiln_env))
        if facts.python_env:
            for name in ("bin", "pyvenv.cfg"):
                source = posixpath.join(facts.python_env, name)
                mounts.append(Mount("ro-bind", f"{KILN_ENV_DIR}/{name}", source))
    elif facts.python_env:
        mounts.append(Mount("ro-bind", KILN_ENV_DIR, facts.python_env))
    return mounts


def rootfs_mounts(rootfs: RootfsFacts) -> list[Mount]:
    """An unpacked OCI image: every top-level entry read-only, /etc entry by entry so that the
    generated files can sit beside the image's own."""
    skip = {"proc", "dev", "sys", "tmp", "home", "run", "etc"}
    names = sorted(n for n in rootfs.top_level if n not in skip)
    mounts = []
    for name in names:
        kind = rootfs.top_level[name]
        if kind.startswith("symlink:"):
            mounts.append(Mount("symlink", f"/{name}", kind.removeprefix("symlink:")))
        elif kind in ("dir", "file"):
            mounts.append(Mount("ro-bind", f"/{name}", posixpath.join(rootfs.path, name)))
    for name, kind in sorted(rootfs.etc_entries.items()):
        if name in GENERATED_ETC:
            continue
        if kind.startswith("symlink:"):
            mounts.append(Mount("symlink", f"/etc/{name}", kind.removeprefix("symlink:")))
        elif kind in ("dir", "file"):
            mounts.append(
                Mount("ro-bind", f"/etc/{name}", posixpath.join(rootfs.path, "etc", name))
            )
    return mounts


def workload_mounts(
    spec: WorkloadSpec,
    root: list[Mount],
    files: Mapping[str, bytes],
    var_tmp: str | None = None,
    image_home: str | None = None,
) -> list[Mount]:
    """Root filesystem + generated files + the writable project + private /tmp.

    ``var_tmp`` is what the root has at /var/tmp (``RootfsFacts.var_entries``): nothing (a
    link to /tmp is made), a directory (a private tmpfs goes on it: programs expect to
    write there), or anything else (left as the image has it). ``image_home``: the image's
    own /home/cdsw (``spec.project_mount`` False), bound read-only instead of the project."""
    sized = dict(spec.tmpfs)
    mounts = [*root]
    mounts += [Mount("data", dest, dest) for dest in sorted(files)]
    mounts += [Mount("ro-bind", dest, str(src)) for src, dest in spec.readonly_binds]
    if SANDBOX_HOME not in sized and image_home is not None:
        mounts.append(Mount("ro-bind", SANDBOX_HOME, image_home))
    elif SANDBOX_HOME not in sized:
        mounts.append(Mount("bind", SANDBOX_HOME, str(spec.project_dir)))
    mounts.append(Mount("tmpfs", "/tmp", size=sized.pop("/tmp", None)))  # noqa: S108
    if var_tmp is None:
        mounts.append(Mount("symlink", "/var/tmp", "../tmp"))  # noqa: S108
    elif var_tmp == "dir":
        mounts.append(Mount("tmpfs", "/var/tmp"))  # noqa: S108  (a private tmpfs)
    mounts.append(Mount("dir", "/run"))
    # Shortest first, so a tmpfs inside another one is mounted on top of it; writable binds
    # last, so a file bound inside a tmpfs sits on it.
    mounts += [Mount("tmpfs", dest, size=size) for dest, size in sorted(sized.items())]
    mounts += [Mount("bind", dest, str(src)) for src, dest in spec.writable_binds]
    return mounts


def plan_staging(mounts: list[Mount], hidden: Sequence[str]) -> tuple[list[str], list[Mount]]:
    """Bind sources the unprivileged uid cannot reach (a Python under /root/.pyenv, a data
    dir inside a 0700 directory) are first bound by root under ``STAGE_DIR/<n>`` in a private
    mount namespace; bubblewrap then binds the staged path. ``hidden`` lists those roots.
    Returns (sources to stage, mounts rewritten to staged paths)."""
    staged: list[str] = []
    for root in sorted({r.rstrip("/") or "/" for r in hidden}, key=len):
        if _is_under(root, STAGE_DIR):
            raise ValueError(f"{root} lies inside the staging directory {STAGE_DIR}")
        if not any(_is_under(root, s) for s in staged):
            staged.append(root)
    rewritten = []
    for m in mounts:
        owner = next((s for s in staged if _is_under(m.source, s)), None)
        if m.kind in ("ro-bind", "bind") and owner is not None:
            index = staged.index(owner)
            rel = str(PurePosixPath(m.source).relative_to(owner))
            source = f"{STAGE_DIR}/{index}" if rel == "." else f"{STAGE_DIR}/{index}/{rel}"
            m = Mount(m.kind, m.dest, source)
        rewritten.append(m)
    return staged, rewritten


@dataclass(frozen=True)
class SandboxFds:
    """File descriptors handed to bubblewrap (numbers in the child)."""

    info: int
    status: int
    data: Mapping[str, int]  # generated file dest → fd
    block: int | None = None  # wait for the network to be wired before running the command


def bwrap_args(
    spec: WorkloadSpec,
    mounts: list[Mount],
    fds: SandboxFds,
    env: Mapping[str, str],
) -> list[str]:
    """The bubblewrap options (without ``bwrap`` and without the command) for one workload.

    They reach bubblewrap through ``--args FD`` so that no environment value shows up in the
    host's process list; the command follows ``--`` on the real command line (bubblewrap does
    not accept it inside ``--args``).

    Deliberately absent: ``--die-with-parent`` (workloads outlive a runner restart; the
    runner re-attaches) and ``--share-net`` (the workload gets its own network namespace, so
    the host's loopback — Kiln's web, gRPC and database ports — is not reachable).
    """
    args = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_GID),
        "--hostname", hostname_for(spec.id),
        "--new-session",
        "--cap-drop", "ALL",
        "--info-fd", str(fds.info),
        "--json-status-fd", str(fds.status),
    ]  # fmt: skip
    if fds.block is not None:
        args += ["--block-fd", str(fds.block)]
    args += ["--proc", "/proc", "--dev", "/dev"]
    for m in mounts:
        if m.kind == "data":
            args += ["--perms", "0444", "--ro-bind-data", str(fds.data[m.source]), m.dest]
        elif m.kind == "tmpfs":
            if m.size is not None:
                args += ["--size", str(m.size)]
            args += ["--perms", "1777", "--tmpfs", m.dest]
        elif m.kind == "dir":
            args += ["--dir", m.dest]
        else:
            args += [f"--{m.kind}", m.source, m.dest]
    # Everything bubblewrap created on its root tmpfs (/etc, /run, /home, ...) is read-only;
    # /home/cdsw and /tmp are separate mounts and stay writable.
    args += ["--remount-ro", "/", "--clearenv"]
    for key in sorted(env):
        args += ["--setenv", key, env[key]]
    args += ["--chdir", spec.working_dir]
    return args


LAUNCHER = r"""set -eu
n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done
stage=$1; shift; n=$1; shift; i=0
if [ "$n" -gt 0 ]; then mount -t tmpfs -o mode=0755,size=64k kiln-stage "$stage"; fi
while [ "$n" -gt 0 ]; do
  if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  mount --bind "$1" "$stage/$i"; shift; n=$((n-1)); i=$((i+1))
done
exec "$@"
"""
"""Runs as root in a private mount namespace: joins the workload's cgroups (so every process
of the sandbox is limited from its first instruction), stages hidden bind sources (a file on
a file: a bound output file may sit in a directory the workload uid cannot enter), then execs
the rest of its arguments (setpriv → bwrap)."""


@dataclass(frozen=True)
class Rlimits:
    """Fallback limits when cgroups are not writable (weaker: see README Pitfalls)."""

    address_space: int | None = None
    nproc: int | None = None
    file_size: int | None = None  # not a fallback: the spec's max_file_bytes

    @property
    def any(self) -> bool:
        return bool(self.address_space or self.nproc or self.file_size)


def launcher_argv(
    cgroup_procs: Sequence[str],
    staged: Sequence[str],
    host_uid: int,
    host_gid: int,
    bwrap_args_fd: int,
    command: Sequence[str],
    rlimits: Rlimits | None = None,
) -> list[str]:
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", LAUNCHER]
    argv += ["kiln-launch", str(len(cgroup_procs)), *cgroup_procs]
    argv += [STAGE_DIR, str(len(staged)), *staged]
    if rlimits and rlimits.any:
        argv += ["prlimit"]
        if rlimits.address_space:
            argv += [f"--as={rlimits.address_space}"]
        if rlimits.nproc:
            argv += [f"--nproc={rlimits.nproc}"]
        if rlimits.file_size:
            argv += [f"--fsize={rlimits.file_size}"]
        argv += ["--"]
    argv += [
        "setpriv",
        f"--reuid={host_uid}",
        f"--regid={host_gid}",
        "--clear-groups",
        "--no-new-privs",
        "--",
        "bwrap",
        "--args",
        str(bwrap_args_fd),
        "--",
        *command,
    ]
    return argv


EXEC_JOIN = r"""set -eu
# Arrive with the environment memfd as stdin; move it to 3 and put the real stdin back
# (a TTY: the terminal on 1; pipes: the stdin pipe was handed over on 2).
if [ "$1" = tty ]; then exec 3<&0 0<&1; else exec 3<&0 0<&2 2>&1; fi
shift; n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done
exec "$@"
"""
"""Host side of ``exec`` (root, clean environment): joins the workload's cgroups first, so
that an exec'd process is limited like the workload. The descriptor shuffle exists because
dash cannot name descriptors above 9 and bash would take the PTY as its own terminal."""


ENV_LOADER = r"""tty=$1; shift
. /proc/self/fd/3
exec 3<&-
if [ "$tty" = 1 ] && command -v setsid >/dev/null 2>&1; then exec setsid --ctty "$@"; fi
exec "$@"
"""
"""Runs *inside* the sandbox, as the workload user: reads the environment from a memfd, so
neither the host-side root tools (sh, setpriv, nsenter) ever see a user-chosen variable such
as LD_PRELOAD, nor does any value appear in a host command line."""


def env_script(env: Mapping[str, str]) -> bytes:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())).encode()


def exec_argv(
    pid1: int,
    cgroup_procs: Sequence[str],
    working_dir: str,
    argv: Sequence[str],
    tty: bool,
) -> list[str]:
    """Enter a running sandbox as its user. Host side (root, clean environment): sh joins the
    cgroups → setpriv sets no-new-privs → nsenter enters every namespace and drops to the
    sandbox uid; inside: sh loads the environment → argv."""
    inner = [
        "setpriv",
        "--no-new-privs",
        "--",
        "nsenter",
        f"--target={pid1}",
        "--user",
        "--mount",
        "--pid",
        "--net",
        "--ipc",
        "--uts",
        "--cgroup",
        "--root",
        # nsenter opens --wd before entering; through /proc/PID/root it names the sandbox's dir.
        f"--wd=/proc/{pid1}/root{working_dir}",
        f"--setuid={SANDBOX_UID}",
        f"--setgid={SANDBOX_GID}",
        "--",
        "/bin/sh",
        "-c",
        ENV_LOADER,
        "kiln-env",
        "1" if tty else "0",
        *argv,
    ]
    join = ["/bin/sh", "-c", EXEC_JOIN, "kiln-exec", "tty" if tty else "pipe"]
    return [*join, str(len(cgroup_procs)), *cgroup_procs, *inner]


def egress_ruleset(policy: NetworkPolicy, host_addresses: Sequence[str]) -> str:
    """nftables rules loaded into the sandbox's own network namespace (where the workload,
    having no capabilities there, cannot change them). Order: replies, loopback, DNS,
    deny, allow, the host ports at the gateway (TCP only), the host's own addresses, then
    everything else by ``policy.egress``."""
    hosts = sorted(
        {SLIRP_GATEWAY, *(a for a in host_addresses if ipaddress.ip_address(a).version == 4)},
        key=lambda a: ipaddress.IPv4Address(a),
    )

    def match(rule_net: str, port: int | None) -> list[str]:
        if port is None:
            return [f"ip daddr {rule_net}"]
        return [f"ip daddr {rule_net} tcp dport {port}", f"ip daddr {rule_net} udp dport {port}"]

    lines = [
        "table inet kiln {",
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        "    ct state established,related accept",
        '    oifname "lo" accept',
        "    meta nfproto ipv6 reject",
    ]
    if policy.egress:
        lines += [
            f"    ip daddr {SLIRP_DNS} udp dport 53 accept",
            f"    ip daddr {SLIRP_DNS} tcp dport 53 accept",
        ]

    def address(net: ipaddress.IPv4Network) -> str:
        return str(net.network_address) if net.prefixlen == 32 else str(net)

    for rule in policy.deny:
        lines += [f"    {m} reject" for m in match(address(rule.network), rule.port)]
    for rule in policy.allow:
        lines += [f"    {m} accept" for m in match(address(rule.network), rule.port)]
    if policy.host_ports:
        # slirp runs without --disable-host-loopback then: the gateway is the host's
        # 127.0.0.1, and only these ports of it may be reached.
        ports = ", ".join(str(p) for p in sorted(set(policy.host_ports)))
        lines.append(f"    ip daddr {SLIRP_GATEWAY} tcp dport {{ {ports} }} accept")
    lines.append(f"    ip daddr {{ {', '.join(hosts)} }} reject")
    if not policy.egress:
        lines.append("    reject")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def cgroup_limits(spec: WorkloadSpec, cfs_period_us: int = 100_000) -> dict[str, dict[str, str]]:
    """cgroup v1 files to write per controller, in order (memsw after memory: the kernel
    refuses a memsw limit below the memory limit)."""
    return {
        "memory": {
            "memory.limit_in_bytes": str(spec.memory_bytes),
            # Same limit with swap counted, so a workload cannot page its way past it.
            "memory.memsw.limit_in_bytes": str(spec.memory_bytes),
            "memory.swappiness": "0",
        },
        "pids": {"pids.max": str(spec.pids_max)},
        "cpu": {
            "cpu.cfs_period_us": str(cfs_period_us),
            "cpu.cfs_quota_us": str(max(1000, round(spec.cpu * cfs_period_us))),
        },
    }


def path_dirs_for(facts: HostFacts) -> list[str]:
    """The built-in runtime's Python (``/opt/kiln/bin``) comes first on PATH; never a host
    path, which would differ from host to host (and names nothing in an image)."""
    return list(BUILTIN_PATH_DIRS) if facts.python_env or facts.kiln_env else []
