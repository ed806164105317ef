"""Test doubles for internal gRPC: a CA in a temporary directory and an echoing Runner.

``EchoRunner`` is not a runner: it answers every RPC shape (unary, server stream,
bidirectional stream) from memory so mTLS and authorization can be tested on a real server and
port before, and independently of, the real runner service.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kiln.pki.ca import CertificateAuthority, IssuedCert, save_leaf
from kiln.rpc import runner_pb2, runner_pb2_grpc
from kiln.rpc.authz import RUNNER_POLICY, Policy, caller_identity
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import ensure_service_certificate
from kiln.rpc.server import secure_server


@dataclass
class TestPki:
    """Kiln's CA and service certificates under ``directory`` (a test's tmp_path)."""

    __test__ = False  # not a pytest test class
    directory: Path

    def __post_init__(self) -> None:
        self.authority = CertificateAuthority(self.directory)
        self.ca = self.authority.load_or_create()

    def files(self, service: Service) -> CertFiles:
        ensure_service_certificate(self.authority, service)
        return CertFiles.for_service(self.directory, service)

    def write(self, name: str, leaf: IssuedCert, ca: IssuedCert | None = None) -> CertFiles:
        """Store an arbitrary leaf (foreign CA, expired, odd SANs) as a usable file set that
        trusts Kiln's CA."""
        cert, key = (
            self.directory / "extra" / f"{name}.crt",
            self.directory / "extra" / f"{name}.key",
        )
        save_leaf(leaf, ca or self.ca, cert, key)
        return CertFiles(cert, key, self.authority.cert_path)


@dataclass
class EchoRunner(runner_pb2_grpc.RunnerServicer):
    """Records who called what, with which client certificate."""

    calls: list[tuple[str, str | None]] = field(default_factory=list)
    peer_certs: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append((method, caller_identity(context)))
            self.peer_certs.extend(context.auth_context().get("x509_pem_cert", []))

    def Ping(self, request: Any, context: grpc.ServicerContext) -> runner_pb2.PingReply:
        self._record("Ping", context)
        return runner_pb2.PingReply(
            server_identity=Service.RUNNER.spiffe_id,
            caller_identity=caller_identity(context) or "",
            version="echo",
        )

    def GetStatus(
        self, request: runner_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> runner_pb2.WorkloadStatus:
        self._record("GetStatus", context)
        return runner_pb2.WorkloadStatus(
            workload_id=request.workload_id, state=runner_pb2.WORKLOAD_STATE_RUNNING
        )

    def StreamLogs(
        self, request: runner_pb2.StreamLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[runner_pb2.LogChunk]:
        self._record("StreamLogs", context)
        offset = request.offset
        for line in (b"hello\n", b"world\n"):
            yield runner_pb2.LogChunk(offset=offset, data=line)
            offset += len(line)

    def Exec(
        self, requests: Iterator[runner_pb2.ExecInput], context: grpc.ServicerContext
    ) -> Iterator[runner_pb2.ExecOutput]:
        self._record("Exec", context)
        for message in requests:
            if message.HasField("stdin"):
                yield runner_pb2.ExecOutput(stdout=message.stdin)
            elif message.HasField("close_stdin"):
                break
        yield runner_pb2.ExecOutput(exit=runner_pb2.ExecExit(exit_code=0))


@contextmanager
def running_runner(
    files: CertFiles, servicer: EchoRunner, policy: Policy = RUNNER_POLICY
) -> Iterator[int]:
    """A real gRPC server with ``servicer`` on 127.0.0.1; yields its port."""
    server, port = secure_server(files, "127.0.0.1:0", policy, max_workers=8)
    runner_pb2_grpc.add_RunnerServicer_to_server(servicer, server)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()
