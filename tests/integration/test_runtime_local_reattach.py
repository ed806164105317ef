"""A runner process killed with SIGKILL while its workloads run: they keep running, and a new
runtime instance re-attaches to them from the state the dead one handed out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import ExitReason
from kiln.runtimes.local import LocalRuntime
from kiln.runtimes.local.proc import running
from kiln.testing.runtime_contract import (
    all_logs,
    cleaned_up,
    local_runtime_factory,
    read_all,
    wait_exit,
)

RUNNER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from kiln.runtimes import WorkloadSpec
    from kiln.runtimes.local import LocalRuntime

    rt = LocalRuntime(Path(sys.argv[1]))
    states = []
    for item in json.loads(sys.argv[2]):
        rt.start(WorkloadSpec(
            id=item["id"], project_dir=Path(item["project"]), command=tuple(item["command"]),
            port=item.get("port"),
        ))
        states.append(rt.get_state(item["id"]))
    print(json.dumps(states), flush=True)
    time.sleep(3600)
    """
)

SERVER = textwrap.dedent(
    """
    import os, socket
    s = socket.socket(); s.bind(("0.0.0.0", 8080)); s.listen(8); s.settimeout(0.1)
    print("serving", flush=True)
    while not os.path.exists("go"):
        try:
            conn, _ = s.accept()
        except OSError:
            continue
        conn.sendall(b"alive"); conn.close()
    print("leaving", flush=True)
    raise SystemExit(5)
    """
)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    with cleaned_up(rt):
        yield rt


def test_workloads_survive_a_killed_runner_and_are_reattached(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "server.py").write_text(SERVER)
    where = {"project": str(project)}
    workloads = [
        {"id": "server", "command": ["python3", "server.py"], "port": 8080, **where},
        {"id": "ends-meanwhile", "command": ["sh", "-c", "sleep 0.5; echo bye; exit 9"], **where},
        # ~300 KiB written while no runner reads: kept in the pipe, not lost, no SIGPIPE.
        {"id": "talks-meanwhile", "command": ["sh", "-c", "sleep 0.5; seq 1 50000"], **where},
    ]
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(runtime.state_dir), json.dumps(workloads)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
    )
    assert runner.stdout is not None
    states = json.loads(runner.stdout.readline())
    runner.send_signal(signal.SIGKILL)  # no cleanup of any kind
    runner.wait()
    time.sleep(2)  # two of the workloads end while no runner watches them

    for state in states:
        runtime.load_state(state)
    by_id = {s["id"]: s for s in states}

    # The server kept running, is still reachable through its endpoint, and can be exec'd.
    assert runtime.poll("server") is None
    endpoint = runtime.status("server").endpoint
    assert endpoint is not None and endpoint.port == by_id["server"]["host_port"]
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as conn:
        assert conn.recv(16) == b"alive"
    with runtime.exec("server", ["sh", "-c", "echo exec-ok"]) as process:
        assert read_all(process) == b"exec-ok\n"
    (project / "go").touch()
    assert wait_exit(runtime, "server") == 5
    assert all_logs(runtime, "server") == b"serving\nleaving\n"

    # The one that ended while the runner was dead reports its status and its last words.
    assert wait_exit(runtime, "ends-meanwhile") == 9
    assert runtime.status("ends-meanwhile").reason == ExitReason.EXITED
    assert all_logs(runtime, "ends-meanwhile") == b"bye\n"

    # Output written with no runner reading was buffered, not lost.
    assert wait_exit(runtime, "talks-meanwhile") == 0
    expected = "".join(f"{i}\n" for i in range(1, 50001)).encode()
    assert all_logs(runtime, "talks-meanwhile") == expected

    # Helpers of ended workloads are gone (output keeper, user-mode network).
    time.sleep(0.2)
    for state in states:
        assert not running(state["keeper_pid"], state["keeper_start"])
        if state["slirp_pid"]:
            assert not running(state["slirp_pid"], state["slirp_start"])


def test_state_of_a_removed_workload_cannot_be_loaded(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    from kiln.runtimes import WorkloadNotFound, WorkloadSpec

    project = tmp_path / "p"
    project.mkdir()
    runtime.start(WorkloadSpec(id="gone", project_dir=project, command=("true",)))
    wait_exit(runtime, "gone")
    state = runtime.get_state("gone")
    runtime.remove("gone")
    with pytest.raises(WorkloadNotFound):
        runtime.load_state(state)
    runtime.start(WorkloadSpec(id="kept", project_dir=project, command=("sleep", "30")))
    state = runtime.get_state("kept")
    runtime.close()  # a restarted runner, handed states that point elsewhere, refuses them
    again = local_runtime_factory(runtime.state_dir)()
    try:
        with pytest.raises(ValueError):
            again.load_state({**state, "dir": "/etc"})
        with pytest.raises(ValueError):
            again.load_state({**state, "cgroups": {"pids": "/sys/fs/cgroup/pids/system"}})
        with pytest.raises(ValueError):
            again.load_state({**state, "cgroups": {"pids": "/tmp/kiln/kept"}})
        again.load_state(state)
        again.stop("kept", grace=0)
        again.remove("kept")
    finally:
        again.close()


def test_a_sandbox_whose_monitor_is_killed_is_reported_lost_and_taken_down(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    from kiln.runtimes import WorkloadSpec

    project = tmp_path / "p"
    project.mkdir()
    runtime.start(WorkloadSpec(id="orphan", project_dir=project, command=("sleep", "60")))
    state = runtime.get_state("orphan")
    os.kill(state["outer_pid"], signal.SIGKILL)
    assert wait_exit(runtime, "orphan") == 137
    assert runtime.status("orphan").reason == ExitReason.LOST
    time.sleep(0.2)
    assert not running(state["pid1"], state["pid1_start"])  # no sandbox left behind
