"""Kiln's internal CA in a cluster: one holder of the key, certificates delivered as Secrets.

On one machine every service reads ``DATA_DIR/pki`` and renews its own certificate. In a
cluster only the ``kiln-pki`` Deployment may read the CA's key (a Secret only its service
account can get); it issues each service's certificate into a Secret that the service mounts
read-only (``<prefix>-<service>-tls``: ``tls.crt``/``tls.key``, plus the web tier's HTTPS
pair), and the CA certificate into ``<prefix>-ca-public``. It checks again every interval and
reissues what is due, so certificates rotate without a restart: the kubelet updates mounted
Secrets in place, and Kiln's TLS layer picks the new files up for new connections.

Rotating the CA itself is documented in docs/kubernetes.md (delete ``<prefix>-ca``: the next
pass makes a new CA and reissues everything).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kiln.pki.ca import (
    IssuedCert,
    issue_certificate,
    issue_service_certificate,
    make_ca,
    sans_of,
    web_server_names,
)
from kiln.runtimes.kubernetes.client import Kube, KubeError

log = logging.getLogger("kiln.pki")

SERVICES = ("web", "runner", "builder")
CLUSTER_LIFETIME = dt.timedelta(days=7)  # renewed after 2/3 of it: days of retries to spare
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True)
class Issued:
    """What one pass did: the Secrets it (re)wrote, by name, and why."""

    written: dict[str, str]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret(namespace: str, name: str, data: dict[str, bytes]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kiln", "app.kubernetes.io/part-of": "kiln"},
        },
        "data": {key: _b64(value) for key, value in data.items()},
    }


def _read(kube: Kube, namespace: str, name: str) -> dict[str, bytes] | None:
    try:
        secret = kube.get("Secret", name, namespace)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def load_or_create_ca(kube: Kube, namespace: str, prefix: str) -> IssuedCert:
    """The CA from ``<prefix>-ca``, or a new one stored there (the first pass)."""
    name = f"{prefix}-ca"
    stored = _read(kube, namespace, name)
    if stored and "ca.crt" in stored and "ca.key" in stored:
        cert = x509.load_pem_x509_certificate(stored["ca.crt"])
        key = serialization.load_pem_private_key(stored["ca.key"], password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return IssuedCert(cert, key)
    ca = make_ca()
    kube.create(_secret(namespace, name, {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}))
    log.info("created Kiln's CA in secret %s/%s", namespace, name)
    return ca


def web_service_names(namespace: str, prefix: str) -> list[str]:
    """The web Service's in-cluster names: how workload pods reach the Kiln API
    (``kubernetes.web_url``, which the chart sets to the first)."""
    service = f"{prefix}-web.{namespace}.svc"
    return [service, f"{service}.cluster.local"]


def _lacks(pem: bytes | None, names: list[str]) -> str | None:
    """ "missing names" when the certificate does not name all of ``names`` (an older
    chart's, issued before pods called the web Service)."""
    if not pem:
        return None
    held = set(sans_of(x509.load_pem_x509_certificate(pem)))
    return None if held >= set(names) else "missing names"


def _due(pem: bytes | None, ca: IssuedCert, now: dt.datetime) -> str | None:
    if not pem:
        return "missing"
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca.cert)
    except Exception:
        return "not issued by the current CA"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - now < lifetime * RENEW_FRACTION:
        return "near expiry"
    return None


def issue_secrets(
    kube: Kube,
    namespace: str,
    prefix: str,
    domain: str,
    *,
    now: dt.datetime | None = None,
    lifetime: dt.timedelta = CLUSTER_LIFETIME,
) -> Issued:
    """One pass: every service's Secret exists, is issued by the CA and is not due."""
    now = now or dt.datetime.now(dt.UTC)
    ca = load_or_create_ca(kube, namespace, prefix)
    written: dict[str, str] = {}
    https_names = [*web_server_names(domain), *web_service_names(namespace, prefix)]
    public = f"{prefix}-ca-public"
    if (_read(kube, namespace, public) or {}).get("ca.crt") != ca.cert_pem:
        kube.apply(_secret(namespace, public, {"ca.crt": ca.cert_pem}))
        written[public] = "CA certificate"
    for service in SERVICES:
        name = f"{prefix}-{service}-tls"
        current = _read(kube, namespace, name) or {}
        why = _due(current.get("tls.crt"), ca, now)
        if service == "web" and why is None:
            why = _due(current.get("https.crt"), ca, now) or _lacks(
                current.get("https.crt"), https_names
            )
        if why is None:
            continue
        leaf = issue_service_certificate(ca, service, lifetime=lifetime, now=now)
        data = {"tls.crt": leaf.cert_pem + ca.cert_pem, "tls.key": leaf.key_pem}
        if service == "web":
            https = issue_certificate(ca, "web-server", https_names, now=now)
            data |= {"https.crt": https.cert_pem + ca.cert_pem, "https.key": https.key_pem}
        kube.apply(_secret(namespace, name, data))
        written[name] = why
        log.info("issued %s (%s), valid until %s", name, why, leaf.cert.not_valid_after_utc)
    return Issued(written)
