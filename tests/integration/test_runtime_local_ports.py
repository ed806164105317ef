"""Declared ports of the local runtime: the main ``port`` and ``extra_ports`` are each reachable
from the host at their own endpoint, whether the app inside listens on the sandbox's loopback
(CML's advice: ``127.0.0.1:$CDSW_APP_PORT``) or on every address; the endpoints survive a
runtime that re-attaches; a port not declared gets no endpoint."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kiln.runtimes import WorkloadSpec
from kiln.runtimes.base import NetworkPolicy
from kiln.testing.runtime_contract import local_runtime_factory

pytestmark = pytest.mark.timeout(120)

SERVE = (
    "python3 -m http.server --bind 127.0.0.1 8100 & "
    "python3 -m http.server --bind 0.0.0.0 8101 & "
    "python3 -m http.server --bind 127.0.0.1 8888 & "
    "python3 -m http.server --bind 127.0.0.1 9999 & "  # not declared: never reachable
    "wait"
)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_answering(url: str) -> None:
    deadline = time.monotonic() + 30
    while not answers(url):
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.2)


def test_every_declared_port_is_reachable_and_nothing_else(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "index.html").write_text("hello from the sandbox")
    runtime = local_runtime_factory(tmp_path / "state")()
    spec = WorkloadSpec(
        id="ports",
        project_dir=project,
        command=("sh", "-c", SERVE),
        port=8888,
        extra_ports=(8100, 8101),
        network=NetworkPolicy(egress=False),
    )
    try:
        endpoint = runtime.start(spec)
        assert endpoint is not None
        status = runtime.status(spec.id)
        assert set(status.port_endpoints) == {8888, 8100, 8101}
        assert status.port_endpoints[8888] == endpoint
        for port, found in status.port_endpoints.items():
            wait_until_answering(found.url)
            assert "hello from the sandbox" in httpx.get(f"{found.url}/index.html").text, port
        assert len({e.port for e in status.port_endpoints.values()}) == 3

        # A new runtime instance re-attaches with the same endpoints.
        state = runtime.get_state(spec.id)
        runtime.close()
        runtime = local_runtime_factory(tmp_path / "state")()
        runtime.load_state(state)
        again = runtime.status(spec.id)
        assert again.port_endpoints == status.port_endpoints
        assert answers(again.port_endpoints[8100].url)
    finally:
        runtime.stop(spec.id, grace=0)
        assert runtime.status(spec.id).port_endpoints == {}
        runtime.remove(spec.id)
        runtime.close()


def test_bad_extra_ports_are_refused(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for ports in ((0,), (70000,), (8100, 8100), (8888,)):
        spec = WorkloadSpec(
            id="bad", project_dir=project, command=("true",), port=8888, extra_ports=ports
        )
        with pytest.raises(ValueError, match="extra_ports"):
            spec.check()
