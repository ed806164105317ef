"""RealNode.wait_schedulable: a node stuck unschedulable fails each test promptly, naming why."""

import json
from pathlib import Path
from typing import Any

import pytest

from kiln.testing import kube
from kiln.testing.kube import RealNode

PRESSURE_TAINT = {"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"}


class StubPlane:
    """Answers the node's GET as the API server would, with the taints a test sets."""

    def __init__(self) -> None:
        self.taints: list[dict[str, str]] = []

    def get(self, path: str) -> str:
        assert path == "/api/v1/nodes/real-0"
        node: dict[str, Any] = {
            "spec": {"taints": self.taints},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok"},
                {"type": "DiskPressure", "status": "True" if self.taints else "False",
                 "reason": "KubeletHasDiskPressure", "message": "kubelet has disk pressure"},
            ]},
        }  # fmt: skip
        return json.dumps(node)


def stub_node(tmp_path: Path, plane: StubPlane) -> RealNode:
    return RealNode(
        plane=plane,  # type: ignore[arg-type]
        name="real-0",
        directory=tmp_path,
        address="127.0.0.2",
        bridge="kiln-test0",
        cgroup_root="kiln-test",
        socket=tmp_path / "containerd.sock",
    )


def test_a_node_under_pressure_fails_its_first_wait_naming_the_taint(tmp_path: Path) -> None:
    plane = StubPlane()
    plane.taints = [PRESSURE_TAINT]
    node = stub_node(tmp_path, plane)
    with pytest.raises(TimeoutError, match="disk-pressure") as raised:
        node.wait_schedulable(timeout=0.3)
    assert "KubeletHasDiskPressure" in str(raised.value)
    assert node.gave_up is not None and "disk-pressure" in node.gave_up


def test_after_giving_up_once_later_waits_are_short_until_the_node_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "UNSCHEDULABLE_RECHECK", 0.3)
    plane = StubPlane()
    plane.taints = [PRESSURE_TAINT]
    node = stub_node(tmp_path, plane)
    with pytest.raises(TimeoutError):
        node.wait_schedulable(timeout=0.3)
    # An hour asked for, the recheck's 0.3 s given: without the cut this test would hang
    # until pytest's timeout fails it.
    with pytest.raises(TimeoutError, match="in 0s"):
        node.wait_schedulable(timeout=3600)
    plane.taints = []
    node.wait_schedulable(timeout=3600)
    assert node.gave_up is None
