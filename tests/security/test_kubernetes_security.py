"""Security of the kubernetes runtime, checked by the test API server itself.

- The runner's service account, with exactly the chart's RBAC and admission policy, can do
  everything a start needs in Kiln's namespaces and nothing outside them; so can the
  builder's (its install pods), under its own binding.
- Pod Security ``restricted`` refuses host networking, privilege and host paths in a tenant
  namespace, whoever asks.
- A user's pod cannot mount another user's project volume.
- NetworkPolicies admit only the web tier (no CNI enforces them here: the objects are what
  the API server stores, and what any enforcing CNI reads).
- A deleted project leaves no claim or volume behind.
- Only kiln-pki, with the chart's RBAC alone, reads the CA's key; it delivers every
  service's certificate as a Secret and rotates them (near expiry, or after a new CA).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kiln.pki.ca import IssuedCert, issue_certificate
from kiln.pki.cluster import CLUSTER_LIFETIME, SERVICES, issue_secrets
from kiln.runtimes.base import Placement, WorkloadSpec
from kiln.runtimes.kubernetes import KubernetesRuntime, KubeRuntimeConfig
from kiln.runtimes.kubernetes.client import Kube, KubeError
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, Tenant, Toleration
from kiln.testing import tools

pytestmark = pytest.mark.slow

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "kiln"
RELEASE_NS = "kiln-sec"
RUNNER = f"system:serviceaccount:{RELEASE_NS}:kiln-runner"
PKI = f"system:serviceaccount:{RELEASE_NS}:kiln-pki"
RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Role", "RoleBinding",
              "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")  # fmt: skip


def as_runner(kubeconfig: Path, account: str = RUNNER) -> Kube:
    """The admin's connection, impersonating the runner's (or another) service account."""
    kube = Kube.from_kubeconfig(str(kubeconfig))
    kube.api.set_default_header("Impersonate-User", account)
    kube.api.set_default_header("Impersonate-Group", "system:serviceaccounts")
    return kube


@pytest.fixture(scope="module")
def chart_rbac(kube_cluster: Any) -> Iterator[Kube]:
    """The chart's RBAC objects and admission policy, rendered by helm, in the cluster."""
    helm = tools.require("helm", "rendering the chart's RBAC")
    out = subprocess.run(
        [str(helm), "template", "kiln", str(CHART), "-n", RELEASE_NS,
         "--set", "database.url=postgresql+psycopg://k@db/k"],
        capture_output=True, text=True, check=True, timeout=120,
        env=dict(os.environ, HELM_CACHE_HOME="/tmp/kiln-helm-cache"),
    ).stdout  # fmt: skip
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NS}})
    applied = []
    for doc in yaml.safe_load_all(out):
        if doc and doc["kind"] in RBAC_KINDS:
            if doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
                doc["metadata"]["namespace"] = RELEASE_NS
            admin.apply(doc)
            applied.append(doc)
    time.sleep(1.0)  # the policy reaches the admission plugin's informer
    yield admin
    for doc in applied:
        if doc["metadata"].get("namespace") is None:
            admin.delete(doc["kind"], doc["metadata"]["name"])
    admin.delete("Namespace", RELEASE_NS)
    admin.close()


# The chart's two workload-starting service accounts; each binds the tenant role under a
# RoleBinding of its own name.
ACCOUNTS = ("kiln-runner", "kiln-builder")


def account_user(account: str) -> str:
    return f"system:serviceaccount:{RELEASE_NS}:{account}"


def runtime_as_runner(
    kube_cluster: Any, tmp_path: Path, account: str = "kiln-runner"
) -> KubernetesRuntime:
    return KubernetesRuntime(
        tmp_path / "state",
        as_runner(kube_cluster.kubeconfig, account_user(account)),
        KubeRuntimeConfig(
            policy=ClusterPolicy(
                node_selector={"kiln.dev/pool": "compute"},
                tolerations=(Toleration("kiln.dev/pool", "compute"),),
                host_path=str(tmp_path),
            ),
            default_image="registry.kiln.test/runtimes/python:1",
            runner_role="kiln-tenant",
            runner_account=(RELEASE_NS, account),
            binding_name=account,
            start_timeout=30,
        ),
    )


