"""The committed gRPC stubs match the .proto files they were generated from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_regenerated_from_the_current_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_each_other_inside_the_kiln_package() -> None:
    from kiln.rpc import runner_pb2, runner_pb2_grpc

    assert runner_pb2_grpc.kiln_dot_rpc_dot_runner__pb2 is runner_pb2
    assert runner_pb2.DESCRIPTOR.package == "kiln.runner.v1"
