"""`kiln up` as a user runs it: a supervisor with the web tier and the runner as separate
processes; a killed service comes back, SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.pki.ca import CertificateAuthority
from kiln.rpc import runner_pb2, runner_pb2_grpc
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import ensure_service_certificate
from kiln.rpc.tls import ServiceChannel
from kiln.testing.live import free_port


class Site:
    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.port, self.runner_port = free_port(), free_port()
        env = dict(
            os.environ,
            KILN_ADMIN_PASSWORD="first-admin-password",
            KILN_RUNNER_PORT=str(self.runner_port),
        )
        env.pop("KILN_DATABASE_URL", None)  # the embedded default: SQLite
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.lines)}")
            time.sleep(0.1)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        ca = str(self.data_dir / "pki" / "ca.crt")
        return httpx.get(f"https://localhost:{self.port}{path}", verify=ca, **kwargs)  # type: ignore[arg-type]

    def child_pid(self, service: str) -> int:
        out = subprocess.run(
            ["pgrep", "-f", f"kiln.cli.main {service} --data-dir {self.data_dir}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(out) == 1, out
        return int(out[0])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.proc.kill()


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
