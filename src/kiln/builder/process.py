"""The ``kiln builder`` process: the build queue worker plus its gRPC server (mutual TLS).

Start-up order: the certificate, the runtime for build sandboxes, recovery of builds a
previous builder left (before anything new is claimed), then the listener.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from kiln.build.target import ImageTarget, MissingTarget
from kiln.builder.base import TargetUnavailable, builder_state_dir, open_target
from kiln.builder.service import Builder, BuilderServicer
from kiln.db.engine import make_engine, make_sessionmaker
from kiln.pki.ca import CertificateAuthority
from kiln.rpc import builder_pb2_grpc
from kiln.rpc.authz import BUILDER_POLICY
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import CertificateRenewer
from kiln.rpc.server import secure_server, serve_until_signalled
from kiln.runner.process import workload_network
from kiln.runtimes.base import NetworkPolicy, WorkloadRuntime
from kiln.settings import Settings

log = logging.getLogger("kiln.builder")
SHUTDOWN_GRACE = 5.0


@dataclass
class RunningBuilder:
    server: grpc.Server
    builder: Builder
    renewer: CertificateRenewer
    engine: Engine
    target: ImageTarget
    port: int

    def stop(self, grace: float | None = SHUTDOWN_GRACE) -> None:
        self.builder.close()
        self.server.stop(grace).wait()
        self.builder.runtime.close()
        self.renewer.stop()
        self.target.close()
        self.engine.dispose()


def start_builder(
    settings: Settings, *, port: int | None = None, target: ImageTarget | None = None
) -> RunningBuilder:
    """Bring a builder up and return once it serves (``port=0``: any free port)."""
    authority = CertificateAuthority(settings.pki_dir)
    renewer = CertificateRenewer(authority, Service.BUILDER)
    renewer.start()
    engine = make_engine(settings.db_url)
    runtime: WorkloadRuntime | None = None
    try:
        if target is None:
            try:
                target = open_target(settings)
            except TargetUnavailable as exc:
                log.error("%s; builds will fail until one is set", exc)
                target = MissingTarget(str(exc))
        sessions = make_sessionmaker(engine)
        runtime, network = build_runtime(settings, sessions)
        builder = Builder(settings, sessions, target, runtime, network)
        builder.start()
    except BaseException:
        if runtime is not None:
            runtime.close()
        renewer.stop()
        engine.dispose()
        raise
    try:
        address = f"{settings.builder.host}:{settings.builder.port if port is None else port}"
        server, bound = secure_server(
            CertFiles.for_service(settings.pki_dir, Service.BUILDER), address, BUILDER_POLICY
        )
        builder_pb2_grpc.add_BuilderServicer_to_server(BuilderServicer(builder), server)
        server.start()
    except BaseException:
        builder.close()
        runtime.close()
        renewer.stop()
        engine.dispose()
        raise
    log.info(
        "builder %s serving gRPC (mutual TLS) on %s:%d", builder.name, settings.builder.host, bound
    )
    return RunningBuilder(server, builder, renewer, engine, target, bound)


def build_runtime(
    settings: Settings, sessions: sessionmaker[Session]
) -> tuple[WorkloadRuntime, NetworkPolicy]:
    """Where install steps run (``builder.runtime``): sandboxes of this machine's ``local``
    runtime, or pods (``kubernetes``; the pods' network is their namespace's policy)."""
    state = builder_state_dir(settings)
    if settings.builder.runtime == "kubernetes":
        from kiln.runner.kubesite import kubernetes_runtime

        pods = kubernetes_runtime(settings, state / "pods", sessions, builder=True)
        return pods, workload_network(settings)
    from kiln.runtimes.local import LocalRuntime  # needs root: imported where it is used

    local = LocalRuntime(state / "sandboxes", host_uid=settings.runner.host_uid)
    return local, workload_network(settings, local.features.network)


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT (the ``kiln builder`` command)."""
    serve_until_signalled(lambda: start_builder(settings), log)