def spec_for(tmp_path: Path, user: str, project_id: int, workload_id: str) -> WorkloadSpec:
    project = tmp_path / str(project_id)
    project.mkdir(exist_ok=True)
    return WorkloadSpec(
        id=workload_id,
        project_dir=project,
        command=("sleep", "infinity"),
        cpu=0.1,
        memory_bytes=64 * 1024**2,
        placement=Placement("user", user, project_id, "session"),
    )


def refused(call: Any, *args: Any) -> KubeError:
    """RBAC refuses with 403; admission (the policy, Pod Security) with 403 or 422."""
    with pytest.raises(KubeError) as info:
        call(*args)
    assert info.value.status in (403, 422), info.value
    assert "forbidden" in info.value.message.lower(), info.value
    return info.value


def pod(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "c", "image": "x", "command": ["sleep", "1"]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [container], **spec},
    }


# ----------------------------------------------------------------- RBAC


@pytest.mark.parametrize("account", ACCOUNTS)
def test_the_runner_can_start_workloads_with_the_charts_rbac_alone(
    chart_rbac: Kube, kube_cluster: Any, tmp_path: Path, account: str
) -> None:
    runtime = runtime_as_runner(kube_cluster, tmp_path, account)
    try:
        spec = spec_for(tmp_path, f"rbac-{account}", 501, "rbac-session")
        runtime.start(spec)  # namespace, its own binding, policies, quota, PV, claim, pod
        assert runtime.status(spec.id).running
        runtime.stop(spec.id, grace=1)
        runtime.remove(spec.id)
    finally:
        runtime.close()


@pytest.mark.parametrize("account", ACCOUNTS)
def test_the_runner_is_refused_outside_kilns_namespaces(
    chart_rbac: Kube, kube_cluster: Any, account: str
) -> None:
    runner = as_runner(kube_cluster.kubeconfig, account_user(account))
    try:
        refused(runner.create, pod("default", "intruder"))
        refused(runner.get, "Secret", "anything", "kube-system")
        refused(runner.delete, "Namespace", "kube-system")
        refused(runner.create, {"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": "not-kiln"}})  # fmt: skip
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "grab", "namespace": "default"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kiln-tenant",
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": RELEASE_NS}],
        }
        error = refused(runner.create, binding)  # binding itself outside kiln-*: the policy
        assert "kiln-u-" in error.message
        binding["metadata"]["namespace"] = f"kiln-u-rbac-{account}"  # made by the test above
        binding["roleRef"]["name"] = "cluster-admin"
        refused(runner.create, binding)  # a stronger role, even inside: RBAC and the policy
        refused(runner.delete, "Pod", "anything", "kube-system")
        refused(
            runner.call,
            "GET",
            "/api/v1/namespaces/kube-system/configmaps",
        )
    finally:
        runner.close()


# ----------------------------------------------------------------- Pod Security


@pytest.mark.parametrize(
    "spec",
    [
        {"hostNetwork": True},
        {"container": {"securityContext": {"privileged": True}}},
        {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
        {"container": {"securityContext": {"runAsUser": 0}}},
    ],
    ids=["host-network", "privileged", "host-path", "root"],
)
def test_restricted_namespaces_refuse_escapes(
    kube_cluster: Any, tmp_path: Path, spec: dict[str, Any]
) -> None:
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    runtime = KubernetesRuntime(
        tmp_path / "state", admin, KubeRuntimeConfig(default_image="x", start_timeout=10)
    )
    try:
        namespace = runtime.ensure_namespace(Tenant("user", "psa-mallory"))
        error = refused(admin.create, pod(namespace, "escape", **spec))  # even for an admin
        if "privileged" in str(spec):  # the API server's own flag refuses it even earlier
            assert "disallowed by cluster policy" in error.message
        else:
            assert "violates PodSecurity" in error.message and "restricted" in error.message
    finally:
        runtime.close()


# ----------------------------------------------------------------- volumes


def test_a_user_cannot_claim_another_users_project_volume(
    kube_cluster: Any, tmp_path: Path
) -> None:
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    runtime = KubernetesRuntime(
        tmp_path / "state",
        admin,
        KubeRuntimeConfig(
            policy=ClusterPolicy(host_path=str(tmp_path)), default_image="x", start_timeout=10
        ),
    )
    try:
        alice = runtime.ensure_namespace(Tenant("user", "vol-alice"))
        bob = runtime.ensure_namespace(Tenant("user", "vol-bob"))
        (tmp_path / "77").mkdir()
        runtime.ensure_project(alice, 77, tmp_path / "77")
        volume = f"{alice}-project-77"
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "steal", "namespace": bob},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "kiln-projects",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        admin.create(claim)
        time.sleep(3)
        assert admin.get("PersistentVolumeClaim", "steal", bob)["status"]["phase"] == "Pending"
        pv = admin.get("PersistentVolume", volume)
        assert pv["spec"]["claimRef"]["namespace"] == alice  # still alice's, bound to hers
        # And a pod in bob's namespace can only name bob's claims (claims are namespaced).
        bobs = pod(bob, "reader", volumes=[{"name": "p", "persistentVolumeClaim":
                                            {"claimName": "project-77"}}])  # fmt: skip
        del bobs  # nothing named project-77 exists in bob's namespace to mount
        with pytest.raises(KubeError) as missing:
            admin.get("PersistentVolumeClaim", "project-77", bob)
        assert missing.value.status == 404
    finally:
        runtime.close()


