"""The ``kiln runner`` process: a gRPC server with mutual TLS over the local runtime.

Start-up order matters: the certificate first (without it nothing can be served), then the
runtime and the re-attach to workloads a previous runner left running, and only then the
listener, so the first call already sees every surviving workload.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from kiln.pki.ca import CertificateAuthority
from kiln.rpc import runner_pb2_grpc
from kiln.rpc.authz import RUNNER_POLICY
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import CertificateRenewer
from kiln.rpc.server import secure_server
from kiln.runner.service import RunnerServicer
from kiln.runner.webaccess import local_web_access
from kiln.settings import Settings

log = logging.getLogger("kiln.runner")

# In-flight unary calls get this long to finish on SIGTERM; open streams are cut (a log
# follower or a terminal reconnects to the next runner, the workloads keep running).
SHUTDOWN_GRACE = 5.0


def runner_state_dir(settings: Settings) -> Path:
    return settings.runner.state_dir or settings.data_dir / "runner"


@dataclass
class RunningRunner:
    server: grpc.Server
    servicer: RunnerServicer
    renewer: CertificateRenewer
    port: int

    def stop(self, grace: float | None = SHUTDOWN_GRACE) -> None:
        """Stop serving. Workloads keep running; the next runner re-attaches to them."""
        self.server.stop(grace).wait()
        self.servicer.close()
        self.renewer.stop()


def start_runner(settings: Settings, *, port: int | None = None) -> RunningRunner:
    """Bring a runner up and return once it serves (``port=0``: any free port, for tests)."""
    from kiln.runtimes.local import LocalRuntime  # needs root: imported where it is used

    authority = CertificateAuthority(settings.pki_dir)
    renewer = CertificateRenewer(authority, Service.RUNNER)
    renewer.start()
    try:
        state = runner_state_dir(settings)
        runtime = LocalRuntime(state / "workloads", host_uid=settings.runner.host_uid)
        servicer = RunnerServicer(
            runtime,
            projects_root=settings.projects_dir,
            records_dir=state / "records",
            max_log_bytes=settings.runner.max_log_bytes,
            web=local_web_access(settings, state),
            runtimes_root=settings.runtimes_dir,
        )
    except BaseException:
        renewer.stop()
        raise
    try:
        servicer.reattach()
        address = f"{settings.runner.host}:{settings.runner.port if port is None else port}"
        server, bound = secure_server(
            CertFiles.for_service(settings.pki_dir, Service.RUNNER), address, RUNNER_POLICY
        )
        runner_pb2_grpc.add_RunnerServicer_to_server(servicer, server)
        server.start()
    except BaseException:
        servicer.close()
        renewer.stop()
        raise
    log.info("runner serving gRPC (mutual TLS) on %s:%d", settings.runner.host, bound)
    return RunningRunner(server, servicer, renewer, bound)


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT (the ``kiln runner`` command)."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    runner = start_runner(settings)
    try:
        stopping.wait()
    finally:
        runner.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
