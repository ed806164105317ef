"""Kubernetes objects for Kiln's workloads, as pure functions over typed inputs.

Nothing here talks to a cluster: every function returns the manifest (a plain ``dict`` in
the API's own JSON shape) for the runtime to send, so each rule is unit-tested without one
(``tests/unit/test_k8s_manifests.py``) and the same builders serve the runtime and the docs.

What every tenant namespace holds (``namespace_objects``):

- the Namespace, labelled for Pod Security ``restricted`` (enforced, audited, warned);
- the registry pull secret (``kiln-registry``), so pods pull runtime images from Kiln;
- NetworkPolicies: deny everything, then allow the web tier in (to any port a workload
  declares) and egress per Kiln's policy (DNS; the web tier's HTTPS port; the outside world
  unless the site turned egress off, never the site's denied or cluster-internal networks);
- a ResourceQuota and a LimitRange from the user's Kiln quota (team quotas stay Kiln's own
  admission: one namespace quota cannot express both).

Per project a namespace may use: a PersistentVolume pre-bound to a claim in that namespace
(``project_volume`` + ``project_claim``), so a pod can mount only projects its tenant may
use. Per workload: the Pod and, with a declared port, a Service. Per distinct set of files
a workload is shown read-only (``files_config_map``: the runner's CA bundle and SDK at
``/run/kiln``), a ConfigMap named by its content, shared by every pod of the namespace.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.runtimes.base import SANDBOX_HOME, TOOL_STATE_ENV, WorkloadSpec
from kiln.runtimes.kubernetes import names

Manifest = dict[str, Any]

MANAGED_BY = {"app.kubernetes.io/managed-by": "kiln"}
WORKLOAD_LABEL = "kiln.dev/workload"
KIND_LABEL = "kiln.dev/kind"
PROJECT_LABEL = "kiln.dev/project"
TENANT_LABEL = "kiln.dev/tenant"
WORKLOAD_ID_ANNOTATION = "kiln.dev/workload-id"  # the id as Kiln knows it (may not be a label)
# Kept on every workload pod until the runtime has read its last status and output, so a
# stop (a delete) never loses how the workload ended.
FINALIZER = "kiln.dev/keep-until-read"
PULL_SECRET = "kiln-registry"  # noqa: S105 (a Secret's name, not a password)
CONTAINER = "workload"
WORKLOAD_PRIORITY = "kiln-workload"
HEADROOM_PRIORITY = "kiln-headroom"
TMP_VOLUME = "tmp"
PROJECT_VOLUME = "project"
# A ConfigMap holds at most 1 MiB in all (etcd's object limit); base64 and keys take a share.
FILES_MAX_BYTES = 700 * 1024
PSA_LEVEL = "restricted"


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def to_json(self) -> Manifest:
        operator = "Equal" if self.value else "Exists"
        out: Manifest = {"key": self.key, "operator": operator, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class ClusterPolicy:
    """Site-wide choices for every tenant namespace (from ``KubernetesSettings``)."""

    workload_uid: int = 8536
    # Where the compute pool's nodes are: pods select and tolerate them (and the cluster
    # autoscaler reads the same selector to know which node group to grow).
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    # Project files: an NFS export (``nfs_server`` + ``nfs_path``/<project id>), or, where no
    # NFS client exists (tests, one-node clusters), a host directory on every node.
    storage_class: str = "kiln-projects"
    nfs_server: str = ""
    nfs_path: str = "/"
    host_path: str = ""
    volume_capacity: str = "10Gi"  # informational for NFS/hostPath; Kiln enforces quotas
    # The web tier: the only one allowed in, and the one workloads may call (the Kiln API).
    web_namespace: str = "kiln"
    web_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/component": "web"}
    )
    web_port: int = 8443
    # Egress per Kiln's policy (``RunnerSettings.workload_egress[_deny]``), plus networks no
    # workload may reach in a cluster (the pod and service ranges, the API server).
    egress: bool = True
    egress_deny: tuple[str, ...] = ("169.254.0.0/16",)
    cluster_cidrs: tuple[str, ...] = ()
    dns_namespace: str = "kube-system"
    dns_pod_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})


@dataclass(frozen=True)
class Tenant:
    """Whose namespace a workload runs in: a user's own, or a team's for team projects."""

    kind: str  # "user" | "team"
    name: str  # Kiln's username / team name (user-controlled; sanitized here)

    def __post_init__(self) -> None:
        if self.kind not in ("user", "team"):
            raise ValueError(f"tenant kind must be user or team, not {self.kind!r}")

    @property
    def namespace(self) -> str:
        if self.kind == "user":
            return names.user_namespace(self.name)
        return names.team_namespace(self.name)


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (Kiln's user quota): the namespace's ResourceQuota."""

    cpu_millis: int
    memory_bytes: int
    gpu: int = 0


