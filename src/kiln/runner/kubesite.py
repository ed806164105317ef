"""The runner's side of the ``kubernetes`` runtime: the runtime built from the site's
settings, and what only the database knows (whose namespace, which image, which quota).

The runtime itself never touches the database: ``placement_resolver`` turns a start request
(user id, project id, runtime name) into a ``Placement`` (tenant, project, image) and
``quota_resolver`` a tenant into its ``Quota``; ``RunnerServicer`` calls the first for each
start, the runtime the second once per namespace. Both ask ``workload_tenant`` whose
namespace a workload runs in.

Project storage is made ahead of the first start: ``provision_project_storage`` (a runner
thread, level-triggered) gives every (tenant, project) pair that may run workloads its claim
and volume, and deletes the claims of users who may no longer use a project.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Collaborator, Project, Team, User
from kiln.db.workload_models import Runtime
from kiln.domain.authz import ACTION_ROLES, Action, effective_role
from kiln.domain.resources import user_quota
from kiln.rpc import runner_pb2 as pb
from kiln.runtimes.base import Placement
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig, names
from kiln.runtimes.kubernetes.client import Kube
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Quota, Tenant, Toleration
from kiln.settings import Settings

log = logging.getLogger("kiln.runner")
COLLECT_SECONDS = 300.0
PROVISION_SECONDS = 5.0
# Who may start workloads in a project (and so needs its claim): starting existing jobs
# takes ``operate``; sessions and new runs take ``write``, which includes it.
STARTS_WORKLOADS = ACTION_ROLES[Action.operate]

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


def workload_tenant(db: Session, project: Project, user: User | None) -> Tenant:
    """Whose namespace ``user``'s workloads in ``project`` run in: a team project's team's
    (whoever starts them), else the user's own (the owner's when no user is named)."""
    if project.owner_team_id is not None:
        team = db.get(Team, project.owner_team_id)
        return Tenant("team", team.name if team else project.owner_name)
    return Tenant("user", user.username if user else project.owner_name)


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
            user = db.get(User, proto.user_id) if proto.user_id else None
            tenant = workload_tenant(db, project, user)
            image = ""
            if proto.image_home and proto.runtime.image:  # a model build's image
                image = image_reference(settings, proto.runtime.image)
            elif proto.runtime.id:
                runtime = db.scalar(select(Runtime).where(Runtime.name == proto.runtime.id))
                if runtime is not None and runtime.image_repository and runtime.image_digest:
                    repository = f"{runtime.image_repository}@{runtime.image_digest}"
                    image = f"{registry}/{repository}" if registry else repository
        return Placement(
            tenant.kind, tenant.name, proto.project_id, KINDS.get(proto.kind, "workload"), image
        )

    return resolve


def image_reference(settings: Settings, repository: str) -> str:
    """What the cluster pulls for a build's image (``repository@digest``)."""
    registry = build_registry_host(settings)
    return f"{registry}/{repository}" if registry else repository


