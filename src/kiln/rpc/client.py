"""The web process's channel to an internal service, made on first use.

One per (process, service). The first ``get()`` makes sure the web tier's own certificate
exists and is not due for renewal (certificates live 24 h and a renewal is due after 16 h,
so a check per new channel is enough for a process restarted daily; longer-lived processes
get a new pair whenever the files change, through ``ServiceChannel.get``).
"""

from __future__ import annotations

import threading

import grpc

from kiln.pki.ca import CertificateAuthority
from kiln.rpc.identity import CertFiles, Service
from kiln.rpc.renewal import ensure_service_certificate
from kiln.rpc.tls import ServiceChannel
from kiln.settings import Settings


class LazyServiceChannel:
    def __init__(self, settings: Settings, server: Service, target: str) -> None:
        self.settings = settings
        self.server = server
        self.target = target
        self._lock = threading.Lock()
        self._channel: ServiceChannel | None = None

    def get(self) -> grpc.Channel:
        """The channel; ``OSError``/``ValueError`` when the CA or certificates are unusable."""
        with self._lock:
            if self._channel is None:
                pki = self.settings.pki_dir
                ensure_service_certificate(CertificateAuthority(pki), Service.WEB)
                self._channel = ServiceChannel(
                    self.target, self.server, CertFiles.for_service(pki, Service.WEB)
                )
            channel = self._channel
        return channel.get()

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