# ----------------------------------------------------------------- network policies


def test_network_policies_admit_only_the_web_tier(kube_cluster: Any, tmp_path: Path) -> None:
    admin = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    runtime = KubernetesRuntime(
        tmp_path / "state",
        admin,
        KubeRuntimeConfig(
            policy=ClusterPolicy(cluster_cidrs=("10.96.0.0/12", "10.244.0.0/16")),
            default_image="x",
        ),
    )
    try:
        namespace = runtime.ensure_namespace(Tenant("user", "net-carol"))
        stored, _ = admin.list("NetworkPolicy", namespace)
        by_name = {p["metadata"]["name"]: p["spec"] for p in stored}
        assert by_name["default-deny"]["podSelector"] == {}
        assert set(by_name["default-deny"]["policyTypes"]) == {"Ingress", "Egress"}
        peers = [
            peer
            for spec in by_name.values()
            for rule in spec.get("ingress", [])
            for peer in rule.get("from", [])
        ]
        assert peers == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kiln"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "web"}},
            }
        ]  # no other namespace, no other pod, reaches a workload
        blocks = [
            peer["ipBlock"]
            for rule in by_name["allow-egress"]["egress"]
            for peer in rule.get("to", [])
            if "ipBlock" in peer
        ]
        assert blocks == [
            {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16", "10.96.0.0/12", "169.254.0.0/16"]}
        ]  # other pods (and their namespaces), services and cloud metadata: never
    finally:
        runtime.close()


# ----------------------------------------------------------------- project deletion


def test_a_deleted_project_leaves_no_objects(
    chart_rbac: Kube, kube_cluster: Any, tmp_path: Path
) -> None:
    runtime = runtime_as_runner(kube_cluster, tmp_path)
    admin = chart_rbac
    try:
        spec = spec_for(tmp_path, "gone-dave", 909, "gone-session")
        runtime.start(spec)
        namespace = runtime.get_state(spec.id)["namespace"]
        runtime.stop(spec.id, grace=1)
        runtime.remove(spec.id)
        volumes, _ = admin.list("PersistentVolume", labelSelector="kiln.dev/project")
        others = {int(v["metadata"]["labels"]["kiln.dev/project"]) for v in volumes} - {909}
        deleted = runtime.collect_projects(existing=others)  # 909 was deleted from the DB
        assert f"{namespace}/project-909" in deleted
        for kind, name, ns in (
            ("PersistentVolumeClaim", "project-909", namespace),
            ("PersistentVolume", f"{namespace}-project-909", None),
        ):
            deadline = time.monotonic() + 20
            while True:
                try:
                    admin.get(kind, name, ns)
                except KubeError as exc:
                    assert exc.status == 404
                    break
                assert time.monotonic() < deadline, f"{kind} {name} is still there"
                time.sleep(0.2)
        pods, _ = admin.list("Pod", namespace, labelSelector="kiln.dev/project=909")
        services, _ = admin.list("Service", namespace, labelSelector="kiln.dev/project=909")
        assert pods == [] and services == []
        assert (tmp_path / "909").is_dir()  # the files are the store's: never touched here
    finally:
        runtime.close()


# ----------------------------------------------------------------- the CA's one holder


def _certificate(kube: Kube, name: str, key: str = "tls.crt") -> x509.Certificate:
    data = kube.get("Secret", name, RELEASE_NS)["data"]
    return x509.load_pem_x509_certificate(base64.b64decode(data[key]))


def _issuer(kube: Kube) -> IssuedCert:
    data = kube.get("Secret", "kiln-ca", RELEASE_NS)["data"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
    key = serialization.load_pem_private_key(base64.b64decode(data["ca.key"]), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return IssuedCert(cert, key)


def test_only_kiln_pki_holds_the_ca_and_it_rotates_certificates(
    chart_rbac: Kube, kube_cluster: Any
) -> None:
    pki = as_runner(kube_cluster.kubeconfig, PKI)
    runner = as_runner(kube_cluster.kubeconfig)
    tls = [f"kiln-{service}-tls" for service in SERVICES]
    try:
        first = issue_secrets(pki, RELEASE_NS, "kiln", "kiln.example.org").written
        assert set(first) == {"kiln-ca-public", *tls}
        assert all(why in ("CA certificate", "missing") for why in first.values())
        ca = _certificate(chart_rbac, "kiln-ca", "ca.crt")
        for name in tls:
            secret = chart_rbac.get("Secret", name, RELEASE_NS)["data"]
            assert "ca.key" not in secret  # services receive certificates, never the key
            _certificate(chart_rbac, name).verify_directly_issued_by(ca)
        https = _certificate(chart_rbac, "kiln-web-tls", "https.crt")
        names = https.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        # The public host, and the web Service that workload pods call the Kiln API at.
        assert {"kiln.example.org", f"kiln-web.{RELEASE_NS}.svc"} <= set(dns)
        refused(runner.get, "Secret", "kiln-ca", RELEASE_NS)  # nor can the runner read it
        refused(pki.get, "Secret", "kiln-db", RELEASE_NS)  # pki reads its own Secrets only

        assert issue_secrets(pki, RELEASE_NS, "kiln", "kiln.example.org").written == {}

        # Two thirds of a certificate's life later, every service certificate is reissued.
        later = dt.datetime.now(dt.UTC) + CLUSTER_LIFETIME * 0.7
        before = _certificate(chart_rbac, "kiln-runner-tls").serial_number
        renewed = issue_secrets(pki, RELEASE_NS, "kiln", "kiln.example.org", now=later).written
        assert renewed == dict.fromkeys(tls, "near expiry")
        assert _certificate(chart_rbac, "kiln-runner-tls").serial_number != before

        # A web certificate of an older chart, without the Service's name, is reissued.
        older = issue_certificate(_issuer(chart_rbac), "web-server", ["kiln.example.org"])
        data = chart_rbac.get("Secret", "kiln-web-tls", RELEASE_NS)["data"]
        data["https.crt"] = base64.b64encode(older.cert_pem).decode()
        chart_rbac.apply({
            "apiVersion": "v1", "kind": "Secret", "data": data,
            "metadata": {"name": "kiln-web-tls", "namespace": RELEASE_NS},
        })  # fmt: skip
        assert issue_secrets(pki, RELEASE_NS, "kiln", "kiln.example.org").written == {
            "kiln-web-tls": "missing names"
        }

        # Rotating the CA (docs/kubernetes.md): the admin deletes it; the next pass makes a
        # new one and reissues everything the old one signed.
        chart_rbac.delete("Secret", "kiln-ca", RELEASE_NS)
        rotated = issue_secrets(pki, RELEASE_NS, "kiln", "kiln.example.org").written
        assert rotated == {"kiln-ca-public": "CA certificate",
                           **dict.fromkeys(tls, "not issued by the current CA")}  # fmt: skip
        new_ca = _certificate(chart_rbac, "kiln-ca-public", "ca.crt")
        assert new_ca.public_key() != ca.public_key()
        for name in tls:
            _certificate(chart_rbac, name).verify_directly_issued_by(new_ca)
    finally:
        for name in ("kiln-ca", "kiln-ca-public", *tls):
            chart_rbac.delete("Secret", name, RELEASE_NS)
        pki.close()
        runner.close()