def build_registry_host(settings: Settings) -> str:
    """Where the cluster pulls what builds push (and their bases) from: the registry builds
    push to (``builder.registry_url``), else Kiln's own at the address the cluster knows it
    by (``kubernetes.registry``)."""
    if settings.builder.registry_url:
        return urlsplit(settings.builder.registry_url).netloc
    return settings.kubernetes.registry


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
    settings: Settings,
    state_dir: Path,
    sessions: sessionmaker[Session] | None,
    *,
    builder: bool = False,
) -> KubernetesRuntime:
    """The runner's runtime, or (``builder``) the builder's, for install pods: its own
    service account and RoleBinding, the same tenant role."""
    k = settings.kubernetes
    account = k.builder_service_account if builder else k.runner_service_account
    kube = Kube.from_kubeconfig(str(k.kubeconfig) if k.kubeconfig else None, k.context)
    credentials = (k.registry_username, k.registry_password)
    config = KubeRuntimeConfig(
        policy=cluster_policy(settings),
        default_image=k.default_image,
        registry=k.registry if k.registry_username else "",
        pull_credentials=(lambda tenant: credentials) if k.registry_username else None,
        quota=quota_resolver(sessions, settings) if sessions is not None else lambda t: None,
        runner_role=k.runner_role,
        runner_account=(k.namespace, account) if k.runner_role else None,
        binding_name="kiln-builder" if builder else "kiln-runner",
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


# ----------------------------------------------------------------- project storage


def storage_candidates(db: Session) -> list[tuple[Project, User | None]]:
    """Who works in which project, from the database: each team project once (its team's
    namespace, whoever starts), each personal project's owner and each collaborator whose
    role may start workloads (operator and above), active accounts only. Site admins, who may
    start anything, are not listed (a claim per project each): theirs is made at their first
    start and kept. ``may_start`` confirms each pair with the authorization rules."""
    pairs: list[tuple[Project, User | None]] = [
        (project, None)
        for project in db.scalars(select(Project).where(Project.owner_team_id.is_not(None)))
    ]
    owned = db.execute(
        select(Project, User)
        .join(User, User.id == Project.owner_user_id)
        .where(Project.owner_team_id.is_(None), User.is_active.is_(True))
    )
    pairs += [(project, user) for project, user in owned.all()]
    collaborating = db.execute(
        select(Project, User)
        .join(Collaborator, Collaborator.project_id == Project.id)
        .join(User, User.id == Collaborator.user_id)
        .where(
            Project.owner_team_id.is_(None),
            Collaborator.role >= STARTS_WORKLOADS,
            User.is_active.is_(True),
        )
    )
    pairs += [(project, user) for project, user in collaborating.all()]
    return pairs


def may_start(db: Session, project: Project, user: User | None) -> bool:
    """Whether ``user`` may start workloads in ``project`` (``authz``'s rules; a team
    project's namespace serves every user who may)."""
    if user is None:
        return project.owner_team_id is not None
    role = effective_role(db, user, project)
    return role is not None and role >= STARTS_WORKLOADS


def provision(
    runtime: KubernetesRuntime, tenant: Tenant, project_id: int, project_dir: Path
) -> None:
    """One pair's storage: the tenant's namespace objects (once per runtime), then the
    project's claim and volume, bound (what a first start would otherwise do)."""
    runtime.ensure_namespace(tenant)
    runtime.ensure_project(tenant.namespace, project_id, project_dir)


def provision_pass(
    runtime: KubernetesRuntime, sessions: sessionmaker[Session], projects_root: Path
) -> tuple[list[str], list[str]]:
    """One level-triggered pass: provision every pair that may run workloads and is not
    provisioned yet (no request for the others: ``project_provisioned`` reads the claims
    cache), then delete every claim in a user's or team's namespace for a project that
    tenant may no longer use (a removed or demoted collaborator, a disabled account, a
    deleted project). A failure for one pair is logged and retried on the next pass.
    Returns (provisioned, deleted), as ``namespace/claim`` names."""
    provisioned: list[str] = []
    deleted: list[str] = []
    with sessions() as db:
        todo: list[tuple[Tenant, int]] = []
        wanted: set[tuple[str, int]] = set()
        for project, user in storage_candidates(db):
            tenant = workload_tenant(db, project, user)
            key = (tenant.namespace, project.id)
            wanted.add(key)
            if runtime.project_provisioned(*key) or not may_start(db, project, user):
                continue
            todo.append((tenant, project.id))
        unwanted = _unwanted_claims(db, runtime, wanted)
    for tenant, project_id in dict.fromkeys(todo):
        try:
            provision(runtime, tenant, project_id, projects_root / str(project_id))
            provisioned.append(f"{tenant.namespace}/{names.project_claim(project_id)}")
        except Exception as exc:  # one pair's failure must not keep the others
            log.warning(
                "provisioning project %d's storage in %s failed (retrying): %s",
                project_id,
                tenant.namespace,
                exc,
            )
    for namespace, project_id in unwanted:
        try:
            deleted += runtime.delete_project_storage(namespace, project_id)[:1]
        except Exception as exc:
            log.warning(
                "deleting project %d's claim in %s failed (retrying): %s",
                project_id,
                namespace,
                exc,
            )
    return provisioned, deleted


def _unwanted_claims(
    db: Session, runtime: KubernetesRuntime, wanted: set[tuple[str, int]]
) -> list[tuple[str, int]]:
    """Claims in the cache that their namespace's tenant may no longer use. Namespaces
    that name no Kiln user or team are left alone (not Kiln's tenants: nothing to decide)."""
    claims = [key for key in runtime.project_claims() if key not in wanted]
    if not claims:
        return []
    users = {names.user_namespace(u.username): u for u in db.scalars(select(User))}
    teams = {names.team_namespace(t.name): t for t in db.scalars(select(Team))}
    unwanted = []
    for namespace, project_id in claims:
        project = db.get(Project, project_id)
        if namespace in teams:
            if project is None or project.owner_team_id != teams[namespace].id:
                unwanted.append((namespace, project_id))
        elif namespace in users:
            user = users[namespace]
            if (
                project is None
                or workload_tenant(db, project, user).namespace != namespace
                or not may_start(db, project, user)
            ):
                unwanted.append((namespace, project_id))
    return unwanted


def provision_project_storage(
    runtime: KubernetesRuntime,
    sessions: sessionmaker[Session],
    projects_root: Path,
    every: float = PROVISION_SECONDS,
) -> threading.Thread:
    """A pass at once, then every ``every`` seconds (``provision_pass``): a project's
    storage exists by the time its users start working in it, and goes when they may no
    longer. Stops with the runtime."""
    root = projects_root.resolve()

    def loop() -> None:
        while not runtime.closed.is_set():
            try:
                provisioned, deleted = provision_pass(runtime, sessions, root)
                for name in provisioned:
                    log.info("provisioned %s", name)
                for name in deleted:
                    log.info("deleted %s: its user may no longer use the project", name)
            except Exception:
                log.exception("provisioning project storage failed; retrying")
            runtime.closed.wait(every)

    thread = threading.Thread(target=loop, name="k8s-project-provisioner", daemon=True)
    thread.start()
    return thread
