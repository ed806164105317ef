"""A real Kubernetes control plane on this machine, for tests and benchmarks.

``ControlPlane.start(directory)`` runs, on free loopback ports:

- etcd (``scripts/go/etcd``), its data on a private directory;
- kube-apiserver with RBAC (``--authorization-mode=Node,RBAC``), TLS from a CA made here,
  client certificates for every component, service-account tokens signed by its own key;
- kube-controller-manager (namespaces, PV binding, Deployments, ReplicaSets, quotas, ...);
- kube-scheduler;
- KWOK with Kiln's Stage files (``kiln/testing/kwok/stages.yaml``): fake nodes that move pods
  through scheduled → pulled → started → (exit on request) → deleted. No container runs.

It writes an admin kubeconfig (``kubeconfig``), and ``kubeconfig_for(user, groups)`` makes
more with certificates of other identities (a test impersonating the runner, say).
``stop()`` ends every process and the data goes with the directory.

The binaries come from ``scripts/build_go_tools.sh`` (``kube``, ``etcd``, ``kwok``): a
multi-call ``kube`` binary holds kube-apiserver, kube-controller-manager and kube-scheduler.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from kiln.pki.ca import IssuedCert, issue_certificate, make_ca, new_key
from kiln.testing import tools

STAGES = Path(__file__).with_name("kwok") / "stages.yaml"
SERVICE_CIDR = "10.96.0.0/16"
START_TIMEOUT = 120.0
FAKE_NODE_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


@dataclass
class ControlPlane:
    directory: Path
    ca: IssuedCert
    server: str  # https://127.0.0.1:PORT
    kubeconfig: Path  # system:masters
    version: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ------------------------------------------------------------ identities

    def kubeconfig_for(self, user: str, group: str | None = None) -> Path:
        """A kubeconfig authenticating as ``user`` (in ``group``) with a client certificate."""
        safe = "".join(c if c.isalnum() else "-" for c in user)
        path = self.directory / "kubeconfigs" / f"{safe}.yaml"
        if not path.exists():
            _kubeconfig(path, self.server, self.ca, user, group)
        return path

    # ------------------------------------------------------------ requests

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "pki" / "ca.crt"))
        context.load_cert_chain(
            str(self.directory / "pki" / "admin.crt"), str(self.directory / "pki" / "admin.key")
        )
        return context

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        """GET ``path`` as the admin (readiness checks; tests use the real client)."""
        with urllib.request.urlopen(  # noqa: S310 (https to our own API server)
            self.server + path, context=self.ssl_context(), timeout=timeout
        ) as reply:
            return bytes(reply.read())

    def add_nodes(
        self,
        count: int,
        *,
        prefix: str = "kwok-node",
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        cpu: str = "4",
        memory: str = "16Gi",
        pods: int = 110,
    ) -> list[str]:
        """Create ``count`` fake nodes (KWOK makes them Ready). Returns their names."""
        from kiln.runtimes.kubernetes.client import Kube

        kube = Kube.from_kubeconfig(str(self.kubeconfig))
        made = []
        try:
            for i in range(count):
                name = f"{prefix}-{i}"
                node: dict[str, Any] = {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": dict(FAKE_NODE_ANNOTATION),
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "type": "kwok",
                            **(labels or {}),
                        },
                    },
                    "spec": {"taints": taints or []},
                    "status": {
                        "allocatable": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                        "capacity": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                    },
                }
                kube.create(node)
                made.append(name)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                nodes, _ = kube.list("Node")
                ready = {
                    n["metadata"]["name"]
                    for n in nodes
                    if any(
                        c.get("type") == "Ready" and c.get("status") == "True"
                        for c in (n.get("status") or {}).get("conditions") or []
                    )
                }
                if ready >= set(made):
                    return made
                time.sleep(0.1)
            raise TimeoutError(f"KWOK did not make nodes {made} Ready")
        finally:
            kube.close()

    # ------------------------------------------------------------ life cycle

    @classmethod
    def start(cls, directory: Path) -> ControlPlane:
        kube_bin = tools.require("kube", "the Kubernetes test control plane")
        etcd_bin = tools.require("etcd", "the Kubernetes test control plane")
        kwok_bin = tools.require("kwok", "the Kubernetes test control plane")
        version = tools.go_tool_pins()["kube"]
        directory.mkdir(parents=True, exist_ok=True)
        pki = directory / "pki"
        ca = make_ca("Kiln test cluster CA")
        _write(pki / "ca.crt", ca.cert_pem, 0o644)
        _write(pki / "ca.key", ca.key_pem)
        serving = issue_certificate(
            ca,
            "kube-apiserver",
            ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc", "10.96.0.1"],
        )
        _write(pki / "apiserver.crt", serving.cert_pem)
        _write(pki / "apiserver.key", serving.key_pem)
        sa_key = new_key()
        _write(
            pki / "sa.key",
            sa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write(
            pki / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        admin = issue_certificate(
            ca, "kiln-test-admin", [], server=False, client=True, organization="system:masters"
        )
        _write(pki / "admin.crt", admin.cert_pem)
        _write(pki / "admin.key", admin.key_pem)

        port = free_port()
        server = f"https://127.0.0.1:{port}"
        plane = cls(directory, ca, server, directory / "kubeconfig", version)
        _kubeconfig(plane.kubeconfig, server, ca, "kiln-test-admin", "system:masters")
        logs = directory / "logs"
        logs.mkdir(exist_ok=True)
        try:
            etcd_port, peer_port = free_port(), free_port()
            plane._spawn(
                "etcd",
                [
                    str(etcd_bin),
                    "--name=kiln-test",
                    f"--data-dir={directory / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=kiln-test=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",  # a test cluster: durability is not the point
                    "--log-level=warn",
                ],
            )
            plane._spawn(
                "kube-apiserver",
                [
                    str(kube_bin),
                    "kube-apiserver",
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={port}",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    "--authorization-mode=Node,RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--enable-priority-and-fairness=false",
                    # Old resourceVersions expire within seconds, as they do on a busy
                    # cluster over minutes: watchers' re-list paths run in every test run.
                    "--etcd-compaction-interval=5s",
                    "--profiling=false",
                    "--v=0",
                ],
            )
            plane._wait_ready()
            for name, user in (
                ("kube-controller-manager", "system:kube-controller-manager"),
                ("kube-scheduler", "system:kube-scheduler"),
            ):
                config = plane.kubeconfig_for(user)
                args = [
                    str(kube_bin),
                    name,
                    f"--kubeconfig={config}",
                    f"--authentication-kubeconfig={config}",
                    f"--authorization-kubeconfig={config}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    "--v=0",
                ]
                if name == "kube-controller-manager":
                    args += [
                        f"--service-account-private-key-file={pki / 'sa.key'}",
                        f"--root-ca-file={pki / 'ca.crt'}",
                        "--use-service-account-credentials=true",
                        f"--service-cluster-ip-range={SERVICE_CIDR}",
                        # Fast reactions for tests: a pod or namespace goes away promptly.
                        "--concurrent-namespace-syncs=5",
                    ]
                plane._spawn(name, args)
            plane._spawn(
                "kwok",
                [
                    str(kwok_bin),
                    f"--kubeconfig={plane.kubeconfig}",
                    f"--config={STAGES}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--node-ip=127.0.0.1",
                    "--cidr=10.244.0.0/16",
                    f"--server-address=127.0.0.1:{free_port()}",
                ],
            )
            plane._wait_for_service_accounts()
        except BaseException:
            plane.stop()
            raise
        return plane

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.directory / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (kept open)
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.directory / "logs" / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(f"{name} exited ({process.returncode}): {tail[-3000:]}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self.get("/readyz") == b"ok":
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready within {START_TIMEOUT:.0f}s: {last}")

    def _wait_for_service_accounts(self) -> None:
        """The controller manager has started once it made the default ServiceAccount."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                self.get("/api/v1/namespaces/default/serviceaccounts/default")
                return
            time.sleep(0.2)
        raise TimeoutError("the controller manager did not start within the time limit")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.processes.clear()


def _kubeconfig(path: Path, server: str, ca: IssuedCert, user: str, group: str | None) -> Path:
    client = issue_certificate(
        ca,
        user,
        [],
        server=False,
        client=True,
        organization=group,
        lifetime=dt.timedelta(days=2),
    )

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kiln-test",
                "cluster": {"server": server, "certificate-authority-data": b64(ca.cert_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert_pem),
                    "client-key-data": b64(client.key_pem),
                },
            }
        ],
        "contexts": [{"name": "kiln-test", "context": {"cluster": "kiln-test", "user": user}}],
        "current-context": "kiln-test",
    }
    return _write(path, yaml.safe_dump(config))
