"""Isolation of the local runtime, each on a real sandbox: network, memory, pids, output.

Where this host cannot enforce a limit (no writable cgroup controller, no slirp4netns/nft),
the test is skipped with the precise reason the runtime logged.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import ExitReason, NetworkPolicy, WorkloadSpec
from kiln.runtimes.local import LocalRuntime
from kiln.runtimes.local.host import host_addresses
from kiln.runtimes.local.logsink import marker
from kiln.testing.runtime_contract import (
    all_logs,
    local_runtime_factory,
    wait_exit,
    wait_for_log,
)

PG_PORT = 5432


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = local_runtime_factory(tmp_path / "state")()
    assert isinstance(rt, LocalRuntime)
    yield rt
    for workload_id in rt.list_workloads():
        rt.stop(workload_id, grace=0)
        rt.remove(workload_id)
    rt.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def require_cgroup(runtime: LocalRuntime, controller: str) -> None:
    if controller not in runtime.features.cgroups.parents:
        why = runtime.features.cgroups.unavailable.get(controller, "not probed")
        pytest.skip(f"cgroup {controller} is not writable on this host: {why}")


def spec_for(project: Path, command: tuple[str, ...], **kwargs: object) -> WorkloadSpec:
    return WorkloadSpec(
        id=f"iso-{uuid.uuid4().hex[:10]}",
        project_dir=project,
        command=command,
        **kwargs,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- network


class Listener:
    """A TCP server on the host that greets every client with its own name."""

    def __init__(self, host: str, name: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.name = name.encode()
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(self.name)

    def close(self) -> None:
        self.sock.close()


CONNECT_PROBE = """
import json, socket, sys
results = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as conn:
            results[target] = "open:" + conn.recv(64).decode()
    except OSError as exc:
        results[target] = type(exc).__name__
