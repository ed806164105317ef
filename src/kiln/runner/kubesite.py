"""The runner's side of the ``kubernetes`` runtime: the runtime built from the site's
settings, and what only the database knows (whose namespace, which image, which quota).

The runtime itself never touches the database: ``placement_resolver`` turns a start request
(user id, project id, runtime name) into a ``Placement`` (tenant, project, image) and
``quota_resolver`` a tenant into its ``Quota``; ``RunnerServicer`` calls the first for each
start, the runtime the second once per namespace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Project, Team, User
from kiln.db.workload_models import Runtime
from kiln.domain.resources import user_quota
from kiln.rpc import runner_pb2 as pb
from kiln.runtimes.base import Placement
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig
from kiln.runtimes.kubernetes.client import Kube
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Quota, Tenant, Toleration
from kiln.settings import Settings

log = logging.getLogger("kiln.runner")
COLLECT_SECONDS = 300.0

KINDS = {
    pb.WORKLOAD_KIND_SESSION: "session",
    pb.WORKLOAD_KIND_JOB_RUN: "job-run",
    pb.WORKLOAD_KIND_MODEL_REPLICA: "model-replica",
    pb.WORKLOAD_KIND_APPLICATION: "application",
    pb.WORKLOAD_KIND_BUILD: "build",
    pb.WORKLOAD_KIND_WORKER: "worker",
}


def parse_toleration(text: str) -> Toleration:
    """``key=value:Effect`` or ``key:Effect`` (effect defaults to NoSchedule)."""
    head, _, effect = text.partition(":")
    key, _, value = head.partition("=")
    if not key:
        raise ValueError(f"toleration {text!r}: expected key=value:Effect")
    return Toleration(key.strip(), value.strip(), effect.strip() or "NoSchedule")


def cluster_policy(settings: Settings) -> ClusterPolicy:
    k = settings.kubernetes
    return ClusterPolicy(
        workload_uid=settings.runner.host_uid,
        node_selector=dict(k.node_selector),
        tolerations=tuple(parse_toleration(t) for t in k.tolerations),
        storage_class=k.storage_class,
        nfs_server=k.nfs_server,
        nfs_path=k.nfs_path,
        host_path=k.host_path,
        web_namespace=k.namespace,
        web_port=k.web_port,
        egress=settings.runner.workload_egress,
        egress_deny=tuple(settings.runner.workload_egress_deny),
        cluster_cidrs=tuple(k.cluster_cidrs),
    )


def placement_resolver(
    sessions: sessionmaker[Session], settings: Settings
) -> Callable[[pb.WorkloadSpec], Placement]:
    """Whose namespace (the user's; a team project's team), which image (the runtime's in
    Kiln's registry, else the site's default), for one start request."""
    registry = settings.kubernetes.registry

    def resolve(proto: pb.WorkloadSpec) -> Placement:
        with sessions() as db:
            project = db.get(Project, proto.project_id)
            if project is None:
                raise ValueError(f"project {proto.project_id} does not exist")
            if project.owner_team_id is not None:
                team = db.get(Team, project.owner_team_id)
                kind, tenant = "team", team.name if team else project.owner_name
            else:
                user = db.get(User, proto.user_id) if proto.user_id else None
                kind, tenant = "user", user.username if user else project.owner_name
            image = ""
            if proto.runtime.id:
                runtime = db.scalar(select(Runtime).where(Runtime.name == proto.runtime.id))
                if runtime is not None and runtime.image_repository and runtime.image_digest:
                    repository = f"{runtime.image_repository}@{runtime.image_digest}"
                    image = f"{registry}/{repository}" if registry else repository
        return Placement(kind, tenant, proto.project_id, KINDS.get(proto.kind, "workload"), image)

    return resolve


def quota_resolver(
    sessions: sessionmaker[Session], settings: Settings
) -> Callable[[Tenant], Quota | None]:
    """A user's namespace gets the user's Kiln quota; a team's none (Kiln's own admission
    enforces team quotas: one namespace quota cannot express both)."""

    def resolve(tenant: Tenant) -> Quota | None:
        if tenant.kind != "user":
            return None
        with sessions() as db:
            user = db.scalar(select(User).where(User.username == tenant.name))
            if user is None:
                return None
            quota = user_quota(db, settings, user)
        return Quota(quota.cpu_millis, quota.memory_bytes, quota.gpu)

    return resolve


def kubernetes_runtime(
    settings: Settings, state_dir: Path, sessions: sessionmaker[Session] | None
) -> KubernetesRuntime:
    k = settings.kubernetes
    kube = Kube.from_kubeconfig(str(k.kubeconfig) if k.kubeconfig else None, k.context)
    credentials = (k.registry_username, k.registry_password)
    config = KubeRuntimeConfig(
        policy=cluster_policy(settings),
        default_image=k.default_image,
        registry=k.registry if k.registry_username else "",
        pull_credentials=(lambda tenant: credentials) if k.registry_username else None,
        quota=quota_resolver(sessions, settings) if sessions is not None else lambda t: None,
        runner_role=k.runner_role,
        runner_account=(k.namespace, k.runner_service_account) if k.runner_role else None,
        start_timeout=k.start_timeout,
        autoscaling=k.autoscaling,
    )
    return KubernetesRuntime(state_dir, kube, config)


def collect_deleted_projects(
    runtime: KubernetesRuntime, sessions: sessionmaker[Session], every: float = COLLECT_SECONDS
) -> threading.Thread:
    """Every ``every`` seconds, delete the cluster objects (claims, volumes) of projects no
    longer in the database: level-triggered, so a deletion the runner missed (it was down)
    is still cleaned up. Stops with the runtime."""

    def loop() -> None:
        while not runtime.closed.wait(every):
            try:
                with sessions() as db:
                    existing = set(db.scalars(select(Project.id)))
                for name in runtime.collect_projects(existing):
                    log.info("deleted %s: its project is gone", name)
            except Exception:
                log.exception("collecting deleted projects' volumes failed; retrying")

    thread = threading.Thread(target=loop, name="k8s-project-collector", daemon=True)
    thread.start()
    return thread
