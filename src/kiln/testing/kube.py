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
import json
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
UNSCHEDULABLE_RECHECK = 10.0  # RealNode.wait_schedulable, once a wait has given up
FAKE_NODE_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
# The API server's identity towards kubelets (its client certificate's CN); RealNode binds it
# to Kubernetes' own system:kubelet-api-admin ClusterRole, which the kubelet's Webhook
# authorization asks the API server about.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


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
    def start(cls, directory: Path, *, verify_kubelets: bool = False) -> ControlPlane:
        """``verify_kubelets``: the API server checks kubelets' serving certificates against
        the cluster CA (a ``RealNode``'s is issued by it; KWOK's fake kubelets' are not)."""
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
        kubelet_client = issue_certificate(
            ca, KUBELET_CLIENT_USER, [], server=False, client=True, lifetime=dt.timedelta(days=2)
        )
        _write(pki / "apiserver-kubelet-client.crt", kubelet_client.cert_pem)
        _write(pki / "apiserver-kubelet-client.key", kubelet_client.key_pem)

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
                    # To a real node's kubelet (logs, exec): by its InternalIP (its hostname
                    # resolves nowhere), as the identity Kubernetes' kubelet-api-admin role is
                    # for, verifying the kubelet's serving certificate against our CA.
                    "--kubelet-preferred-address-types=InternalIP,Hostname",
                    f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                    f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                    *(
                        [f"--kubelet-certificate-authority={pki / 'ca.crt'}"]
                        if verify_kubelets
                        else []
                    ),
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
                    # The fake nodes' heartbeat. Without a lease (KWOK's default here) the
                    # node lifecycle controller called every node NotReady once per grace
                    # period (50 s), marked their pods not Ready, and nothing made those
                    # pods Ready again: a long test session lost its Deployments.
                    "--node-lease-duration-seconds=40",
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


# ---------------------------------------------------------------- a real node

# Where a RealNode's kubelet listens: an address of its own on `lo` (a node's IP must not be a
# loopback address, and this kernel may lack the dummy link driver), one per running node.
NODE_ADDRESSES = "10.250.0."
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"  # the name containerd's CRI asks for; ours, imported
# Host paths the kubelet, containerd and the CNI plugins use whatever their configuration
# says. The node runs in a private mount namespace with a tmpfs on each: nothing it writes
# there reaches (or collides with) the host's.
HARD_CODED_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/lib/cni", "/run/containerd",
                    "/run/netns")  # fmt: skip
CGROUPS = Path("/sys/fs/cgroup")


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def pause_image_archive(program: Path, out: Path, reference: str = PAUSE_IMAGE) -> Path:
    """An OCI image archive (``ctr images import``) of one layer: the static ``pause`` program
    (scripts/go/pause) as the sandbox's entrypoint. Nothing is pulled from the Internet."""
    import gzip
    import hashlib
    import io
    import tarfile

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for name in ("dev", "etc", "proc", "sys"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        data = program.read_bytes()
        info = tarfile.TarInfo("pause")
        info.size, info.mode = len(data), 0o755
        layer.addfile(info, io.BytesIO(data))
    compressed = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({
        "architecture": _arch(), "os": "linux",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [digest(raw.getvalue())]},
    }).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(compressed), "size": len(compressed)}],
    }).encode()  # fmt: skip
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": _arch(), "os": "linux"},
            "annotations": {"io.containerd.image.name": reference,
                            "org.opencontainers.image.ref.name": reference.rsplit(":", 1)[1]},
        }],
    }).encode()  # fmt: skip
    with tarfile.open(out, "w") as archive:
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", index),
            *((f"blobs/sha256/{digest(d)[7:]}", d) for d in (compressed, config, manifest)),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return out


