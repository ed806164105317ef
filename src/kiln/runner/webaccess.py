"""The one way out of a sandbox to Kiln itself: a session calling the web tier's public API.

A session uses the Kiln API (the Workers API, and CML's ``CDSW_API_URL``). The runner wires
that, because only the runner knows how a sandbox sees the host. For the kinds in
``WEB_CLIENT_KINDS`` it adds to the workload's spec:

- **network**: ``NetworkPolicy.host_ports`` = the web tier's public port. The local runtime
  makes the slirp gateway (10.0.2.2) lead to the host's loopback and lets exactly that port
  through; the runner's gRPC port, the database and every other host port stay blocked.
- **trust**: a CA bundle (the host's public CAs + Kiln's CA, which signs the web tier's
  certificate) at ``/run/kiln/ca-bundle.crt``, read-only. ``KILN_CA_BUNDLE`` always names
  it; ``SSL_CERT_FILE`` and ``REQUESTS_CA_BUNDLE`` too, unless the project set its own. The
  web certificate names 10.0.2.2 (``kiln.pki.ca.web_server_names``), so clients verify TLS
  as usual: nothing inside needs to turn verification off.
- **the SDK**: ``kiln.sdk.workers`` and the CML library (``cml.models_v1``,
  ``cml.metrics_v1``, ``cdsw``; all standard library only) under ``/run/kiln/python``,
  appended to ``PYTHONPATH``, so ``from kiln.sdk import workers`` and ``import cdsw`` work in
  any runtime image.
- **where**: ``KILN_API_URL`` (``https://10.0.2.2:<port>/``) and ``CDSW_API_URL`` (``…/api/v1``).

On the kubernetes runtime (``pod_web_access``) the address is ``kubernetes.web_url`` (in a
cluster the web Service, which the web certificate names; the tenant NetworkPolicy lets pods
reach the web pods' port and nothing else of the cluster), and ``/run/kiln`` reaches the pod
as a ConfigMap (a pod mounts no host path). Without that setting pods get none of this.

The credentials are not the runner's business: the web tier puts the session's workers
token in the environment it sends; a job run gets none (``cml.metrics_v1`` takes the user's
API key from the project's environment, ``KILN_API_KEY``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kiln.pki.ca import CertificateAuthority
from kiln.rpc import runner_pb2
from kiln.runtimes.base import WorkloadSpec
from kiln.settings import Settings

log = logging.getLogger("kiln.runner")

# Workloads that call the web tier's API, and so need the way to it: sessions (with their
# workers token) and job runs (cml.metrics_v1 with the user's API key: the ground truth of a
# model's predictions usually arrives in a scheduled job).
WEB_CLIENT_KINDS = frozenset({runner_pb2.WORKLOAD_KIND_SESSION, runner_pb2.WORKLOAD_KIND_JOB_RUN})
SANDBOX_DIR = "/run/kiln"  # on bubblewrap's own root tmpfs for every runtime image
BUNDLE = f"{SANDBOX_DIR}/ca-bundle.crt"
PYTHON_DIR = f"{SANDBOX_DIR}/python"
# Where the host keeps its public CAs, if Python's defaults do not say.
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
PACKAGE_INIT = '"""Kiln inside a workload: only ``kiln.sdk.workers`` (the Workers API)."""\n'


@dataclass(frozen=True)
class WebAccess:
    """How sandboxes reach the web tier: ``host:port`` as seen from inside, and the host
    directory (``files_dir``) shown read-only at ``/run/kiln``."""

    host: str
    port: int
    tls: bool
    files_dir: Path

    @property
    def url(self) -> str:
        scheme, default = ("https", 443) if self.tls else ("http", 80)
        port = "" if self.port == default else f":{self.port}"
        return f"{scheme}://{self.host}{port}/"

    def prepare(self, ca_cert: Path) -> None:
        """Write the bundle and the SDK (again on every runner start: both may change)."""
        python = self.files_dir / "python" / "kiln" / "sdk"
        python.mkdir(parents=True, exist_ok=True)
        for directory in (self.files_dir, python.parent.parent, python.parent, python):
            directory.chmod(0o755)  # the workload's uid reads these
        from kiln.sdk import workers  # the real module, copied: one source of truth

        _write(python.parent / "__init__.py", PACKAGE_INIT.encode())
        _write(python / "__init__.py", PACKAGE_INIT.encode())
        _write(python / "workers.py", Path(workers.__file__).read_bytes())
        from kiln.build.serving_layer import library_sources  # what model images carry too

        for name, data in library_sources().items():
            target = python.parent.parent / name
            target.parent.mkdir(exist_ok=True)
            target.parent.chmod(0o755)
            _write(target, data)
        _write(self.files_dir / "ca-bundle.crt", _bundle(ca_cert))

    def wire(self, spec: WorkloadSpec) -> WorkloadSpec:
        """``spec`` with the network door, the bundle, the SDK and the URLs added."""
        env = dict(spec.env)
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            env.setdefault(name, BUNDLE)  # a project's own bundle wins; ours is still named
        env["KILN_CA_BUNDLE"] = BUNDLE
        env["KILN_API_URL"] = self.url
        env["CDSW_API_URL"] = f"{self.url}api/v1"
        # After the project's own entries: a package of the user's never loses to ours.
        env["PYTHONPATH"] = ":".join(p for p in (env.get("PYTHONPATH", ""), PYTHON_DIR) if p)
        ports = tuple(sorted({*spec.network.host_ports, self.port}))
        return dataclasses.replace(
            spec,
            env=env,
            network=dataclasses.replace(spec.network, host_ports=ports),
            readonly_binds=(*spec.readonly_binds, (self.files_dir, SANDBOX_DIR)),
        )


def _bundle(ca_cert: Path) -> bytes:
    """Kiln's CA after the host's public ones: a session's other HTTPS calls (pip, APIs on
    the internet) keep working with the bundle as ``SSL_CERT_FILE``."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *HOST_BUNDLES):
        if candidate and os.path.isfile(candidate):
            public = Path(candidate).read_bytes()
            break
    else:
        log.warning("no CA bundle on this host: sessions will trust only Kiln's own CA")
        public = b""
    if public and not public.endswith(b"\n"):
        public += b"\n"
    return public + ca_cert.read_bytes()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def local_web_access(settings: Settings, state_dir: Path) -> WebAccess:
    """The way for the local runtime's sandboxes: slirp's gateway leads to the host's
    loopback, where the web tier listens (``KILN_WEB_HOST`` 127.0.0.1 or a wildcard)."""
    from kiln.runtimes.local.sandbox import SLIRP_GATEWAY

    if not _on_loopback(settings.web.host):
        log.warning(
            "the web tier listens on %s, not on loopback: sessions reach only the host's "
            "loopback (%s:%d), so the Workers API will not answer them",
            settings.web.host,
            SLIRP_GATEWAY,
            settings.web.port,
        )
    access = WebAccess(SLIRP_GATEWAY, settings.web.port, settings.web.tls, state_dir / "web")
    return _prepared(access, settings)


