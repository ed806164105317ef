"""`kiln runner` as a real process: settings from the environment, serves mTLS gRPC, stops on
SIGTERM leaving its workloads running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from kiln.rpc import runner_pb2 as pb
from kiln.rpc.identity import Service
from kiln.rpc.runner_pb2_grpc import RunnerStub
from kiln.rpc.testing import TestPki
from kiln.rpc.tls import ServiceChannel
from kiln.runner.process import runner_state_dir
from kiln.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_settings_come_from_kiln_runner_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("KILN_RUNNER_PORT", "KILN_RUNNER_MAX_LOG_BYTES", "KILN_RUNNER_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.runner.port == 8450 and runner_state_dir(settings) == tmp_path / "runner"
    monkeypatch.setenv("KILN_RUNNER_PORT", "9451")
    monkeypatch.setenv("KILN_RUNNER_MAX_LOG_BYTES", "1234")
    settings = Settings(data_dir=tmp_path)
    assert (settings.runner.port, settings.runner.max_log_bytes) == (9451, 1234)


def test_kiln_runner_serves_until_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pki = TestPki(data / "pki")
    port = free_port()
    env = {**os.environ, "KILN_DATA_DIR": str(data), "KILN_RUNNER_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "runner"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    channel = ServiceChannel(f"127.0.0.1:{port}", Service.RUNNER, pki.files(Service.WEB))
    try:
        stub = RunnerStub(channel.get())
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = stub.Ping(pb.PingRequest(), timeout=1, wait_for_ready=True)
                break
            except grpc.RpcError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "the runner never answered"
        assert reply.server_identity == Service.RUNNER.spiffe_id
        assert reply.caller_identity == Service.WEB.spiffe_id
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
        assert proc.returncode == 0, output
        assert "re-attached 0 workload(s)" in output and "shutting down" in output
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