@dataclass(frozen=True)
class PodInput:
    """One workload's pod: the runtime spec plus where and from what image it runs."""

    spec: WorkloadSpec
    tenant: Tenant
    project_id: int
    image: str
    kind: str = "session"  # session, job-run, model-replica, application, build, worker
    pull_policy: str = "IfNotPresent"
    # The spec's read-only binds, as ConfigMaps of the namespace (``files_config_map``), in
    # the order of ``spec.readonly_binds``.
    files: Sequence[FilesMount] = ()


@dataclass(frozen=True)
class FilesMount:
    """A ConfigMap shown read-only at ``target``: a directory of ``items`` (key, relative
    path), or one file (``single``: ``target`` is the file itself)."""

    config_map: str
    target: str
    items: tuple[tuple[str, str], ...]
    single: bool = False


def files_config_map(
    namespace_name: str, files: Sequence[tuple[str, bytes]], target: str, single: bool = False
) -> tuple[Manifest, FilesMount]:
    """The ConfigMap holding ``files`` ((relative path, content), as the runtime read them
    from a read-only bind's host side) and how a pod mounts it. Its name is a digest of the
    content, so an unchanged bundle is one object per namespace, and a changed one a new
    object that new pods use (running ones keep theirs). ``ValueError`` when over
    ``FILES_MAX_BYTES``."""
    total = sum(len(data) for _, data in files)
    if total > FILES_MAX_BYTES:
        raise ValueError(
            f"the files bound at {target} hold {total} bytes; a pod can be shown at most "
            f"{FILES_MAX_BYTES} bytes this way (a ConfigMap)"
        )
    ordered = sorted(files)
    digest = hashlib.sha256()
    for path, content in ordered:
        digest.update(f"{path}\0{len(content)}\0".encode())
        digest.update(content)
    name = f"kiln-files-{digest.hexdigest()[:20]}"
    items = tuple((f"file-{n}", path) for n, (path, _) in enumerate(ordered))
    data = {
        key: base64.b64encode(content).decode()
        for (key, _), (_, content) in zip(items, ordered, strict=True)
    }
    manifest: Manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace_name),
        "binaryData": data,
        "immutable": True,
    }
    return manifest, FilesMount(name, target, items, single)


def _meta(name: str, namespace: str | None = None, **labels: str) -> Manifest:
    meta: Manifest = {"name": name, "labels": {**MANAGED_BY, **labels}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def cpu_quantity(cpu: float) -> str:
    """vCPU as a Kubernetes quantity in millicores (``1.5`` → ``"1500m"``)."""
    return f"{max(1, math.ceil(cpu * 1000))}m"


# ----------------------------------------------------------------- namespaces


def namespace(tenant: Tenant) -> Manifest:
    """The tenant's namespace, Pod Security ``restricted`` in all three modes."""
    metadata = _meta(tenant.namespace, **{TENANT_LABEL: tenant.kind})
    for mode in ("enforce", "audit", "warn"):
        metadata["labels"][f"pod-security.kubernetes.io/{mode}"] = PSA_LEVEL
    metadata["annotations"] = {f"kiln.dev/{tenant.kind}": tenant.name}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}