print(json.dumps(results))
"""


def probe_connections(
    runtime: LocalRuntime, project: Path, targets: list[str], policy: NetworkPolicy
) -> dict[str, str]:
    (project / "connect.py").write_text(CONNECT_PROBE)
    spec = spec_for(project, ("python3", "connect.py", *targets), network=policy)
    runtime.start(spec)
    assert wait_exit(runtime, spec.id, timeout=60) == 0, all_logs(runtime, spec.id)
    result: dict[str, str] = json.loads(all_logs(runtime, spec.id).decode().splitlines()[-1])
    return result


@pytest.fixture
def host_ip(runtime: LocalRuntime) -> str:
    if not runtime.features.network:
        pytest.skip("no sandbox networking here: " + "; ".join(runtime.features.notes))
    addresses = [a for a in host_addresses() if not a.startswith("127.")]
    if not addresses:
        pytest.skip("the host has no non-loopback IPv4 address to stand for an allowed peer")
    return addresses[0]


def postgres_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", PG_PORT), 2):
        return True
    return False


def test_control_plane_ports_unreachable_while_allowed_peer_is(
    runtime: LocalRuntime, project: Path, host_ip: str
) -> None:
    internal = Listener("127.0.0.1", "internal")  # stands for web's internal / runner gRPC
    everywhere = Listener("0.0.0.0", "everywhere")  # a Kiln service bound to all interfaces
    allowed = Listener("0.0.0.0", "allowed")  # a peer the policy names
    try:
        policy = NetworkPolicy.of(allow=(f"{host_ip}:{allowed.port}",))
        targets = {
            "internal on loopback": f"127.0.0.1:{internal.port}",
            "internal via slirp gateway": f"10.0.2.2:{internal.port}",
            "database on loopback": f"127.0.0.1:{PG_PORT}",
            "database via slirp gateway": f"10.0.2.2:{PG_PORT}",
            "database via host address": f"{host_ip}:{PG_PORT}",
            "service on all interfaces": f"{host_ip}:{everywhere.port}",
            "allowed peer": f"{host_ip}:{allowed.port}",
        }
        result = probe_connections(runtime, project, list(targets.values()), policy)
        outcome = {name: result[target] for name, target in targets.items()}
        assert outcome.pop("allowed peer") == "open:allowed"
        for name, value in outcome.items():
            assert not value.startswith("open"), f"{name} was reachable: {value}"
        assert internal.accepted == 0 and everywhere.accepted == 0
        if postgres_reachable():  # the database really listens, and still was unreachable
            assert outcome["database on loopback"] == "ConnectionRefusedError"
    finally:
        for listener in (internal, everywhere, allowed):
            listener.close()


def test_deny_beats_allow_and_egress_never_reaches_the_host(
    runtime: LocalRuntime, project: Path, host_ip: str
) -> None:
    peer = Listener("0.0.0.0", "peer")
    try:
        both = NetworkPolicy.of(allow=(f"{host_ip}:{peer.port}",), deny=(f"{host_ip}/32",))
        target = f"{host_ip}:{peer.port}"
        assert not probe_connections(runtime, project, [target], both)[target].startswith("open")
        egress = NetworkPolicy.of(egress=True)  # the outside world, but never the host itself
        assert not probe_connections(runtime, project, [target], egress)[target].startswith("open")
        assert peer.accepted == 0
    finally:
        peer.close()


def test_inbound_only_through_the_endpoint(
    runtime: LocalRuntime, project: Path, host_ip: str, tmp_path: Path
) -> None:
    (project / "serve.py").write_text(
        "import socket\ns = socket.socket(); s.bind(('0.0.0.0', 8888)); s.listen(8)\n"
        "print('listening', flush=True)\n"
        "while True:\n    c, _ = s.accept(); c.sendall(b'served'); c.close()\n"
    )
    server = spec_for(project, ("python3", "serve.py"), port=8888)
    endpoint = runtime.start(server)
    assert endpoint is not None and endpoint.host == "127.0.0.1"
    wait_for_log(runtime, server.id, b"listening")
    with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as conn:
        assert conn.recv(16) == b"served"  # the web tier's way in
    other = tmp_path / "other"
    other.mkdir()
    targets = [
        f"127.0.0.1:{endpoint.port}",
        f"10.0.2.2:{endpoint.port}",
        f"{host_ip}:{endpoint.port}",
    ]
    result = probe_connections(runtime, other, targets, NetworkPolicy.of(egress=True))
    assert all(not v.startswith("open") for v in result.values()), result


# ----------------------------------------------------------------------------- memory


def test_memory_hog_is_killed_alone_and_reported(runtime: LocalRuntime, project: Path) -> None:
    require_cgroup(runtime, "memory")
    hog_code = (
        "import time\nchunks = []\n"
        "for i in range(64):\n"
        "    chunks.append(bytearray(32 * 1024 * 1024))\n"
        "    print('allocated', (i + 1) * 32, 'MiB', flush=True)\n"
        "time.sleep(5)\n"
    )
    hog = spec_for(project, ("python3", "-c", hog_code), memory_bytes=128 * 1024**2)
    bystander = spec_for(
        project,
        ("python3", "-c", "import time; b = bytearray(32 * 2**20); time.sleep(3); print('fine')"),
        memory_bytes=128 * 1024**2,
    )
    runtime.start(bystander)
    runtime.start(hog)
    assert wait_exit(runtime, hog.id, timeout=60) == 137
    status = runtime.status(hog.id)
    assert status.reason == ExitReason.OUT_OF_MEMORY, status
    assert "out of memory" in status.message
    assert b"allocated 1024 MiB" not in all_logs(runtime, hog.id)
    assert runtime.poll(bystander.id) is None  # untouched, still running
    assert wait_exit(runtime, bystander.id) == 0
    assert runtime.status(bystander.id).reason == ExitReason.EXITED
    assert all_logs(runtime, bystander.id) == b"fine\n"


# ------------------------------------------------------------------------------- pids

FORK_COUNTER = """
import os, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
    if children >= 10_000:
        break
print("forked", children, flush=True)
"""


FORK_BOMB = """
import os, time
while True:  # every process forks forever; a refused fork only slows it down
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