def _cgroup_hierarchies() -> list[Path]:
    """Where a cgroup of ours must be made: the cgroup v2 root, or each v1 hierarchy."""
    if (CGROUPS / "cgroup.controllers").exists():
        return [CGROUPS]
    return sorted(
        p for p in CGROUPS.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
    )  # fmt: skip


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@dataclass
class RealNode:
    """A real node on this machine: containerd (with Debian's runc) and a kubelet of the
    control plane's release, registered as ``name``, running real pods.

    ``start`` runs both inside a private mount namespace (``unshare -m``) with a tmpfs on each
    host path they hard-code, gives the kubelet an address of its own on ``lo``, a CNI bridge
    and cgroup root of its own, a serving certificate from the cluster CA and x509 + Webhook
    authentication and authorization (the API server reaches it as ``KUBELET_CLIENT_USER``),
    imports the pause image and lets containerd pull from each given registry with its CA.
    ``stop`` ends every process the node started and undoes each change to the host.
    """

    plane: ControlPlane
    name: str
    directory: Path
    address: str
    bridge: str
    cgroup_root: str
    socket: Path
    kubeconfig: Path | None = None  # the kubelet's: system:node:NAME
    made_dirs: list[Path] = field(default_factory=list)
    registered_taint_keys: frozenset[str] = frozenset()
    process: subprocess.Popen[bytes] | None = None
    # Why the last wait_schedulable gave up, if it did: the next waits then give up after
    # UNSCHEDULABLE_RECHECK seconds, so a node stuck (under DiskPressure, say) fails each of
    # its tests promptly instead of spending START_TIMEOUT on each.
    gave_up: str | None = None

    @classmethod
    def start(
        cls,
        plane: ControlPlane,
        directory: Path,
        *,
        name: str = "real-0",
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        registries: dict[str, Path] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> RealNode:
        """``registries``: host[:port] → the CA file its TLS certificate is issued by."""
        import pytest

        if os.geteuid() != 0:
            pytest.skip("NOTICE: a real node (kubelet, containerd, runc) needs root")
        why = "a real Kubernetes node"
        kubelet = tools.require("kubelet", why)
        containerd = tools.require("containerd", why)
        shim = tools.require_built("containerd", "containerd-shim-runc-v2", why)
        ctr = tools.require_built("containerd", "ctr", why)
        cni_bin = tools.require_built("cni-plugins", "bridge", why).parent
        pause = tools.require("pause", why)
        runc = tools.require("runc", why)
        for program in ("unshare", "ip", "mount"):
            tools.require(program, why)

        directory.mkdir(parents=True, exist_ok=True)
        token = os.urandom(3).hex()
        node = cls(
            plane,
            name,
            directory,
            address=_claim_address(),
            bridge=f"kiln{token}",
            cgroup_root=f"kiln-node-{token}",
            socket=directory / "run" / "containerd.sock",
        )
        try:
            node.registered_taint_keys = frozenset(t["key"] for t in taints or [])
            node._configure(labels or {}, taints or [], registries or {}, runc, cni_bin)
            pause_image_archive(pause, directory / "pause.tar")
            for path in HARD_CODED_PATHS:
                if not Path(path).exists():
                    Path(path).mkdir(parents=True)
                    node.made_dirs.append(Path(path))
            script = _write(directory / "node.sh", _NODE_SCRIPT, 0o755)
            log = open(directory / "logs" / "node.log", "ab")  # noqa: SIM115 (the child's)
            env = {
                **os.environ,
                "PATH": f"{shim.parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
                "NODE_DIR": str(directory),
                "NODE_PATHS": " ".join(HARD_CODED_PATHS),
                "CONTAINERD": str(containerd),
                "CTR": str(ctr),
                "KUBELET": str(kubelet),
            }
            argv = ["unshare", "-m", "--propagation", "private", str(script)]
            node.process = subprocess.Popen(
                [*argv, *node._kubelet_args(labels or {})],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            log.close()
            node.wait_schedulable(timeout)
        except BaseException:
            node.stop()
            raise
        return node

    # ------------------------------------------------------------ set-up

    def _configure(
        self,
        labels: dict[str, str],
        taints: list[dict[str, str]],
        registries: dict[str, Path],
        runc: Path,
        cni_bin: Path,
    ) -> None:

        d = self.directory
        for sub in ("logs", "run", "pki", "certs.d", "cni", "pod-logs", "root"):
            (d / sub).mkdir(exist_ok=True)
        # The API server (as KUBELET_CLIENT_USER) may use the kubelet API: logs, exec.
        from kiln.runtimes.kubernetes.client import Kube

        kube = Kube.from_kubeconfig(str(self.plane.kubeconfig))
        try:
            kube.apply({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kiln-test:kube-apiserver-kubelet-client"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "system:kubelet-api-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                              "name": KUBELET_CLIENT_USER}],
            })  # fmt: skip
        finally:
            kube.close()
        serving = issue_certificate(self.plane.ca, self.name, [self.address, self.name])
        _write(d / "pki" / "kubelet.crt", serving.cert_pem)
        _write(d / "pki" / "kubelet.key", serving.key_pem)
        for host, ca_file in registries.items():
            self.trust_registry(host, ca_file)
        _write(d / "containerd.toml", _CONTAINERD_CONFIG.format(
            dir=d, socket=self.socket, runc=runc, cni_bin=cni_bin, pause=PAUSE_IMAGE
        ), 0o644)  # fmt: skip
        subnet = _free_subnet()
        _write(d / "cni" / "10-kiln.conflist", json.dumps({
            "cniVersion": "1.0.0",
            "name": self.bridge,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(d / "cni" / "state"),
                          "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "loopback"},
            ],
        }), 0o644)  # fmt: skip
        for hierarchy in _cgroup_hierarchies():
            cgroup = hierarchy / self.cgroup_root
            cgroup.mkdir(exist_ok=True)
            for key in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset admits no process
                if (hierarchy / key).exists():
                    (cgroup / key).write_text((hierarchy / key).read_text())
        _write(d / "kubelet.yaml", yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(d / "pod-logs"),
            "address": self.address,
            "port": _free_port_on(self.address),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "tlsCertFile": str(d / "pki" / "kubelet.crt"),
            "tlsPrivateKeyFile": str(d / "pki" / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.directory / "pki" / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "registerNode": True,
            "registerWithTaints": [
                {"key": t["key"], "value": t.get("value", ""), "effect": t["effect"]}
                for t in taints
            ],
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # Absolute floors, not the default percentages: this node's disk is the machine's,
            # shared with the rest of the suite, and 10% (or even 1%) of a large shared disk
            # is gigabytes the node would refuse pods over (DiskPressure taints it) although
            # its pods write megabytes. Signals left out are off (mergeDefaultEvictionSettings
            # is false).
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "256Mi",
                             "imagefs.available": "256Mi"},
        }), 0o644)  # fmt: skip
        self.kubeconfig = self.plane.kubeconfig_for(f"system:node:{self.name}", "system:nodes")

    def trust_registry(self, host: str, ca_file: Path) -> None:
        """Let containerd pull from ``host`` (host[:port]) over TLS issued by ``ca_file``;
        it reads these files at each pull, so this works on a running node too."""
        _write(
            self.directory / "certs.d" / host / "hosts.toml",
            f'server = "https://{host}"\n\n[host."https://{host}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = "{ca_file}"\n',
            0o644,
        )

    def _kubelet_args(self, labels: dict[str, str]) -> list[str]:
        d = self.directory
        args = [
            f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.address}",
            "--v=1",
        ]
        if labels:
            args.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        return args

    def wait_schedulable(self, timeout: float = START_TIMEOUT) -> None:
        """Until the node is Ready and bears only the taints it registered with. The API
        server taints a new node ``not-ready``, and the node lifecycle controller removes
        that only after the kubelet reports Ready (18 ms later on an idle machine, longer on
        a loaded one: pods created in between are unschedulable); it also adds pressure or
        ``unreachable`` taints while the kubelet reports those (or stops reporting). A test
        that starts pods waits here first, so such a state fails it naming its cause."""
        if self.gave_up is not None:
            timeout = min(timeout, UNSCHEDULABLE_RECHECK)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the node {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError):  # the API server does not answer yet
                if self._schedulable(json.loads(self.plane.get(f"/api/v1/nodes/{self.name}"))):
                    self.gave_up = None
                    return
            time.sleep(0.25)
        self.gave_up = self.describe()
        raise TimeoutError(f"the node {self.name} did not become schedulable in {timeout:.0f}s "
                           f"({self.gave_up}): {self.log_tail()}")  # fmt: skip

    def _schedulable(self, node: dict[str, Any]) -> bool:
        conditions = (node.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        taints = (node.get("spec") or {}).get("taints") or []
        return ready and all(t.get("key") in self.registered_taint_keys for t in taints)

    def describe(self) -> str:
        """The node's conditions and taints, as the API server has them."""
        try:
            node = json.loads(self.plane.get(f"/api/v1/nodes/{self.name}"))
        except OSError as error:
            return f"the API server did not answer: {error}"
        conditions = ", ".join(
            f"{c.get('type')}={c.get('status')} ({c.get('reason')}: {c.get('message')})"
            for c in (node.get("status") or {}).get("conditions") or []
        )
        taints = (node.get("spec") or {}).get("taints") or []
        return f"conditions: {conditions or 'none'}; taints: {taints}"

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("node", "containerd", "kubelet"):
            path = self.directory / "logs" / f"{name}.log"
            if path.exists():
                parts.append(f"--- {name}.log\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------ tear-down

    def stop(self) -> None:
        """End the kubelet, the pods' sandboxes and containers, containerd and its shims; then
        remove the node's address, bridge and cgroups (idempotent)."""
        self._delete_pods()
        if self.process is not None and self.process.poll() is None:  # the kubelet
            _terminate(self.process.pid, 15)
        pid_file = self.directory / "run" / "containerd.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                _terminate(int(pid_file.read_text().strip()), 15)
        for pid in _processes_with_argument(str(self.socket)):  # shims of our containerd only
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._kill_cgroups()  # containers and sandboxes left behind
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        _run("ip", "link", "del", self.bridge)
        _run("ip", "addr", "del", f"{self.address}/32", "dev", "lo")
        for path in reversed(self.made_dirs):
            # Busy while the node's mount namespace (its tmpfs there) lingers a moment.
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self.made_dirs.clear()

    def _delete_pods(self) -> None:
        """Pods on the node, deleted while the kubelet runs: it stops their containers and
        tears their sandboxes down (CNI DEL, network namespace) as on any node."""
        if self.process is None or self.process.poll() is not None:
            return
        from kiln.runtimes.kubernetes.client import Kube

        try:
            kube = Kube.from_kubeconfig(str(self.plane.kubeconfig))
        except Exception:
            return
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pods, _ = kube.list("Pod", fieldSelector=f"spec.nodeName={self.name}")
                if not pods:
                    return
                for pod in pods:
                    meta = pod["metadata"]
                    with contextlib.suppress(Exception):
                        kube.delete("Pod", meta["name"], meta["namespace"], grace_seconds=0)
                time.sleep(0.5)
        except Exception:
            return
        finally:
            kube.close()

    def _kill_cgroups(self) -> None:
        hierarchies = _cgroup_hierarchies()
        for _ in range(50):
            pids: set[int] = set()
            for hierarchy in hierarchies:
                root = hierarchy / self.cgroup_root
                if root.is_dir():
                    for procs in root.rglob("cgroup.procs"):
                        with contextlib.suppress(OSError):
                            pids.update(int(p) for p in procs.read_text().split())
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for hierarchy in hierarchies:
            root = hierarchy / self.cgroup_root
            if root.is_dir():
                for cgroup in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
                    if cgroup.is_dir():
                        with contextlib.suppress(OSError):
                            cgroup.rmdir()
                with contextlib.suppress(OSError):
                    root.rmdir()


def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _processes_with_argument(argument: str) -> list[int]:
    """Processes one of whose arguments is exactly ``argument``."""
    wanted = argument.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "cmdline").read_bytes().split(b"\0")[1:]:
                    found.append(int(entry.name))
    return found


def _claim_address() -> str:
    """An address on ``lo`` for one node: the first of NODE_ADDRESSES no one holds."""
    for host in range(1, 255):
        address = f"{NODE_ADDRESSES}{host}"
        if _run("ip", "addr", "add", f"{address}/32", "dev", "lo").returncode == 0:
            return address  # `ip addr add` fails for an address lo has already
    raise RuntimeError(f"no free address in {NODE_ADDRESSES}0/24 on lo")


def _free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _free_subnet() -> str:
    routes = _run("ip", "-4", "route", "show").stdout
    for third in range(89, 250):
        if f"10.{third}." not in routes:
            return f"10.{third}.0.0/24"
    raise RuntimeError("no free 10.x.0.0/24 subnet for a node's pod network")


_CONTAINERD_CONFIG = """\
version = 3
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = "{dir}/certs.d"

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    disable_apparmor = true
    # Without CAP_SYS_RESOURCE (a container, a sandbox) no process may get an oom_score_adj
    # below containerd's own: the sandbox's -998 would make runc fail ("can't get final
    # child's PID from pipe: EOF").
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{cni_bin}"]
      conf_dir = "{dir}/cni"
"""

# Run by `unshare -m --propagation private`: every mount below (and every one containerd and
# the kubelet make) is private to the node's mount namespace and goes with it.
_NODE_SCRIPT = """\
#!/bin/bash
set -e
for path in $NODE_PATHS; do mount -t tmpfs -o mode=755 kiln-node "$path"; done
"$CONTAINERD" --config "$NODE_DIR/containerd.toml" >> "$NODE_DIR/logs/containerd.log" 2>&1 &
echo $! > "$NODE_DIR/run/containerd.pid"
for _ in $(seq 300); do [ -S "$NODE_DIR/run/containerd.sock" ] && break; sleep 0.05; done
"$CTR" -a "$NODE_DIR/run/containerd.sock" -n k8s.io images import --snapshotter overlayfs \\
  "$NODE_DIR/pause.tar" > /dev/null
exec "$KUBELET" "$@" >> "$NODE_DIR/logs/kubelet.log" 2>&1
"""
