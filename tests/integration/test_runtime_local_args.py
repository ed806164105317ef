"""The local runtime's pure builders and the seam's rules, tested without running anything."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kiln.runtimes import (
    EgressRule,
    NetworkPolicy,
    WorkloadRuntime,
    WorkloadSpec,
    register_runtime,
    runtime_class,
)
from kiln.runtimes.local import LocalRuntime, sandbox
from kiln.runtimes.local.cgroups import parent_dirs
from kiln.runtimes.local.sandbox import (
    STAGE_DIR,
    HostFacts,
    Mount,
    RootfsFacts,
    SandboxFds,
)

FACTS = HostFacts(
    top_level={
        "usr": "dir",
        "bin": "symlink:usr/bin",
        "lib": "symlink:usr/lib",
        "lib64": "symlink:usr/lib64",
        "sbin": "symlink:usr/sbin",
    },
    etc_entries=frozenset({"ssl", "shadow", "sudoers", "passwd", "ld.so.cache", "resolv.conf"}),
    python_prefixes=("/root/.pyenv/versions/3.11.7", "/root/.pyenv/versions/3.11.7"),
)


def spec(**kwargs: object) -> WorkloadSpec:
    fields: dict[str, object] = {
        "id": "job-1",
        "project_dir": Path("/data/projects/42"),
        "command": ("python3", "main.py"),
    }
    fields.update(kwargs)
    return WorkloadSpec(**fields)  # type: ignore[arg-type]


def option_pairs(args: list[str], option: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == option]


def build(s: WorkloadSpec, facts: HostFacts = FACTS, hidden: tuple[str, ...] = ()) -> list[str]:
    files = sandbox.generated_files(s, egress=s.network.egress)
    mounts = sandbox.workload_mounts(s, sandbox.builtin_mounts(facts), files)
    _, mounts = sandbox.plan_staging(mounts, hidden)
    fds = SandboxFds(info=5, status=6, data={dest: 10 + i for i, dest in enumerate(files)})
    return sandbox.bwrap_args(s, mounts, fds, sandbox.base_env(s, ["/py/bin"]))


# ------------------------------------------------------------------------ bwrap_args


def test_namespaces_user_and_no_die_with_parent() -> None:
    args = build(spec())
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--new-session"):
        assert flag in args
    assert args[args.index("--uid") + 1] == "1000" and args[args.index("--gid") + 1] == "1000"
    # Workloads must outlive a runner restart; the runner re-attaches instead.
    assert "--die-with-parent" not in args
    assert "--share-net" not in args  # own network namespace: the host's loopback is not there
    assert "--" not in args  # the command goes on the real command line, after --args


def test_only_project_and_tmp_are_writable() -> None:
    args = build(spec())
    assert option_pairs(args, "--bind") == [("/data/projects/42", "/home/cdsw")]
    assert args[args.index("--tmpfs") - 2 : args.index("--tmpfs") + 2] == [
        "--perms", "1777", "--tmpfs", "/tmp",
    ]  # fmt: skip
    assert "--dev-bind" not in args
    # The root bubblewrap builds (and everything it created there) ends read-only.
    assert args[args.index("--remount-ro") + 1] == "/"
    assert args.index("--remount-ro") > max(i for i, a in enumerate(args) if a == "--bind")


def test_builtin_runtime_shows_host_usr_python_and_safe_etc_only() -> None:
    args = build(spec())
    ro = dict((dest, src) for src, dest in option_pairs(args, "--ro-bind"))
    assert ro["/usr"] == "/usr"
    assert ro["/root/.pyenv/versions/3.11.7"] == "/root/.pyenv/versions/3.11.7"
    assert ro["/etc/ssl"] == "/etc/ssl"
    assert "/etc/shadow" not in ro and "/etc/sudoers" not in ro
    assert "/etc/passwd" not in ro and "/etc/resolv.conf" not in ro  # generated instead
    assert ("usr/bin", "/bin") in option_pairs(args, "--symlink")
    data = [args[i + 2] for i, a in enumerate(args) if a == "--ro-bind-data"]
    assert sorted(data) == [
        "/etc/group",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/passwd",
        "/etc/profile",
    ]


def test_python_prefix_under_usr_is_not_bound_twice() -> None:
    facts = HostFacts(FACTS.top_level, FACTS.etc_entries, ("/usr", "/usr/local"))
    ro = [dest for _, dest in option_pairs(build(spec(), facts), "--ro-bind")]
    assert ro.count("/usr") == 1 and "/usr/local" not in ro


def test_environment_is_cleared_then_set() -> None:
    args = build(spec(env={"CDSW_PROJECT": "demo", "PATH": "/custom"}))
    assert "--clearenv" in args
    env = dict(option_pairs(args, "--setenv"))
    assert env["CDSW_PROJECT"] == "demo"
    assert env["PATH"] == "/custom"  # the workload's own values win
    assert env["HOME"] == "/home/cdsw" and env["USER"] == "cdsw"
    assert args.index("--clearenv") < args.index("--setenv")


def test_working_dir_and_fds() -> None:
    args = build(spec(working_dir="/home/cdsw/src"))
    assert args[args.index("--chdir") + 1] == "/home/cdsw/src"
    assert args[args.index("--info-fd") + 1] == "5"
    assert args[args.index("--json-status-fd") + 1] == "6"
    assert "--block-fd" not in args


def test_resolv_conf_only_with_egress() -> None:
    assert "/etc/resolv.conf" not in sandbox.generated_files(spec(), egress=False)
    files = sandbox.generated_files(spec(), egress=True)
    assert files["/etc/resolv.conf"] == b"nameserver 10.0.2.3\n"
    passwd = sandbox.generated_files(spec(), egress=False)["/etc/passwd"].decode()
    assert "cdsw:x:1000:1000:" in passwd and passwd.count("\n") == 3


# ---------------------------------------------------------------------------- staging


def test_hidden_sources_are_staged_and_rewritten() -> None:
    hidden = ("/root/.pyenv/versions/3.11.7", "/data/projects/42")
    args = build(spec(), hidden=hidden)
    assert option_pairs(args, "--bind") == [(f"{STAGE_DIR}/0", "/home/cdsw")]
    ro = dict((dest, src) for src, dest in option_pairs(args, "--ro-bind"))
    assert ro["/root/.pyenv/versions/3.11.7"] == f"{STAGE_DIR}/1"
    assert ro["/usr"] == "/usr"


def test_staging_nested_roots_share_one_mount() -> None:
    mounts = [
        Mount("ro-bind", "/usr", "/opt/rootfs/usr"),
        Mount("ro-bind", "/etc/ssl", "/opt/rootfs/etc/ssl"),
        Mount("bind", "/home/cdsw", "/opt/rootfs-projects/p"),
    ]
    staged, rewritten = sandbox.plan_staging(mounts, ["/opt/rootfs", "/opt/rootfs/etc"])
    assert staged == ["/opt/rootfs"]
    assert [m.source for m in rewritten] == [
        f"{STAGE_DIR}/0/usr", f"{STAGE_DIR}/0/etc/ssl", "/opt/rootfs-projects/p",
    ]  # fmt: skip


def test_staging_refuses_sources_inside_the_stage() -> None:
    with pytest.raises(ValueError, match="staging"):
        sandbox.plan_staging([], [f"{STAGE_DIR}/x"])


# ----------------------------------------------------------------------- OCI rootfs


def test_rootfs_binds_image_entries_and_skips_mount_points() -> None:
    rootfs = RootfsFacts(
        "/cache/rootfs/sha256-abc",
        {"usr": "dir", "bin": "symlink:usr/bin", "proc": "dir", "tmp": "dir", "etc": "dir"},
        {"os-release": "file", "passwd": "file", "ssl": "dir", "mtab": "symlink:/proc/mounts"},
    )
    mounts = sandbox.rootfs_mounts(rootfs)
    assert Mount("ro-bind", "/usr", "/cache/rootfs/sha256-abc/usr") in mounts
    assert Mount("symlink", "/bin", "usr/bin") in mounts
    assert Mount("ro-bind", "/etc/ssl", "/cache/rootfs/sha256-abc/etc/ssl") in mounts
    assert Mount("symlink", "/etc/mtab", "/proc/mounts") in mounts
    dests = {m.dest for m in mounts}
    assert not dests & {"/proc", "/tmp", "/etc", "/etc/passwd"}


@pytest.mark.parametrize(
    ("var_tmp", "expected"),
    [
        (None, Mount("symlink", "/var/tmp", "../tmp")),
        ("dir", Mount("tmpfs", "/var/tmp")),
        ("symlink:/tmp", None),  # the image's own link, left as it is
    ],
)
def test_var_tmp_is_writable_whatever_the_image_has(
    var_tmp: str | None, expected: Mount | None
) -> None:
    mounts = sandbox.workload_mounts(spec(), [], {}, var_tmp)
    at_var_tmp = [m for m in mounts if m.dest == "/var/tmp"]
    assert at_var_tmp == ([expected] if expected else [])


def test_build_style_mounts_sized_tmpfs_and_a_writable_file() -> None:
    """A tmpfs at /home/cdsw replaces the project bind, one at /tmp sizes the default /tmp,
    the others are mounted in path order, and writable binds come last (on top)."""
    s = spec(
        tmpfs=(
            ("/opt/kiln/deps", 64 * 1024**2),
            ("/tmp", 32 * 1024**2),
            ("/home/cdsw", 16 * 1024**2),
        ),
        writable_binds=((Path("/work/out/deps.tar"), "/kiln/out/deps.tar"),),
    )
    mounts = sandbox.workload_mounts(s, [], {})
    assert all(m.dest != "/home/cdsw" or m.kind == "tmpfs" for m in mounts)
    assert Mount("tmpfs", "/tmp", size=32 * 1024**2) in mounts
    assert mounts[-1] == Mount("bind", "/kiln/out/deps.tar", "/work/out/deps.tar")
    args = sandbox.bwrap_args(s, mounts, sandbox.SandboxFds(3, 4, {}), {})
    at = args.index("/opt/kiln/deps")
    assert args[at - 5 : at] == ["--size", str(64 * 1024**2), "--perms", "1777", "--tmpfs"]


def test_the_file_size_limit_goes_through_prlimit() -> None:
    argv = sandbox.launcher_argv([], [], 8536, 8536, 9, ("true",), sandbox.Rlimits(file_size=4096))
    assert argv[argv.index("prlimit") : argv.index("prlimit") + 3] == [
        "prlimit",
        "--fsize=4096",
        "--",
    ]


# ---------------------------------------------------------------------------- launcher


def test_launcher_joins_cgroups_stages_then_drops_to_the_workload_uid() -> None:
    argv = sandbox.launcher_argv(
        ["/cg/memory/kiln/w/cgroup.procs", "/cg/pids/kiln/w/cgroup.procs"],
        ["/root/.pyenv/versions/3.11.7"],
        8536,
        8536,
        9,
        ("python3", "main.py"),
    )
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    tail = argv[argv.index("kiln-launch") + 1 :]
    assert tail[:3] == ["2", "/cg/memory/kiln/w/cgroup.procs", "/cg/pids/kiln/w/cgroup.procs"]
    assert tail[3:6] == [STAGE_DIR, "1", "/root/.pyenv/versions/3.11.7"]
    setpriv = tail[tail.index("setpriv") :]
    assert setpriv[:6] == [
        "setpriv", "--reuid=8536", "--regid=8536", "--clear-groups", "--no-new-privs", "--",
    ]  # fmt: skip
    assert setpriv[6:] == ["bwrap", "--args", "9", "--", "python3", "main.py"]
    assert "prlimit" not in argv


def test_launcher_applies_rlimits_when_cgroups_are_missing() -> None:
    argv = sandbox.launcher_argv([], [], 8536, 8536, 9, ("true",), sandbox.Rlimits(2**30, 100))
    assert argv[argv.index("prlimit") : argv.index("setpriv")] == [
        "prlimit", f"--as={2**30}", "--nproc=100", "--",
    ]  # fmt: skip


def test_exec_enters_every_namespace_as_the_sandbox_user() -> None:
    argv = sandbox.exec_argv(4242, ["/cg/pids/kiln/w/cgroup.procs"], "/home/cdsw", ["bash"], True)
    nsenter = argv[argv.index("nsenter") :]
    for flag in ("--user", "--mount", "--pid", "--net", "--ipc", "--uts", "--cgroup", "--root"):
        assert flag in nsenter
    assert "--target=4242" in nsenter and "--setuid=1000" in nsenter
    assert "--wd=/proc/4242/root/home/cdsw" in nsenter
    assert argv[argv.index("setpriv") + 1] == "--no-new-privs"
    assert argv[-2:] == ["1", "bash"]  # tty flag for the in-sandbox loader, then the argv


def test_env_script_quotes_everything() -> None:
    script = sandbox.env_script({"A": "it's $HOME `x`", "B": "line1\nline2"}).decode()
    assert script == "export A='it'\"'\"'s $HOME `x`'\nexport B='line1\nline2'\n"


# ------------------------------------------------------------------------------- nft


def test_egress_rules_order_and_host_addresses() -> None:
    policy = NetworkPolicy.of(allow=("192.0.2.2:8443",), deny=("10.0.0.0/8:5432",))
    rules = sandbox.egress_ruleset(policy, ["192.0.2.2", "127.0.0.1", "::1"])
    lines = [line.strip() for line in rules.splitlines()]
    established = lines.index("ct state established,related accept")
    deny = lines.index("ip daddr 10.0.0.0/8 tcp dport 5432 reject")
    allow = lines.index("ip daddr 192.0.2.2 tcp dport 8443 accept")
    hosts = lines.index("ip daddr { 10.0.2.2, 127.0.0.1, 192.0.2.2 } reject")
    assert established < deny < allow < hosts
    assert lines[hosts + 1] == "reject"  # egress off: nothing else either
    assert not any("udp dport 53" in line for line in lines)


def test_egress_on_allows_dns_and_the_rest_after_host_rules() -> None:
    rules = sandbox.egress_ruleset(NetworkPolicy.of(egress=True), ["192.0.2.2"])
    lines = [line.strip() for line in rules.splitlines()]
    assert "ip daddr 10.0.2.3 udp dport 53 accept" in lines
    hosts = lines.index("ip daddr { 10.0.2.2, 192.0.2.2 } reject")
    assert lines[hosts + 1] == "}"  # then the chain's policy: accept


@pytest.mark.parametrize(
    ("text", "network", "port"),
    [
        ("192.0.2.7", "192.0.2.7/32", None),
        ("10.0.0.0/8", "10.0.0.0/8", None),
        ("192.0.2.7:443", "192.0.2.7/32", 443),
        ("10.1.2.3/16:5432", "10.1.0.0/16", 5432),
    ],
)
def test_egress_rule_parse(text: str, network: str, port: int | None) -> None:
    rule = EgressRule.parse(text)
    assert rule.network == ipaddress.IPv4Network(network) and rule.port == port


@pytest.mark.parametrize("text", ["", "example.com", "10.0.0.0/33", "1.2.3.4:0", "1.2.3.4:x"])
def test_egress_rule_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        EgressRule.parse(text)


# ------------------------------------------------------------------------- cgroups


MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /ctr /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP = "8:pids:/ctr/a\n4:memory:/process_api/x\n1:cpu:/\n0::/\n"


def test_cgroup_parents_nest_under_the_runners_own_cgroup() -> None:
    dirs = parent_dirs(MOUNTINFO, PROC_CGROUP, "kiln")
    assert dirs == {
        "cpu": Path("/sys/fs/cgroup/cpu/kiln"),
        "memory": Path("/sys/fs/cgroup/memory/process_api/x/kiln"),
        "pids": Path("/sys/fs/cgroup/pids/a/kiln"),  # the mount shows only /ctr
    }


def test_cgroup_limits() -> None:
    limits = sandbox.cgroup_limits(spec(cpu=1.5, memory_bytes=2**30, pids_max=100))
    assert limits["memory"]["memory.limit_in_bytes"] == str(2**30)
    assert limits["memory"]["memory.memsw.limit_in_bytes"] == str(2**30)
    assert limits["pids"] == {"pids.max": "100"}
    assert limits["cpu"] == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000"}


# -------------------------------------------------------------------------- the seam


@pytest.mark.parametrize(
    "bad",
    [
        {"id": "../x"},
        {"id": ""},
        {"id": "a" * 65},
        {"command": ()},
        {"command": ("a\0b",)},
        {"project_dir": Path("relative")},
        {"cpu": 0},
        {"memory_bytes": 1024},
        {"pids_max": 1},
        {"port": 70000},
        {"env": {"A-B": "x"}},
        {"env": {"1A": "x"}},
        {"env": {"A": "nul\0"}},
        {"working_dir": "relative"},
        {"working_dir": "/home/cdsw/../../etc"},
        {"readonly_binds": ((Path("/x"), "/a/../b"),)},
    ],
)
def test_spec_check_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        spec(**bad).check()


def test_spec_check_accepts_a_normal_spec() -> None:
    spec(env={"CDSW_PROJECT": "p", "_X1": ""}, port=8080).check()


def test_a_runtime_missing_a_method_fails_at_registration_and_instantiation() -> None:
    class Incomplete(WorkloadRuntime):
        def start(self, spec: WorkloadSpec) -> None:
            return None

    with pytest.raises(TypeError, match="does not implement"):
        register_runtime("incomplete")(Incomplete)
    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


def test_registry_knows_local() -> None:
    assert runtime_class("local") is LocalRuntime
    with pytest.raises(LookupError, match="no runtime named"):
        runtime_class("nope")