def test_fork_bomb_is_contained(runtime: LocalRuntime, project: Path) -> None:
    require_cgroup(runtime, "pids")
    counted = spec_for(project, ("python3", "-c", FORK_COUNTER), pids_max=32)
    runtime.start(counted)
    wait_for_log(runtime, counted.id, b"forked", timeout=60)
    # The log may be read while the line is still being written: wait for the whole line.
    deadline = time.monotonic() + 10
    while (line := re.search(rb"forked (\d+)\n", all_logs(runtime, counted.id))) is None:
        assert time.monotonic() < deadline, all_logs(runtime, counted.id)[-500:]
        time.sleep(0.02)
    forked = int(line[1])
    assert forked < 32  # the limit counts every process of the sandbox, its init included
    runtime.stop(counted.id, grace=0)

    bomb = spec_for(project, ("python3", "-c", FORK_BOMB), pids_max=64)
    runtime.start(bomb)
    time.sleep(2)  # let it hit the ceiling
    pids_dir = Path(runtime.get_state(bomb.id)["cgroups"]["pids"])
    assert int((pids_dir / "pids.current").read_text()) <= 64
    assert int((pids_dir / "pids.events").read_text().split()[1]) > 0  # forks were refused
    # Meanwhile another workload and the host fork as usual.
    neighbour = spec_for(
        project, ("sh", "-c", "for i in $(seq 50); do /bin/true; done; echo done"), pids_max=64
    )
    runtime.start(neighbour)
    assert wait_exit(runtime, neighbour.id) == 0
    assert all_logs(runtime, neighbour.id) == b"done\n"
    assert subprocess.run(["true"], check=False).returncode == 0
    started = time.monotonic()
    runtime.stop(bomb.id, grace=1)
    assert time.monotonic() - started < 30
    assert runtime.status(bomb.id).reason == ExitReason.STOPPED


# ----------------------------------------------------------------------------- output

FLOOD = """
import sys
line = b"x" * 65535 + b"\\n"
for _ in range(int(sys.argv[1])):
    sys.stdout.buffer.write(line)
sys.stdout.buffer.flush()
"""

TICKER = """
import time
for i in range(150):
    print(i, time.time(), flush=True)
    time.sleep(0.02)
"""


def test_endless_output_is_capped_without_slowing_others(
    runtime: LocalRuntime, project: Path
) -> None:
    cap = 1024 * 1024
    flood_mib = 256
    flood = spec_for(project, ("python3", "-c", FLOOD, str(flood_mib * 16)), log_max_bytes=cap)
    ticker = spec_for(project, ("python3", "-c", TICKER))
    runtime.start(flood)
    runtime.start(ticker)

    # Follow the ticker live and measure how late each line arrives.
    lags: list[float] = []

    def follow() -> None:
        pending = b""
        for chunk in runtime.logs(ticker.id, follow=True):
            now = time.time()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            lags.extend(now - float(line.split()[1]) for line in lines if line)

    follower = threading.Thread(target=follow)
    follower.start()
    # And how long the runtime takes to answer while the flood runs.
    answer_times = []
    while runtime.poll(ticker.id) is None:
        t0 = time.monotonic()
        runtime.status(flood.id)
        answer_times.append(time.monotonic() - t0)
        time.sleep(0.01)
    follower.join(30)

    # The flood was read to its end (not blocked on a full pipe) and exited normally.
    assert wait_exit(runtime, flood.id, timeout=120) == 0
    status = runtime.status(flood.id)
    assert status.log_truncated
    log_size = Path(runtime.get_state(flood.id)["log_path"]).stat().st_size
    assert log_size == cap + len(marker(cap))
    assert all_logs(runtime, flood.id).endswith(marker(cap))

    assert len(lags) == 150
    assert statistics.median(lags) < 0.1, sorted(lags)[-10:]
    assert max(lags) < 1.0, sorted(lags)[-10:]
    assert max(answer_times) < 0.2
    # Results for the record (pytest -s shows them).
    print(
        f"\nflood {flood_mib} MiB, cap {cap} B; ticker lag median "
        f"{statistics.median(lags) * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms; "
        f"status() max {max(answer_times) * 1000:.1f} ms"
    )


# -------------------------------------------------------------------------------- cpu


def test_cpu_quota_throttles(runtime: LocalRuntime, project: Path) -> None:
    require_cgroup(runtime, "cpu")
    spinner = spec_for(project, ("sh", "-c", "while :; do :; done"), cpu=0.2)
    runtime.start(spinner)
    cpu_dir = Path(runtime.get_state(spinner.id)["cgroups"]["cpu"])
    assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "20000"
    time.sleep(1.5)
    stat = dict(line.split() for line in (cpu_dir / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0
    runtime.stop(spinner.id, grace=0)
