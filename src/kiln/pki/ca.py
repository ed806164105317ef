"""Kiln's internal certificate authority.

One CA per site (``DATA_DIR/pki/ca.crt`` + ``ca.key``, mode 0600) signs the public HTTPS
certificate and every internal service's certificate. Service certificates carry their identity
as a SPIFFE URI SAN (``spiffe://kiln/web``); gRPC peers authorize on it.

Building certificates is pure (``issue_certificate`` takes keys and names, returns objects);
reading and writing PEM files happens in ``CertificateAuthority`` only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=397)
SPIFFE_PREFIX = "spiffe://kiln/"


@dataclass(frozen=True)
class IssuedCert:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "Kiln internal CA", now: dt.datetime | None = None) -> IssuedCert:
    now = now or dt.datetime.now(dt.UTC)
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(cert, key)


def _san_entry(name: str) -> x509.GeneralName:
    if name.startswith("spiffe://"):
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_certificate(
    ca: IssuedCert,
    common_name: str,
    sans: list[str],
    *,
    lifetime: dt.timedelta = SERVER_LIFETIME,
    server: bool = True,
    client: bool = False,
    now: dt.datetime | None = None,
    organization: str | None = None,
) -> IssuedCert:
    """A leaf certificate signed by ``ca``: DNS names, IPs and spiffe:// URIs as SANs.
    ``organization`` sets the subject's O (Kubernetes reads a client's groups from it)."""
    now = now or dt.datetime.now(dt.UTC)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    key = new_key()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in sans]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCert(cert, key)


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(SPIFFE_PREFIX)
    ]


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


class CertificateAuthority:
    """The CA's files in ``directory``; created on first use."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cert_path = directory / "ca.crt"
        self.key_path = directory / "ca.key"

    @property
    def delivered(self) -> bool:
        """Certificates are delivered by the CA's one holder (a cluster's ``kiln pki``):
        this directory has the CA's certificate but not its key. Nothing is issued here."""
        return self.cert_path.exists() and not self.key_path.exists()

    def load_or_create(self) -> IssuedCert:
        if self.cert_path.exists() and self.key_path.exists():
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return IssuedCert(cert, key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        ca = make_ca()
        _write_private(self.key_path, ca.key_pem)
        self.cert_path.write_bytes(ca.cert_pem)
        return ca

    def ensure_leaf(
        self,
        name: str,
        sans: list[str],
        *,
        server: bool = True,
        client: bool = False,
        renew_before: dt.timedelta = dt.timedelta(days=30),
    ) -> tuple[Path, Path]:
        """(cert, key) paths for ``name``; reissued when missing, near expiry, or the names
        changed (for example a new domain), or the CA was replaced."""
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if self.delivered:
            if cert_path.exists() and key_path.exists():
                return cert_path, key_path
            raise FileNotFoundError(
                f"{cert_path}: not delivered yet (the CA's key is held elsewhere: kiln pki)"
            )
        ca = self.load_or_create()
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            current = sans_of(cert)
            fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > renew_before
            if fresh and current == sorted(sans) and _issued_by(cert, ca.cert):
                return cert_path, key_path
        leaf = issue_certificate(ca, name, sans, server=server, client=client)
        _write_private(key_path, leaf.key_pem)
        cert_path.write_bytes(leaf.cert_pem + ca.cert_pem)
        return cert_path, key_path


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sans_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    names += san.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    names += san.get_values_for_type(x509.UniformResourceIdentifier)
    return sorted(names)


def content_domain(domain: str) -> str:
    """The parent domain of user content (sessions, apps: ``<id>.<content domain>``).

    A wildcard certificate needs two labels under the ``*`` (TLS clients never match
    ``*.localhost``), so a one-label domain gets a ``kiln.`` sub-domain for content.
    """
    return domain if "." in domain else f"kiln.{domain}"


# Where a sandbox of the local runtime sees the host's loopback (slirp4netns's gateway): a
# session calls the API there (kiln.runner.webaccess), and verifies this certificate as usual.
WORKLOAD_GATEWAY = "10.0.2.2"


def web_server_names(domain: str) -> list[str]:
    """Names on the public HTTPS certificate: the UI's host, every user-content host, and
    the address sessions reach the web tier at."""
    names = ["localhost", "127.0.0.1", "::1"]
    if domain not in names:
        names.append(domain)
    names.append(f"*.{content_domain(domain)}")
    names.append(WORKLOAD_GATEWAY)
    return names


# --- Internal service certificates (gRPC + mutual TLS) -------------------------------------
# A service certificate names its identity twice: the SPIFFE URI (``spiffe://kiln/runner``) is
# what servers authorize callers on; the DNS name (``runner.kiln.internal``, never resolved) is
# what clients verify servers against through gRPC's target-name override, because gRPC's
# hostname check looks only at DNS/IP SANs. One certificate serves both directions.

SERVICE_LIFETIME = dt.timedelta(hours=24)
SERVICE_DNS_SUFFIX = ".kiln.internal"
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


def service_spiffe_id(service: str) -> str:
    return f"{SPIFFE_PREFIX}{service}"


def service_dns_name(service: str) -> str:
    return f"{service}{SERVICE_DNS_SUFFIX}"


def issue_service_certificate(
    ca: IssuedCert,
    service: str,
    *,
    lifetime: dt.timedelta = SERVICE_LIFETIME,
    now: dt.datetime | None = None,
) -> IssuedCert:
    """A certificate for internal service ``service`` usable as gRPC server and client."""
    if not _SERVICE_NAME.fullmatch(service):
        raise ValueError(f"invalid service name {service!r}")
    return issue_certificate(
        ca,
        f"kiln-{service}",
        [service_spiffe_id(service), service_dns_name(service)],
        lifetime=lifetime,
        server=True,
        client=True,
        now=now,
    )


def save_leaf(leaf: IssuedCert, ca: IssuedCert, cert_path: Path, key_path: Path) -> None:
    """Write ``leaf``'s key (0600) and its chain (leaf + CA), each replaced atomically.

    The two files are not replaced together: a reader that sees a new key beside an old
    certificate must treat the pair as not ready yet and retry (kiln.rpc.tls does)."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, leaf.key_pem)
    _write_private(cert_path, leaf.cert_pem + ca.cert_pem)
