"""The ``kiln runner`` process: a gRPC server with mutual TLS over the local runtime.

Start-up order matters: the certificate first (without it nothing can be served), then the
runtime and the re-attach to workloads a previous runner left running, and only then the
listener, so the first call already sees every surviving workload.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from kiln.build.registry.gc import PeriodicGc
from kiln.db.engine import make_engine, make_sessionmaker
from kiln.pki.ca import CertificateAuthority
from kiln.rpc import runner_pb2_grpc
from kiln.rpc.authz import RUNNER_POLICY
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import CertificateRenewer
from kiln.rpc.server import secure_server, serve_until_signalled
from kiln.runner.inprocess import InProcessRunner
from kiln.runner.reconciler import Reconciler
from kiln.runner.service import RunnerServicer
from kiln.runner.webaccess import local_web_access, pod_web_access
from kiln.runner.webhooks import Policy, WebhookSender
from kiln.runtimes.base import EgressRule, NetworkPolicy, Placement, WorkloadRuntime
from kiln.settings import Settings
from kiln.storage.store import project_store

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
    reconciler: Reconciler | None = None
    webhooks: WebhookSender | None = None
    engine: Engine | None = None
    registry_gc: PeriodicGc | None = None

    def stop(self, grace: float | None = SHUTDOWN_GRACE) -> None:
        """Stop serving. Workloads keep running; the next runner re-attaches to them."""
        if self.reconciler is not None:
            self.reconciler.close()
        if self.registry_gc is not None:
            self.registry_gc.close()
        self.server.stop(grace).wait()
        self.servicer.close()
        self.renewer.stop()
        if self.webhooks is not None:
            self.webhooks.close()
        if self.engine is not None:
            self.engine.dispose()


def workload_network(settings: Settings, can_network: bool = True) -> NetworkPolicy:
    """Egress for every workload as the site allows it (never to this host: the runtime
    blocks its own addresses whatever the policy says). A host that cannot give sandboxes a
    network (no slirp4netns) runs them without one, said loudly, rather than failing them."""
    deny = tuple(EgressRule.parse(rule) for rule in settings.runner.workload_egress_deny)
    egress = settings.runner.workload_egress
    if egress and not can_network:
        log.error("workloads get no network: this host cannot give sandboxes one")
        egress = False
    return NetworkPolicy(egress=egress, deny=deny)


def webhook_policy(settings: Settings) -> Policy:
    """Job webhooks reach public addresses, plus the admin's allowed networks, and never
    Kiln's own listeners."""
    ports = {settings.web.port, settings.runner.port}
    db_port = make_url(settings.db_url).port
    if db_port:
        ports.add(db_port)
    elif settings.db_url.startswith("postgresql"):
        ports.add(5432)
    return Policy(
        allowed=[
            ipaddress.ip_network(n, strict=False) for n in settings.runner.webhook_allowed_networks
        ],
        blocked_ports=frozenset(ports),
    )


def start_reconciler(
    settings: Settings, servicer: RunnerServicer
) -> tuple[Reconciler, WebhookSender, Engine]:
    """The reconciler over the site's database, woken by Wake calls and workload exits."""
    engine = make_engine(settings.db_url)
    webhooks = WebhookSender(webhook_policy(settings))
    reconciler = Reconciler(
        make_sessionmaker(engine),
        InProcessRunner(servicer),
        settings,
        deliver=webhooks,
        interval=settings.runner.reconcile_interval,
    )
    servicer.on_change = reconciler.wake
    servicer.runtime.add_exit_listener(reconciler.on_exit)
    reconciler.start()
    return reconciler, webhooks, engine


def _kubernetes(
    settings: Settings, state: Path, with_database: bool
) -> tuple[WorkloadRuntime, Callable[[Any], Placement] | None]:
    """The kubernetes runtime; with a database, placements come from it (kubesite.py)."""
    from kiln.runner import kubesite

    sessions = make_sessionmaker(make_engine(settings.db_url)) if with_database else None
    runtime = kubesite.kubernetes_runtime(settings, state / "kubernetes", sessions)
    if sessions is None:
        return runtime, None
    kubesite.collect_deleted_projects(runtime, sessions)
    kubesite.provision_project_storage(runtime, sessions, settings.projects_dir)
    return runtime, kubesite.placement_resolver(sessions, settings)


def start_runner(
    settings: Settings, *, port: int | None = None, reconcile: bool = True
) -> RunningRunner:
    """Bring a runner up and return once it serves (``port=0``: any free port, for tests).
    ``reconcile=False`` serves the RPCs only (no database: the runtime-level tests)."""
    from kiln.runtimes.local import LocalRuntime  # needs root: imported where it is used

    authority = CertificateAuthority(settings.pki_dir)
    renewer = CertificateRenewer(authority, Service.RUNNER)
    renewer.start()
    try:
        state = runner_state_dir(settings)
        runtime: WorkloadRuntime
        placement = None
        if settings.runner.runtime == "kubernetes":
            runtime, placement = _kubernetes(settings, state, reconcile)
            can_network = True
            web = pod_web_access(settings, state)
        else:
            local = LocalRuntime(state / "workloads", host_uid=settings.runner.host_uid)
            runtime, can_network = local, local.features.network
            web = local_web_access(settings, state)
        servicer = RunnerServicer(
            runtime,
            projects_root=settings.projects_dir,
            records_dir=state / "records",
            max_log_bytes=settings.runner.max_log_bytes,
            web=web,
            runtimes_root=settings.runtimes_dir,
            network=workload_network(settings, can_network),
            volumes=project_store(settings).volumes,
            placement=placement,
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
    running = RunningRunner(server, servicer, renewer, bound)
    if reconcile:
        try:
            running.reconciler, running.webhooks, running.engine = start_reconciler(
                settings, servicer
            )
            if settings.registry.gc_interval_seconds > 0:
                running.registry_gc = PeriodicGc(make_sessionmaker(running.engine), settings)
                running.registry_gc.start()
        except BaseException:
            running.stop(grace=0)
            raise
    return running


def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT (the ``kiln runner`` command)."""
    serve_until_signalled(lambda: start_runner(settings), log)