def pod_web_access(settings: Settings, state_dir: Path) -> WebAccess | None:
    """The way for the kubernetes runtime's pods: the web tier at ``kubernetes.web_url`` (in
    a cluster, its Service, which the web certificate names), the bundle and SDK shown at
    ``/run/kiln`` as a ConfigMap. None when no URL is set: pods then get no Kiln API rather
    than an address that leads nowhere from a pod (the local runtime's slirp gateway)."""
    if not settings.kubernetes.web_url:
        log.info("kubernetes.web_url is not set: sessions and job runs get no Kiln API")
        return None
    url = urlsplit(settings.kubernetes.web_url)  # an http(s) URL with a host: the settings'
    tls = url.scheme == "https"
    host = url.hostname or ""
    access = WebAccess(host, url.port or (443 if tls else 80), tls, state_dir / "web")
    return _prepared(access, settings)


def _prepared(access: WebAccess, settings: Settings) -> WebAccess:
    """``access`` with its bundle and SDK written. The CA is this machine's own (made if
    missing) except in a cluster, where only its certificate is delivered and its key is
    held by `kiln pki` alone."""
    authority = CertificateAuthority(settings.pki_dir)
    if not authority.delivered:
        authority.load_or_create()
    access.prepare(authority.cert_path)
    return access


def _on_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified
