"""Tenant namespaces and project volumes: what the kubernetes runtime provisions before a
pod (``TenancyMixin``, mixed into ``KubernetesRuntime``).

Once per runtime instance and namespace: the Namespace, the runner's RoleBinding there (in a
cluster), then its policies, quota and pull secret. Once per namespace and project: the claim
and its volume, bound before the first pod. The runner's provisioner
(``kubesite.provision_project_storage``) calls both when a user starts working in a project,
so a first start usually finds them made; ``start`` still calls them (the fallback).
Level-triggered cleanup of deleted projects and of claims their users may no longer use.
Per distinct set of read-only files (a spec's ``readonly_binds``): an immutable ConfigMap
named by its content, made once per namespace (``ensure_files``).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kiln.runtimes.base import StartFailed
from kiln.runtimes.kubernetes import manifests, names
from kiln.runtimes.kubernetes.client import Kube, KubeError
from kiln.runtimes.kubernetes.informer import Informer
from kiln.runtimes.kubernetes.manifests import Tenant

log = logging.getLogger("kiln.runtimes.kubernetes")

Signature = list[tuple[str, int, int, int]]  # (relative path, inode, size, mtime_ns)
BindContents = tuple[list[tuple[str, bytes]], bool]  # (relative path, bytes), one file?

MANAGED = "app.kubernetes.io/managed-by=kiln"


class TenancyMixin:
    """Needs ``kube``, ``config`` (``KubeRuntimeConfig``), ``claims`` (an informer of
    Kiln's claims) and the two sets ``_namespaces`` and ``_claims``."""

    kube: Kube
    config: Any
    claims: Informer
    _namespaces: set[str]
    _claims: set[tuple[str, int]]
    _files: set[tuple[str, str]]
    _bind_cache: dict[Path, tuple[Signature, BindContents]]  # _bind_contents

    def files_for(
        self, namespace: str, binds: tuple[tuple[Path, str], ...]
    ) -> tuple[list[dict[str, Any]], list[manifests.FilesMount]]:
        """Each read-only bind as a ConfigMap of ``namespace`` and how the pod mounts it;
        sends nothing (``ensure_config_maps`` does). A pod cannot mount host paths (Pod
        Security ``restricted``), so what a workload is shown read-only travels as data:
        the runner's CA bundle and SDK, a few hundred KiB. ``StartFailed`` when a bind
        cannot be read or is too large for a ConfigMap."""
        made, mounts = [], []
        for host, target in binds:
            try:
                files, single = self._bind_contents(host)
                manifest, mount = manifests.files_config_map(namespace, files, target, single)
            except (OSError, ValueError) as exc:
                raise StartFailed(f"cannot show {target} to the pod: {exc}") from None
            made.append(manifest)
            mounts.append(mount)
        return made, mounts

    def ensure_config_maps(self, made: list[dict[str, Any]]) -> None:
        """Create each ConfigMap once per runtime instance: it is immutable and named by
        its content, so one that exists already (409) is the same."""
        for manifest in made:
            key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
            if key in self._files:
                continue
            try:
                self.kube.create(manifest)
            except KubeError as exc:
                if exc.status != 409:
                    raise
            self._files.add(key)

    def _bind_contents(self, host: Path) -> BindContents:
        """``read_bind(host)``, read again only when a file under it changed (by a walk of
        ``lstat``s): a session start then reads none of its bytes."""
        signature = bind_signature(host)
        cached = self._bind_cache.get(host)
        if cached is not None and cached[0] == signature:
            return cached[1]
        contents = read_bind(host)
        self._bind_cache[host] = (signature, contents)
        return contents

    def ensure_namespace(self, tenant: Tenant) -> str:
        """The tenant's namespace and everything in it (once per runtime instance).

        The namespace first, then (in a cluster) the runner's own RoleBinding in it, which
        is what allows everything after: the runner may write nothing in a namespace
        before it has bound its tenant role there.
        """
        ns = tenant.namespace
        if ns in self._namespaces:
            return ns
        namespace, *contents = manifests.namespace_objects(
            tenant, self.config.policy, self.config.quota(tenant)
        )
        self.kube.apply(namespace)
        if self.config.runner_role and self.config.runner_account:
            account_ns, account = self.config.runner_account
            self.kube.apply(
                manifests.runner_binding(
                    ns, self.config.runner_role, account_ns, account, self.config.binding_name
                )
            )
        if self.config.registry and self.config.pull_credentials is not None:
            user, password = self.config.pull_credentials(tenant)
            contents.append(manifests.pull_secret(ns, self.config.registry, user, password))
        for manifest in contents:
            self._apply_soon(manifest)
        self._namespaces.add(ns)
        return ns

    def _apply_soon(self, manifest: dict[str, Any], patience: float = 10.0) -> None:
        """Apply, retrying a refusal for a few seconds: a RoleBinding just made takes a
        moment to reach the API server's authorizer."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.kube.apply(manifest)
                return
            except KubeError as exc:
                if exc.status != 403 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _on_claim(self, kind: str, claim: dict[str, Any]) -> None:
        """Claims informer callback: a claim deleted (by the collector, the provisioner or
        an admin) is no longer known to be made, so the next ``ensure_project`` makes it
        again instead of trusting ``_claims``."""
        meta = claim.get("metadata") or {}
        project = str((meta.get("labels") or {}).get(manifests.PROJECT_LABEL, ""))
        if project.isdigit() and (kind == "DELETED" or meta.get("deletionTimestamp")):
            self._claims.discard((str(meta.get("namespace") or ""), int(project)))

    def project_provisioned(self, namespace: str, project_id: int) -> bool:
        """Whether the project's claim in ``namespace`` is made and Bound: known to this
        runtime, or (after a runner restart) Bound in the claims cache. No request."""
        if (namespace, project_id) in self._claims:
            return True
        claim = self.claims.get(namespace, names.project_claim(project_id)) or {}
        volume = names.project_volume(namespace, project_id)
        if (
            (claim.get("status") or {}).get("phase") == "Bound"
            and (claim.get("spec") or {}).get("volumeName") == volume
            and not (claim.get("metadata") or {}).get("deletionTimestamp")
        ):
            self._claims.add((namespace, project_id))
            return True
        return False

    def ensure_project(self, namespace: str, project_id: int, project_dir: Path) -> None:
        """The project's PV (pre-bound) and its claim in ``namespace`` (once each; nothing
        is sent when the claim is Bound already, ``project_provisioned``)."""
        if self.project_provisioned(namespace, project_id):
            return
        policy = self.config.policy
        if policy.host_path and not policy.nfs_server:
            # Where the nodes see project directories at the runner's own paths (tests, one
            # node): the PV points at the very directory the runner was given.
            policy = replace(policy, host_path=str(project_dir.parent))
        # The claim first, then the volume naming that claim's uid, as a provisioner does:
        # the PV controller queues the claim as soon as it sees such a volume and binds it
        # in milliseconds (a volume pre-bound by name only would wait for its 15 s resync).
        # Then wait for Bound, or the scheduler would call the first pod unschedulable
        # ("unbound immediate PersistentVolumeClaims") and back off.
        name = names.project_claim(project_id)
        if ((self.claims.get(namespace, name) or {}).get("metadata") or {}).get(
            "deletionTimestamp"
        ):
            # Deleted a moment ago (its user was removed, then added back) and held by a pod
            # still running: a new claim can be made only once the old one is gone.
            try:
                self.claims.wait_for(lambda: self.claims.get(namespace, name) is None, 30.0)
            except TimeoutError:
                raise StartFailed(
                    f"the project's volume claim {namespace}/{name} is being deleted (a pod "
                    "still uses it); try again once that workload has ended"
                ) from None
        claim = self.kube.apply(manifests.project_claim(policy, namespace, project_id))
        self.claims.observe(claim)
        name, uid = claim["metadata"]["name"], claim["metadata"]["uid"]
        self.kube.apply(manifests.project_volume(policy, namespace, project_id, uid))

        def phase() -> str:
            current = self.claims.get(namespace, name) or {}
            return str((current.get("status") or {}).get("phase") or "")

        try:
            self._wait_bound(namespace, name, phase)
        except TimeoutError:
            raise StartFailed(
                f"the project's volume claim {namespace}/{name} was not bound within 30s "
                "(is the controller manager running?)"
            ) from None
        self._claims.add((namespace, project_id))

    def collect_projects(self, existing: set[int]) -> list[str]:
        """Delete the volume claims and volumes of projects that no longer exist (level-
        triggered: the runner calls it with the ids in its database). Project files are
        the store's; only the cluster's objects go. Returns what was deleted."""
        deleted = []
        volumes, _ = self.kube.list("PersistentVolume", labelSelector=MANAGED)
        for volume in volumes:
            labels = volume["metadata"].get("labels") or {}
            project = labels.get(manifests.PROJECT_LABEL, "")
            if not project.isdigit() or int(project) in existing:
                continue
            namespace = labels.get("kiln.dev/namespace", "")
            try:
                if namespace:
                    deleted += self.delete_project_storage(namespace, int(project))
                else:
                    self.kube.delete("PersistentVolume", volume["metadata"]["name"])
                    deleted.append(volume["metadata"]["name"])
            except KubeError as exc:  # one refusal must not keep the rest: said, retried later
                log.warning("cannot delete project %s's volume in %s: %s", project, namespace, exc)
        return deleted

    def delete_project_storage(self, namespace: str, project_id: int) -> list[str]:
        """Delete the project's claim in ``namespace`` and the volume bound to it (the files
        stay: the volume's reclaim policy is Retain, and they are the store's). A pod still
        mounting the claim keeps it until that pod ends (Kubernetes' claim protection); no
        new pod can mount it. Returns the names deleted."""
        claim = names.project_claim(project_id)
        volume = names.project_volume(namespace, project_id)
        self._claims.discard((namespace, project_id))
        self.kube.delete("PersistentVolumeClaim", claim, namespace)
        self.kube.delete("PersistentVolume", volume)
        return [f"{namespace}/{claim}", volume]

    def project_claims(self) -> list[tuple[str, int]]:
        """(namespace, project id) of every project claim in the claims cache that is not
        being deleted (no request)."""
        found = []
        for claim in self.claims.items():
            meta = claim.get("metadata") or {}
            project = str((meta.get("labels") or {}).get(manifests.PROJECT_LABEL, ""))
            if project.isdigit() and not meta.get("deletionTimestamp"):
                found.append((str(meta.get("namespace") or ""), int(project)))
        return found

    def _wait_bound(self, namespace: str, name: str, phase: Callable[[], str]) -> None:
        """Until the claim is Bound. The PV controller usually binds at once; when its claim
        sync raced the volume's arrival in its cache it would wait for its 15 s resync, so
        after a moment an annotation nudges it (any update re-queues the claim)."""
        deadline = time.monotonic() + 30.0
        nudges = 0
        while True:
            try:
                self.claims.wait_for(lambda: phase() == "Bound", min(0.05 * 2**nudges, 5.0))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
            nudges += 1
            self.kube.patch(
                "PersistentVolumeClaim",
                name,
                namespace,
                {"metadata": {"annotations": {"kiln.dev/bind-nudge": str(nudges)}}},
            )


def _regular_files(host: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(path relative to ``host``, path, lstat) of each regular file under a directory,
    sorted; symbolic links and special files are left out."""
    found = []
    for root, dirs, names_here in os.walk(host):
        dirs.sort()
        for name in sorted(names_here):
            path = Path(root) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found.append((path.relative_to(host).as_posix(), path, info))
    return found


def bind_signature(host: Path) -> Signature:
    """What changes when a file under ``host`` is written or replaced."""
    if not host.is_dir() or host.is_symlink():
        info = host.lstat()
        return [(host.name, info.st_ino, info.st_size, info.st_mtime_ns)]
    return [
        (relative, info.st_ino, info.st_size, info.st_mtime_ns)
        for relative, _, info in _regular_files(host)
    ]


def read_bind(host: Path) -> BindContents:
    """The regular files of a bind's host side, as (path relative to it, content), and
    whether it is one file. Symbolic links and special files are left out; reading stops
    once past ``manifests.FILES_MAX_BYTES`` (the caller then refuses it)."""
    if host.is_file() and not host.is_symlink():
        return [(host.name, host.read_bytes())], True
    if not host.is_dir() or host.is_symlink():
        raise ValueError(f"{host} is not a directory or a regular file")
    files: list[tuple[str, bytes]] = []
    total = 0
    for relative, path, _ in _regular_files(host):
        data = path.read_bytes()
        files.append((relative, data))
        total += len(data)
        if total > manifests.FILES_MAX_BYTES:
            break
    return files, False
