"""`kiln up` as a user runs it: a supervisor with the web tier, the runner and the builder as
separate processes; a killed service comes back, SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.pki.ca import CertificateAuthority
from kiln.rpc import builder_pb2, builder_pb2_grpc, runner_pb2, runner_pb2_grpc
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import ensure_service_certificate
from kiln.rpc.tls import ServiceChannel
from tests.kiln_site import KilnSite

Site = KilnSite


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_kiln_up_serves_restarts_a_crashed_service_and_stops_cleanly(site: Site) -> None:
    site.wait_for_output("Kiln is up")
    assert any("First admin created" in line for line in site.lines)
    assert site.get("/api/v1/auth/me").status_code == 401
    r = httpx.post(
        f"https://localhost:{site.port}/api/v1/auth/api-keys",
        auth=("admin", "first-admin-password"),
        verify=str(site.data_dir / "pki" / "ca.crt"),
    )
    assert r.status_code == 201

    if os.geteuid() == 0:  # the runner needs root; it runs beside the web tier
        pki = site.data_dir / "pki"
        ensure_service_certificate(CertificateAuthority(pki), Service.WEB)
        site.wait_for_output("runner serving gRPC")
        with ServiceChannel(
            f"127.0.0.1:{site.runner_port}", Service.RUNNER, CertFiles.for_service(pki, Service.WEB)
        ) as channel:
            stub = runner_pb2_grpc.RunnerStub(channel.get())
            stub.Ping(runner_pb2.PingRequest(), timeout=10)
        site.wait_for_output("serving gRPC (mutual TLS) on 127.0.0.1:" + str(site.builder_port))
        with ServiceChannel(
            f"127.0.0.1:{site.builder_port}",
            Service.BUILDER,
            CertFiles.for_service(pki, Service.WEB),
        ) as channel:
            reply = builder_pb2_grpc.BuilderStub(channel.get()).Ping(
                builder_pb2.PingRequest(), timeout=10
            )
            assert reply.server_identity == "spiffe://kiln/builder"
            assert reply.caller_identity == "spiffe://kiln/web"

    web_pid = site.child_pid("web")
    os.kill(web_pid, signal.SIGKILL)
    site.wait_for_output("service web exited with code -9")
    site.wait_for_output("restarting web (restart #1)")
    deadline = time.monotonic() + 60
    while True:
        try:
            if site.get("/api/v1/auth/me").status_code == 401:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the web tier did not come back"
        time.sleep(0.2)
    assert site.child_pid("web") != web_pid

    site.proc.send_signal(signal.SIGTERM)
    assert site.proc.wait(timeout=30) == 0
    leftover = subprocess.run(
        ["pgrep", "-f", f"kiln.cli.main .* --data-dir {site.data_dir}"], capture_output=True
    )
    assert leftover.returncode == 1, leftover.stdout
