"""Isolation of the local runtime, each on a real bubblewrap sandbox: files, processes, uid.

Network, memory, pids and output limits are in test_isolation_resources.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import WorkloadSpec
from kiln.runtimes.local import LocalRuntime
from kiln.runtimes.local.launch import pids_in_namespace
from kiln.testing.runtime_contract import all_logs, local_runtime_factory, wait_exit, wait_for_log


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


def make_project(root: Path, name: str) -> Path:
    path = root / "projects" / name
    path.mkdir(parents=True)
    (path / "secret.txt").write_text(f"secret of {name}\n")
    return path


def run_python(runtime: LocalRuntime, project: Path, code: str, **spec: object) -> tuple[int, dict]:
    """Run ``code`` in a sandbox over ``project``; it prints one JSON object at the end."""
    (project / "probe.py").write_text(textwrap.dedent(code))
    workload = WorkloadSpec(
        id=f"probe-{uuid.uuid4().hex[:10]}",
        project_dir=project,
        command=("python3", "probe.py"),
        **spec,  # type: ignore[arg-type]
    )
    runtime.start(workload)
    code_ = wait_exit(runtime, workload.id)
    out = all_logs(runtime, workload.id).decode()
    assert code_ == 0, out
    return code_, json.loads(out.strip().splitlines()[-1])


def test_sees_only_its_project_and_a_private_tmp(runtime: LocalRuntime, tmp_path: Path) -> None:
    mine, other = make_project(tmp_path, "mine"), make_project(tmp_path, "other")
    outside = tmp_path / "outside.txt"
    outside.write_text("host file\n")
    (mine / "link-to-other").symlink_to(other / "secret.txt")
    marker = f"kiln-tmp-{uuid.uuid4().hex}"
    python_prefix = os.path.realpath(sys.base_prefix)
    _, result = run_python(
        runtime,
        mine,
        f"""
        import json, os
        result = {{}}
        def attempt(name, fn):
            try:
                fn(); result[name] = "ok"
            except OSError as exc:
                result[name] = type(exc).__name__
        def write(path):
            with open(path, "w") as f: f.write("x")
        def read(path):
            with open(path) as f: f.read()
        attempt("read other project", lambda: read({str(other / "secret.txt")!r}))
        attempt("read other via symlink", lambda: read("/home/cdsw/link-to-other"))
        attempt("write other project", lambda: write({str(other / "planted.txt")!r}))
        attempt("read host file", lambda: read({str(outside)!r}))
        attempt("read shadow", lambda: read("/etc/shadow"))
        for path in ["/x", "/etc/x", "/usr/x", "/home/x", "/run/x", "/var/x",
                     "/usr/bin/python3", "/etc/passwd", {python_prefix + "/x"!r}]:
            attempt("write " + path, lambda p=path: write(p))
        attempt("write project", lambda: write("/home/cdsw/written.txt"))
        attempt("write tmp", lambda: write("/tmp/{marker}"))
        attempt("write var tmp", lambda: write("/var/tmp/{marker}.2"))
        result["postgres socket"] = os.path.exists("/run/postgresql") or os.path.exists(
            "/var/run/postgresql")
        result["root entries"] = sorted(os.listdir("/"))
        result["passwd"] = open("/etc/passwd").read()
        print(json.dumps(result))
        """,
    )
    assert result["read other project"] == "FileNotFoundError"
    assert result["read other via symlink"] == "FileNotFoundError"
    assert result["write other project"] == "FileNotFoundError"
    assert result["read host file"] == "FileNotFoundError"
    assert result["read shadow"] == "FileNotFoundError"
    for key, value in result.items():
        if key.startswith("write /"):
            assert value in ("OSError", "PermissionError", "FileNotFoundError"), (key, value)
    assert result["write project"] == result["write tmp"] == result["write var tmp"] == "ok"
    assert (mine / "written.txt").read_text() == "x"
    assert not (other / "planted.txt").exists()
    assert (other / "secret.txt").read_text() == "secret of other\n"
    assert not Path("/tmp", marker).exists()  # its /tmp is its own, not the host's
    assert set(result["root entries"]) <= {
        "bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc", "root", "run",
        "sbin", "tmp", "usr", "var", "opt",
    }  # fmt: skip
    assert "work" not in result["root entries"]
    assert result["postgres socket"] is False  # nor the database's unix socket
    assert result["passwd"].count("\n") == 3 and "cdsw:x:1000:1000" in result["passwd"]


def test_workloads_do_not_share_tmp(runtime: LocalRuntime, tmp_path: Path) -> None:
    a, b = make_project(tmp_path, "a"), make_project(tmp_path, "b")
    writer = WorkloadSpec(
        id=f"writer-{uuid.uuid4().hex[:8]}",
        project_dir=a,
        command=("sh", "-c", "echo shared > /tmp/drop; echo written; sleep 60"),
    )
    runtime.start(writer)
    wait_for_log(runtime, writer.id, b"written")
    _, result = run_python(
        runtime,
        b,
        """
        import json, os
        print(json.dumps({"exists": os.path.exists("/tmp/drop")}))
        """,
    )
    assert result == {"exists": False}


def test_cannot_see_other_workloads_or_host_processes(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    a, b = make_project(tmp_path, "a"), make_project(tmp_path, "b")
    marker = f"kiln-marker-{uuid.uuid4().hex}"
    other = WorkloadSpec(
        id=f"other-{uuid.uuid4().hex[:8]}",
        project_dir=b,
        command=("sh", "-c", f"echo up; sleep 300; : {marker}"),
    )
    runtime.start(other)
    wait_for_log(runtime, other.id, b"up")
    other_pids = pids_in_namespace(runtime.get_state(other.id)["pidns"])
    assert other_pids, "the other workload's processes are visible from the host"
    _, result = run_python(
        runtime,
        a,
        f"""
        import json, os, signal
        cmdlines = {{}}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    cmdlines[name] = open(f"/proc/{{name}}/cmdline", "rb").read().decode()
                except OSError:
                    pass
        signals = {{}}
        for pid in {[*other_pids, os.getpid(), 1]!r}:
            try:
                os.kill(pid, 0); signals[pid] = "delivered"
            except OSError as exc:
                signals[pid] = type(exc).__name__
        print(json.dumps({{"cmdlines": cmdlines, "signals": signals}}))
        """,
    )
    everything = " ".join(result["cmdlines"].values())
    assert marker not in everything
    assert "pytest" not in everything  # not even the runner (this test process) is visible
    assert len(result["cmdlines"]) <= 4  # its init, itself (and a shell at most)
    for pid in [*other_pids, os.getpid()]:
        if pid > 10:  # pids that small may legitimately exist inside its own namespace
            assert result["signals"][str(pid)] == "ProcessLookupError"


def test_never_runs_as_host_root(runtime: LocalRuntime, tmp_path: Path) -> None:
    project = make_project(tmp_path, "p")
    spec = WorkloadSpec(
        id=f"uid-{uuid.uuid4().hex[:8]}",
        project_dir=project,
        command=("sh", "-c", "echo up; sleep 60"),
    )
    runtime.start(spec)
    wait_for_log(runtime, spec.id, b"up")
    # On the host, every process of the sandbox runs as the unprivileged workload uid.
    pids = pids_in_namespace(runtime.get_state(spec.id)["pidns"])
    assert pids
    for pid in pids:
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
        assert set(uids) == {str(runtime.host_uid)}, (pid, uids)
        assert runtime.host_uid != 0
    # A root-owned file that appeared after the start (so was not handed over) stays root's.
    root_file = project / "root-owned.txt"
    root_file.write_text("root only\n")
    os.chown(root_file, 0, 0)
    root_file.chmod(0o644)
    with runtime.exec(
        spec.id,
        [
            "python3", "-c", textwrap.dedent("""
            import json, os, subprocess
            r = {"uid": os.getuid(), "euid": os.geteuid()}
            status = open("/proc/self/status").read()
            r["capeff"] = status.split("CapEff:")[1].split()[0]
            r["nonewprivs"] = status.split("NoNewPrivs:")[1].split()[0]
            try:
                open("/home/cdsw/root-owned.txt", "a").write("x"); r["write root file"] = "ok"
            except OSError as exc:
                r["write root file"] = type(exc).__name__
            try:
                os.setuid(0); r["setuid"] = "ok"
            except OSError as exc:
                r["setuid"] = type(exc).__name__
            r["unshare"] = subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode
            print(json.dumps(r))
            """),
        ],
    ) as process:  # fmt: skip
        out = b""
        while chunk := process.read(timeout=30):
            out += chunk
        assert process.wait(30) == 0, out
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["uid"] == result["euid"] == 1000
    assert int(result["capeff"], 16) == 0
    assert result["nonewprivs"] == "1"
    assert result["write root file"] == "PermissionError"
    assert result["setuid"] != "ok"  # EINVAL: uid 0 does not even exist in its namespace
    assert result["unshare"] != 0  # no nested user namespaces either
    assert root_file.read_text() == "root only\n"


def test_project_hand_over_does_not_follow_planted_links(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    """The project tree is chowned to the workload uid before each start; links a workload
    planted there must not make root chown something outside the project."""
    project = make_project(tmp_path, "p")
    victim = tmp_path / "victim.txt"
    victim.write_text("root's\n")
    os.chown(victim, 0, 0)
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    os.chown(victim_dir, 0, 0)
    (project / "link-to-file").symlink_to(victim)
    (project / "link-to-dir").symlink_to(victim_dir)
    os.link(victim, project / "hardlink")  # a hard link to a file outside the project
    spec = WorkloadSpec(id=f"own-{uuid.uuid4().hex[:8]}", project_dir=project, command=("true",))
    runtime.start(spec)
    assert wait_exit(runtime, spec.id) == 0
    assert os.stat(victim).st_uid == 0
    assert os.stat(victim_dir).st_uid == 0
    assert os.stat(project / "secret.txt").st_uid == runtime.host_uid  # the project's own files
    assert stat.S_ISLNK(os.lstat(project / "link-to-file").st_mode)
