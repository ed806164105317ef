"""A session may call the Kiln API: the local runtime opens exactly the web tier's public port
(``NetworkPolicy.host_ports``) at the slirp gateway, and nothing else of the host."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kiln.runtimes import NetworkPolicy, WorkloadSpec
from kiln.runtimes.local import LocalRuntime, sandbox
from kiln.runtimes.local.host import host_addresses
from kiln.testing.runtime_contract import local_runtime_factory, wait_for_log
from tests.security.test_isolation_resources import (
    PG_PORT,
    Listener,
    probe_connections,
    project,  # noqa: F401  (fixture)
    runtime,  # noqa: F401  (fixture)
)


def test_ruleset_opens_only_the_host_ports_at_the_gateway_and_only_tcp() -> None:
    policy = NetworkPolicy.of(deny=("10.0.2.2:9000",), host_ports=(8443, 8443, 9000))
    lines = [line.strip() for line in sandbox.egress_ruleset(policy, ["192.0.2.2"]).splitlines()]
    deny = lines.index("ip daddr 10.0.2.2 tcp dport 9000 reject")
    web = lines.index("ip daddr 10.0.2.2 tcp dport { 8443, 9000 } accept")
    hosts = lines.index("ip daddr { 10.0.2.2, 192.0.2.2 } reject")
    assert deny < web < hosts  # an admin's deny still wins
    assert lines[hosts + 1] == "reject"  # no egress: nothing else
    assert not any("udp" in line and "accept" in line for line in lines)


@pytest.mark.parametrize("ports", [(0,), (65536,), (-1,)])
def test_host_ports_must_be_ports(ports: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="host_ports"):
        NetworkPolicy(host_ports=ports)


@pytest.mark.parametrize("egress", [False, True], ids=["no-egress", "egress"])
def test_reaches_the_web_port_and_no_other_host_port(
    runtime: LocalRuntime,  # noqa: F811
    project: Path,  # noqa: F811
    egress: bool,
) -> None:
    if not runtime.features.network:
        pytest.skip("no sandbox networking here: " + "; ".join(runtime.features.notes))
    web = Listener("127.0.0.1", "web")  # the web tier's public HTTPS port
    grpc = Listener("127.0.0.1", "runner")  # stands for the runner's gRPC port
    everywhere = Listener("0.0.0.0", "everywhere")  # any service bound to all interfaces
    try:
        policy = NetworkPolicy.of(egress=egress, host_ports=(web.port,))
        targets = {
            "web via gateway": f"10.0.2.2:{web.port}",
            "runner via gateway": f"10.0.2.2:{grpc.port}",
            "all-interfaces service via gateway": f"10.0.2.2:{everywhere.port}",
            "database via gateway": f"10.0.2.2:{PG_PORT}",
            "web on the sandbox's own loopback": f"127.0.0.1:{web.port}",
        }
        for address in host_addresses():
            if not address.startswith("127."):
                targets[f"web at host address {address}"] = f"{address}:{web.port}"
                targets[f"service at host address {address}"] = f"{address}:{everywhere.port}"
        result = probe_connections(runtime, project, list(targets.values()), policy)
        outcome = {name: result[target] for name, target in targets.items()}
        assert outcome.pop("web via gateway") == "open:web"
        for name, value in outcome.items():
            assert not value.startswith("open"), f"{name} was reachable: {value}"
        assert grpc.accepted == 0 and everywhere.accepted == 0
    finally:
        for listener in (web, grpc, everywhere):
            listener.close()


def test_without_host_ports_the_gateway_is_the_host_no_more(
    runtime: LocalRuntime,  # noqa: F811
    project: Path,  # noqa: F811
) -> None:
    """The same listener, with egress but no host port: slirp keeps host loopback off."""
    if not runtime.features.network:
        pytest.skip("no sandbox networking here: " + "; ".join(runtime.features.notes))
    web = Listener("127.0.0.1", "web")
    try:
        target = f"10.0.2.2:{web.port}"
        result = probe_connections(runtime, project, [target], NetworkPolicy.of(egress=True))
        assert not result[target].startswith("open"), result
        assert web.accepted == 0
    finally:
        web.close()


def test_a_deep_state_directory_still_gets_its_network(tmp_path: Path) -> None:
    """slirp's API socket lives in the workload's state directory, whose path may be longer
    than a socket path may be (107 bytes): the port forward still works."""
    deep = tmp_path / ("d" * 80) / ("e" * 80) / "state"
    deep_runtime = local_runtime_factory(deep)()
    assert isinstance(deep_runtime, LocalRuntime)
    try:
        if not deep_runtime.features.network:
            pytest.skip("no sandbox networking here: " + "; ".join(deep_runtime.features.notes))
        project = tmp_path / "deep-project"
        project.mkdir()
        (project / "serve.py").write_text(
            "import socket\ns = socket.socket(); s.bind(('0.0.0.0', 8888)); s.listen(8)\n"
            "print('listening', flush=True)\n"
            "while True:\n    c, _ = s.accept(); c.sendall(b'served'); c.close()\n"
        )
        spec = WorkloadSpec(
            id="deep-1",
            project_dir=project,
            command=("python3", "serve.py"),
            port=8888,
            network=NetworkPolicy.of(host_ports=(8443,)),
        )
        assert len(str(deep / spec.id / "slirp.sock")) > 108
        endpoint = deep_runtime.start(spec)
        assert endpoint is not None
        wait_for_log(deep_runtime, spec.id, b"listening")
        with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as conn:
            assert conn.recv(16) == b"served"
    finally:
        for workload_id in deep_runtime.list_workloads():
            deep_runtime.stop(workload_id, grace=0)
            deep_runtime.remove(workload_id)
        deep_runtime.close()
