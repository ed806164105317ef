"""A thin JSON client for the few Kubernetes kinds Kiln writes, over the official client.

The official client's typed models cost a deserialisation per object and several times the
memory of the JSON; Kiln's runtime reads and writes plain dicts (the manifests of
``manifests.py``) through ``ApiClient.call_api`` instead, which keeps the official client's
configuration (kubeconfig, in-cluster service account, client certificates, exec plugins)
and its TLS handling. Every request is counted (``requests``), which is how the benchmark
shows that starts cost a constant number of calls, not a poll per pod.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API: group/version prefix, plural, namespaced or not."""

    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        out = self.prefix
        if self.namespaced and namespace is not None:
            out += f"/namespaces/{quote(namespace, safe='')}"
        out += f"/{self.plural}"
        if name is not None:
            out += f"/{quote(name, safe='')}"
        return out


KINDS: dict[str, Kind] = {
    "Namespace": Kind("/api/v1", "namespaces", namespaced=False),
    "PersistentVolume": Kind("/api/v1", "persistentvolumes", namespaced=False),
    "Node": Kind("/api/v1", "nodes", namespaced=False),
    "Pod": Kind("/api/v1", "pods"),
    "Service": Kind("/api/v1", "services"),
    "Secret": Kind("/api/v1", "secrets"),
    "Event": Kind("/api/v1", "events"),
    "ResourceQuota": Kind("/api/v1", "resourcequotas"),
    "LimitRange": Kind("/api/v1", "limitranges"),
    "PersistentVolumeClaim": Kind("/api/v1", "persistentvolumeclaims"),
    "ServiceAccount": Kind("/api/v1", "serviceaccounts"),
    "NetworkPolicy": Kind("/apis/networking.k8s.io/v1", "networkpolicies"),
    "RoleBinding": Kind("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PriorityClass": Kind("/apis/scheduling.k8s.io/v1", "priorityclasses", namespaced=False),
    "Deployment": Kind("/apis/apps/v1", "deployments"),
    # Kinds Kiln's chart installs (server-side dry runs, the security tests):
    "StatefulSet": Kind("/apis/apps/v1", "statefulsets"),
    "ConfigMap": Kind("/api/v1", "configmaps"),
    "Role": Kind("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "ClusterRole": Kind("/apis/rbac.authorization.k8s.io/v1", "clusterroles", namespaced=False),
    "ClusterRoleBinding": Kind(
        "/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", namespaced=False
    ),
    "StorageClass": Kind("/apis/storage.k8s.io/v1", "storageclasses", namespaced=False),
    "Ingress": Kind("/apis/networking.k8s.io/v1", "ingresses"),
    "ValidatingAdmissionPolicy": Kind(
        "/apis/admissionregistration.k8s.io/v1", "validatingadmissionpolicies", namespaced=False
    ),
    "ValidatingAdmissionPolicyBinding": Kind(
        "/apis/admissionregistration.k8s.io/v1",
        "validatingadmissionpolicybindings",
        namespaced=False,
    ),
}


class KubeError(Exception):
    """The API server refused a request; ``status`` is its HTTP status, ``reason`` its
    machine-readable reason (``AlreadyExists``, ``Forbidden``, ``Expired``...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _error(exc: ApiException) -> KubeError:
    raw = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
    reason, message = str(exc.reason or ""), str(raw or "")
    try:
        body = json.loads(raw or "{}")
        reason, message = body.get("reason", reason), body.get("message", message)
    except (TypeError, ValueError):
        pass
    return KubeError(int(exc.status or 0), reason, message)


class Kube:
    """JSON requests to one API server. Thread-safe (urllib3's pool is)."""

    def __init__(self, api: k8s_client.ApiClient, field_manager: str = "kiln") -> None:
        self.api = api
        self.field_manager = field_manager
        self._count_lock = threading.Lock()
        self.requests = 0  # every request sent, for the benchmark and tests

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> Kube:
        """From a kubeconfig file, or the pod's service account when ``path`` is None
        and the process runs in a cluster."""
        configuration = k8s_client.Configuration()
        if path is None:
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
            except k8s_config.ConfigException:
                k8s_config.load_kube_config(context=context, client_configuration=configuration)
        else:
            k8s_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration
            )
        return cls(k8s_client.ApiClient(configuration))

    def close(self) -> None:
        self.api.close()

    # ------------------------------------------------------------ raw requests

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = 30.0,
        stream: bool = False,
    ) -> Any:
        """One request; the parsed JSON reply (or, with ``stream``, the raw urllib3
        response: read it, then ``release_conn()``). Bodies are dicts (JSON)."""
        with self._count_lock:
            self.requests += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=timeout
            )
        except ApiException as exc:  # the connection failed (status 0)
            raise _error(exc) from None
        if response.status >= 400:
            data = response.read()
            raise _error(ApiException(status=response.status, reason=response.reason, body=data))
        if stream:
            return response.response
        data = response.read()
        return json.loads(data) if data else {}

    # ------------------------------------------------------------ objects

    def create(self, manifest: Manifest, dry_run: bool = False) -> Manifest:
        """POST the object; ``dry_run``: the server validates and admits it (every admission
        plugin and policy runs) but stores nothing."""
        kind = KINDS[manifest["kind"]]
        namespace = manifest["metadata"].get("namespace")
        query = {"dryRun": "All"} if dry_run else None
        return dict(self.call("POST", kind.path(namespace), query=query, body=manifest))

    def apply(self, manifest: Manifest, force: bool = True) -> Manifest:
        """Server-side apply: create or update to match, owned by Kiln's field manager."""
        kind = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        return dict(
            self.call(
                "PATCH",
                kind.path(meta.get("namespace"), meta["name"]),
                query={"fieldManager": self.field_manager, "force": "true" if force else None},
                body=manifest,
                content_type="application/apply-patch+yaml",
            )
        )

    def get(self, kind: str, name: str, namespace: str | None = None) -> Manifest:
        return dict(self.call("GET", KINDS[kind].path(namespace, name)))

    def delete(
        self,
        kind: str,
        name: str,
        namespace: str | None = None,
        grace_seconds: int | None = None,
        missing_ok: bool = True,
    ) -> None:
        body: Manifest = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        body["propagationPolicy"] = "Background"
        try:
            self.call("DELETE", KINDS[kind].path(namespace, name), body=body)
        except KubeError as exc:
            if not (missing_ok and exc.status == 404):
                raise

    def patch(
        self, kind: str, name: str, namespace: str | None, patch: Any, json_patch: bool = False
    ) -> Manifest:
        content_type = (
            "application/json-patch+json" if json_patch else "application/merge-patch+json"
        )
        return dict(
            self.call(
                "PATCH",
                KINDS[kind].path(namespace, name),
                body=patch,
                content_type=content_type,
            )
        )

    def list(
        self, kind: str, namespace: str | None = None, **query: Any
    ) -> tuple[list[Manifest], str]:
        """Every object (following ``continue``) and the list's resourceVersion."""
        items: list[Manifest] = []
        token: str | None = None
        while True:
            reply = self.call(
                "GET", KINDS[kind].path(namespace), query={**query, "continue": token}
            )
            items.extend(reply.get("items") or [])
            token = (reply.get("metadata") or {}).get("continue")
            if not token:
                return items, str(reply["metadata"].get("resourceVersion", ""))

    def watch(
        self, kind: str, resource_version: str, timeout_seconds: int = 300, **query: Any
    ) -> Iterator[Manifest]:
        """Watch events (``{"type", "object"}``) from ``resource_version``; ends when the
        server closes the watch. A ``410 Gone`` arrives as an ``ERROR`` event."""
        response = self.call(
            "GET",
            KINDS[kind].path(None),
            query={
                **query,
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": timeout_seconds,
            },
            timeout=(10.0, timeout_seconds + 30.0),
            stream=True,
        )
        try:
            pending = b""
            for chunk in response.stream(65536, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        except ProtocolError:
            return  # the server ended the watch (its timeout) mid-chunk: resume from here
        finally:
            response.release_conn()
