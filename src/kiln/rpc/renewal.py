"""Issue and renew internal service certificates before they expire.

On one machine every service can read the CA (``DATA_DIR/pki``), so each process renews its
own certificate: ``ensure_service_certificate`` at start-up, then ``CertificateRenewer`` in the
background. The files are replaced by rename; ``kiln.rpc.tls`` notices and uses the new pair
for new connections, so nothing restarts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from cryptography import x509

from kiln.pki.ca import (
    SERVICE_LIFETIME,
    CertificateAuthority,
    issue_service_certificate,
    save_leaf,
    service_dns_name,
    service_spiffe_id,
)
from kiln.rpc.identity import CertFiles, Service

log = logging.getLogger("kiln.rpc")

# Renew when less than this share of the certificate's lifetime remains (24 h → after 16 h).
RENEW_FRACTION = 1 / 3


def renewal_due(
    cert: x509.Certificate, *, fraction: float = RENEW_FRACTION, now: dt.datetime | None = None
) -> bool:
    now = now or dt.datetime.now(dt.UTC)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * fraction


def _needs_new_certificate(
    files: CertFiles, service: Service, ca_cert: x509.Certificate, fraction: float
) -> str | None:
    """Why ``files`` must be reissued, or None when the current certificate is fine."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        files.key.stat()
    except (OSError, ValueError):
        return "missing or unreadable"
    if cert.issuer != ca_cert.subject:
        return "issued by another CA"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no SAN"
    names = set(san.get_values_for_type(x509.UniformResourceIdentifier))
    names |= set(san.get_values_for_type(x509.DNSName))
    if names != {service_spiffe_id(service.value), service_dns_name(service.value)}:
        return "names changed"
    if renewal_due(cert, fraction=fraction):
        return "near expiry"
    return None


def ensure_service_certificate(
    authority: CertificateAuthority,
    service: Service,
    *,
    lifetime: dt.timedelta = SERVICE_LIFETIME,
    fraction: float = RENEW_FRACTION,
) -> bool:
    """Make sure ``service``'s certificate files exist and are not due for renewal; reissue
    them from the CA otherwise. Returns True when a new certificate was written.

    Where another component holds the CA's key (a cluster: ``kiln pki issue-secrets``
    delivers the files, mounted read-only) this issues nothing and the files are used as
    they are: the holder renews them.
    """
    if authority.delivered:
        return False
    ca = authority.load_or_create()
    files = CertFiles.for_service(authority.dir, service)
    reason = _needs_new_certificate(files, service, ca.cert, fraction)
    if reason is None:
        return False
    leaf = issue_service_certificate(ca, service.value, lifetime=lifetime)
    save_leaf(leaf, ca, files.cert, files.key)
    log.info(
        "issued %s certificate (%s), serial %x, valid until %s",
        service.spiffe_id,
        reason,
        leaf.cert.serial_number,
        leaf.cert.not_valid_after_utc.isoformat(),
    )
    return True


class CertificateRenewer:
    """Background thread calling ``ensure_service_certificate`` every ``interval`` seconds.

    A failed attempt is logged and retried at the next interval; with the default 24 h lifetime
    and renewal at 1/3, there are 8 hours of retries before the certificate actually expires.
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        service: Service,
        *,
        interval: float = 60.0,
        lifetime: dt.timedelta = SERVICE_LIFETIME,
        fraction: float = RENEW_FRACTION,
    ) -> None:
        self.authority, self.service = authority, service
        self.interval, self.lifetime, self.fraction = interval, lifetime, fraction
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> bool:
        return ensure_service_certificate(
            self.authority, self.service, lifetime=self.lifetime, fraction=self.fraction
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_now()
            except Exception:
                log.exception("renewing the %s certificate failed; retrying", self.service.value)

    def start(self) -> None:
        self.check_now()  # at start-up a failure is fatal: without a certificate we cannot serve
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"cert-renewer-{self.service.value}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
