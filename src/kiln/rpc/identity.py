"""Kiln's internal service identities and where each one's certificate lives."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from kiln.pki.ca import service_dns_name, service_spiffe_id


class Service(enum.StrEnum):
    """Every internal service that holds a certificate. Workloads never do."""

    WEB = "web"
    RUNNER = "runner"
    BUILDER = "builder"

    @property
    def spiffe_id(self) -> str:
        return service_spiffe_id(self.value)

    @property
    def dns_name(self) -> str:
        """The name clients verify this service's server certificate against."""
        return service_dns_name(self.value)


WEB = Service.WEB.spiffe_id
RUNNER = Service.RUNNER.spiffe_id
BUILDER = Service.BUILDER.spiffe_id
ANY_SERVICE = frozenset(s.spiffe_id for s in Service)


@dataclass(frozen=True)
class CertFiles:
    """One service's PEM files: its chain (leaf + CA), its key, and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def for_service(cls, pki_dir: Path, service: Service) -> CertFiles:
        """The standard layout under ``Settings.pki_dir``: ``services/<name>.crt|.key``."""
        return cls(
            cert=pki_dir / "services" / f"{service.value}.crt",
            key=pki_dir / "services" / f"{service.value}.key",
            ca=pki_dir / "ca.crt",
        )