def pull_secret(namespace_name: str, registry: str, username: str, password: str) -> Manifest:
    """A ``kubernetes.io/dockerconfigjson`` Secret for Kiln's registry."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    config = {"auths": {registry: {"username": username, "password": password, "auth": auth}}}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": _meta(PULL_SECRET, namespace_name),
        "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    }


def network_policies(namespace_name: str, policy: ClusterPolicy) -> list[Manifest]:
    """Default-deny both ways, then exactly what Kiln allows."""
    everything: Manifest = {"podSelector": {}}
    deny_all = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("default-deny", namespace_name),
        "spec": {**everything, "policyTypes": ["Ingress", "Egress"]},
    }
    web_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": policy.web_namespace}},
        "podSelector": {"matchLabels": dict(policy.web_pod_labels)},
    }
    from_web = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("allow-from-web-tier", namespace_name),
        "spec": {**everything, "policyTypes": ["Ingress"], "ingress": [{"from": [web_peer]}]},
    }
    egress: list[Manifest] = [
        {  # name resolution
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": policy.dns_namespace}
                    },
                    "podSelector": {"matchLabels": dict(policy.dns_pod_labels)},
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        {  # the Kiln API (CDSW_API_URL, the Workers API), on its HTTPS port only
            "to": [web_peer],
            "ports": [{"protocol": "TCP", "port": policy.web_port}],
        },
    ]
    if policy.egress:
        never = sorted({*policy.egress_deny, *policy.cluster_cidrs})
        egress.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": never}}]})
    to_outside = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("allow-egress", namespace_name),
        "spec": {**everything, "policyTypes": ["Egress"], "egress": egress},
    }
    return [deny_all, from_web, to_outside]


def resource_quota(namespace_name: str, quota: Quota) -> Manifest:
    """The user's Kiln quota as the namespace's hard limits (requests = limits here)."""
    hard = {
        "requests.cpu": f"{quota.cpu_millis}m",
        "limits.cpu": f"{quota.cpu_millis}m",
        "requests.memory": str(quota.memory_bytes),
        "limits.memory": str(quota.memory_bytes),
        "requests.nvidia.com/gpu": str(quota.gpu),
    }
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta("kiln-quota", namespace_name),
        "spec": {"hard": hard},
    }


def limit_range(namespace_name: str, quota: Quota) -> Manifest:
    """Defaults for a container that names no resources, and no container above the quota."""
    default_cpu = f"{min(quota.cpu_millis, 1000)}m"
    default_memory = str(min(quota.memory_bytes, 2 * 1024**3))
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta("kiln-limits", namespace_name),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": default_cpu, "memory": default_memory},
                    "defaultRequest": {"cpu": default_cpu, "memory": default_memory},
                    "max": {"cpu": f"{quota.cpu_millis}m", "memory": str(quota.memory_bytes)},
                }
            ]
        },
    }


def namespace_objects(tenant: Tenant, policy: ClusterPolicy, quota: Quota | None) -> list[Manifest]:
    """Everything a tenant namespace holds before its first pod (not the pull secret: it
    carries a credential and is built by the runtime with ``pull_secret``)."""
    ns = tenant.namespace
    objects = [namespace(tenant), *network_policies(ns, policy)]
    if quota is not None:
        objects += [resource_quota(ns, quota), limit_range(ns, quota)]
    return objects


# ----------------------------------------------------------------- project files


def project_volume(
    policy: ClusterPolicy, namespace_name: str, project_id: int, claim_uid: str = ""
) -> Manifest:
    """A PV for one project's directory, pre-bound to its claim in ``namespace_name`` (no
    other namespace's claim can bind it). NFS in production; hostPath where none exists.

    With ``claim_uid`` (the claim made first) the volume names that very claim object, as a
    provisioner's volume does: the PV controller then binds the claim as soon as it sees the
    volume. Without it, binding can wait for the controller's periodic resync (15 s).
    """
    path = f"{(policy.nfs_path if policy.nfs_server else policy.host_path).rstrip('/')}"
    source: Manifest
    if policy.nfs_server:
        source = {"nfs": {"server": policy.nfs_server, "path": f"{path}/{project_id}"}}
    elif policy.host_path:
        source = {"hostPath": {"path": f"{path}/{project_id}", "type": "Directory"}}
    else:
        raise ValueError("set an NFS server (kubernetes.nfs_server) or a host path")
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": _meta(
            names.project_volume(namespace_name, project_id),
            **{PROJECT_LABEL: str(project_id), "kiln.dev/namespace": namespace_name},
        ),
        "spec": {
            "capacity": {"storage": policy.volume_capacity},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",  # the files are Kiln's, never deleted
            "storageClassName": policy.storage_class,
            "mountOptions": ["nosuid", "nodev"] if policy.nfs_server else [],
            "claimRef": {
                "namespace": namespace_name,
                "name": names.project_claim(project_id),
                **({"uid": claim_uid} if claim_uid else {}),
            },
            **source,
        },
    }


def project_claim(policy: ClusterPolicy, namespace_name: str, project_id: int) -> Manifest:
    """The claim a workload pod mounts, bound to exactly its project's PV (each names the
    other: ``volumeName`` here, ``claimRef`` there). Create it first, then the volume with
    the claim's uid (``project_volume``)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(
            names.project_claim(project_id), namespace_name, **{PROJECT_LABEL: str(project_id)}
        ),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": policy.storage_class,
            "volumeName": names.project_volume(namespace_name, project_id),
            "resources": {"requests": {"storage": policy.volume_capacity}},
        },
    }


# ----------------------------------------------------------------- workloads


def workload_labels(workload_id: str, kind: str, project_id: int) -> dict[str, str]:
    return {
        WORKLOAD_LABEL: names.label_value(workload_id),
        KIND_LABEL: kind,
        PROJECT_LABEL: str(project_id),
    }


def _environment(spec: WorkloadSpec) -> list[Manifest]:
    env = {
        "HOME": SANDBOX_HOME,
        "USER": "cdsw",
        "PYTHONUNBUFFERED": "1",
        **TOOL_STATE_ENV,
        **spec.env,  # the caller's merged environment wins over the defaults
    }
    return [{"name": key, "value": value} for key, value in env.items()]


def mounts_project(spec: WorkloadSpec) -> bool:
    """Whether the pod gets the project's claim at /home/cdsw: not a model replica (its
    image's own home) and not under a sized scratch directory there (which hides it)."""
    return spec.project_mount and not spec.home_is_scratch


def pod(policy: ClusterPolicy, work: PodInput) -> Manifest:
    """The workload's pod: restricted, non-root, read-only root, no service-account token,
    its project at /home/cdsw (a model replica: the image's own /home/cdsw, the code that was
    built, and no project volume), a private /tmp, requests = limits from its profile."""
    spec = work.spec
    spec.check()
    resources = {"cpu": cpu_quantity(spec.cpu), "memory": str(spec.memory_bytes)}
    container: Manifest = {
        "name": CONTAINER,
        "image": work.image,
        "imagePullPolicy": work.pull_policy,
        "command": list(spec.command),
        "workingDir": spec.working_dir,
        "env": _environment(spec),
        "resources": {"requests": resources, "limits": dict(resources)},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": policy.workload_uid,
            "runAsGroup": policy.workload_uid,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [],
        "stdin": False,
        "tty": False,
    }
    if declared := _declared_ports(spec):
        container["ports"] = [{"name": name, "containerPort": port} for name, port in declared]
    pod_spec: Manifest = {
        "containers": [container],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "priorityClassName": WORKLOAD_PRIORITY,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": policy.workload_uid,
            "runAsGroup": policy.workload_uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "imagePullSecrets": [{"name": PULL_SECRET}],
        "volumes": [],
    }
    if mounts_project(spec):
        claim = {"claimName": names.project_claim(work.project_id)}
        pod_spec["volumes"].append({"name": PROJECT_VOLUME, "persistentVolumeClaim": claim})
        container["volumeMounts"].append({"name": PROJECT_VOLUME, "mountPath": SANDBOX_HOME})
    if "/tmp" not in dict(spec.tmpfs):  # noqa: S108 (else the spec's own sized /tmp)
        pod_spec["volumes"].append(
            {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
        )
        container["volumeMounts"].append({"name": TMP_VOLUME, "mountPath": "/tmp"})  # noqa: S108
    for n, (path, size) in enumerate(spec.tmpfs):
        # Memory-backed: a tmpfs of exactly this size (ENOSPC when full), counted against
        # the container's memory limit, as the local runtime's is.
        volume = f"scratch-{n}"
        pod_spec["volumes"].append(
            {"name": volume, "emptyDir": {"medium": "Memory", "sizeLimit": str(size)}}
        )
        container["volumeMounts"].append({"name": volume, "mountPath": path})
    for n, files in enumerate(work.files):
        volume = f"files-{n}"
        items = [{"key": key, "path": path} for key, path in files.items]
        pod_spec["volumes"].append(
            {"name": volume, "configMap": {"name": files.config_map, "items": items,
                                            "defaultMode": 0o444}}
        )  # fmt: skip
        mount = {"name": volume, "mountPath": files.target, "readOnly": True}
        if files.single:
            mount["subPath"] = files.items[0][1]
        container["volumeMounts"].append(mount)
    if policy.node_selector:
        pod_spec["nodeSelector"] = dict(policy.node_selector)
    if policy.tolerations:
        pod_spec["tolerations"] = [t.to_json() for t in policy.tolerations]
    metadata = _meta(
        names.pod_name(spec.id),
        work.tenant.namespace,
        **workload_labels(spec.id, work.kind, work.project_id),
    )
    metadata["annotations"] = {WORKLOAD_ID_ANNOTATION: spec.id}
    metadata["finalizers"] = [FINALIZER]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _declared_ports(spec: WorkloadSpec) -> list[tuple[str, int]]:
    """(name, port) of every port the workload declares: its own (``workload``) and a
    session's web UI ports (``port-8100``: CDSW_APP_PORT, CDSW_READONLY_PORT)."""
    own = [("workload", spec.port)] if spec.port is not None else []
    return own + [(f"port-{port}", port) for port in spec.extra_ports if port != spec.port]


def service(work: PodInput) -> Manifest | None:
    """The ClusterIP Service the web tier reaches the declared ports through (None without)."""
    spec = work.spec
    declared = _declared_ports(spec)
    if not declared:
        return None
    labels = workload_labels(spec.id, work.kind, work.project_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.service_name(spec.id), work.tenant.namespace, **labels),
        "spec": {
            "type": "ClusterIP",
            "selector": {WORKLOAD_LABEL: labels[WORKLOAD_LABEL]},
            "ports": [{"name": name, "port": port, "targetPort": port} for name, port in declared],
        },
    }


def runner_binding(
    namespace_name: str,
    cluster_role: str,
    account_namespace: str,
    account: str,
    binding: str = "kiln-runner",
) -> Manifest:
    """Grant the runner's service account ``cluster_role`` inside one tenant namespace
    only: what the runner may do to pods, services, claims... is bound namespace by
    namespace, so outside Kiln's namespaces it may do nothing (the chart's RBAC). The
    builder, which runs install pods there, gets its own (``binding="kiln-builder"``)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(binding, namespace_name),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": account_namespace}],
    }


def priority_classes() -> list[Manifest]:
    """Workloads outrank the headroom placeholders (the chart installs these; a test keeps
    the two in step): a session's pod preempts a placeholder at once, and a placeholder
    never preempts anything."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": WORKLOAD_PRIORITY},
            "value": 1000,
            "globalDefault": False,
            "description": "Kiln workloads (sessions, jobs, models, applications)",
        },
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": HEADROOM_PRIORITY},
            "value": -10,
            "preemptionPolicy": "Never",
            "globalDefault": False,
            "description": "Kiln's headroom placeholders (evicted first, never evict anything)",
        },
    ]
