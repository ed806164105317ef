"""Mutual-TLS credentials for internal gRPC that follow certificate renewals without a restart.

Servers: ``server_credentials(files)`` requires a client certificate signed by Kiln's CA and
re-reads the PEM files whenever they change. gRPC asks our fetcher before every new TLS
handshake, so a renewed certificate is served from the next connection on; connections already
open keep the certificate they were made with (TLS never re-checks a live connection).

Clients: ``ServiceChannel`` builds a channel that presents this service's own certificate and
verifies the server's DNS SAN (``runner.kiln.internal``), i.e. that it really talks to the
runner. When this process's certificate files change, the next ``get()`` returns a new channel
made with the new credentials; channel credentials in gRPC are immutable, so that is the only way.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kiln.rpc.identity import CertFiles, Service

log = logging.getLogger("kiln.rpc")

# (inode, mtime, size) of cert, key and CA: renewal replaces files by rename, so any change shows.
_Signature = tuple[tuple[int, int, int], ...]


class CertFilesNotReady(ValueError):
    """The files are missing, unparsable, or the key does not belong to the certificate."""


@dataclass(frozen=True)
class KeyPair:
    key_pem: bytes
    chain_pem: bytes  # leaf first, then the CA
    ca_pem: bytes
    leaf: x509.Certificate


def load_key_pair(files: CertFiles) -> KeyPair:
    """Read ``files`` and check they form a usable set; raise CertFilesNotReady otherwise."""
    try:
        key_pem, chain_pem, ca_pem = (
            files.key.read_bytes(),
            files.cert.read_bytes(),
            files.ca.read_bytes(),
        )
        leaf = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        x509.load_pem_x509_certificate(ca_pem)
    except (OSError, ValueError, TypeError) as exc:
        raise CertFilesNotReady(f"{files.cert}: {exc}") from exc
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        # Normal for a moment during renewal: key and certificate are two renames.
        raise CertFilesNotReady(f"{files.key} does not match {files.cert}")
    return KeyPair(key_pem, chain_pem, ca_pem, leaf)


def _public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _signature(files: CertFiles) -> _Signature | None:
    try:
        stats = [os.stat(p) for p in (files.cert, files.key, files.ca)]
    except OSError:
        return None
    return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)


class ReloadingKeyPair:
    """The newest valid key pair in ``files``. Loading must succeed once, at construction;
    afterwards a broken or half-written set is ignored (the last good pair stays) and retried
    when the files change again."""

    def __init__(self, files: CertFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = _signature(files)
        self.current = load_key_pair(files)

    def refresh(self) -> KeyPair | None:
        """A newly loaded pair if the files changed into a valid set since the last call,
        else None. Cheap when nothing changed (three stat calls)."""
        signature = _signature(self.files)
        with self._lock:
            if signature is None or signature == self._seen:
                return None
            try:
                pair = load_key_pair(self.files)
            except CertFilesNotReady as exc:
                log.warning("certificate files changed but are not usable yet: %s", exc)
                self._seen = signature  # don't re-parse on every handshake; retry on next change
                return None
            # The signature taken *before* reading: if a file was replaced while we read, the
            # next call sees a difference and loads again rather than missing the change.
            self._seen = signature
            self.current = pair
            log.info(
                "loaded certificate %s (serial %x, expires %s)",
                self.files.cert,
                pair.leaf.serial_number,
                pair.leaf.not_valid_after_utc.isoformat(),
            )
            return pair


def _server_config(pair: KeyPair) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(pair.key_pem, pair.chain_pem)], root_certificates=pair.ca_pem
    )


def server_credentials(files: CertFiles) -> grpc.ServerCredentials:
    """Credentials that demand and verify a client certificate from Kiln's CA, and pick up
    renewed files (including a new CA bundle) at the next handshake."""
    source = ReloadingKeyPair(files)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs on a gRPC core thread before each handshake: must be quick and must not raise.
        try:
            pair = source.refresh()
        except Exception:
            log.exception("reloading %s failed; keeping the current certificate", files.cert)
            return None
        return None if pair is None else _server_config(pair)

    return grpc.dynamic_ssl_server_credentials(
        _server_config(source.current), fetch, require_client_authentication=True
    )


def channel_credentials(pair: KeyPair) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pair.ca_pem, private_key=pair.key_pem, certificate_chain=pair.chain_pem
    )


class ServiceChannel:
    """A client channel to one internal service, authenticated with this service's own
    certificate, that switches to renewed credentials by itself.

    Call ``get()`` for each use (``RunnerStub(channel.get()).GetStatus(...)``); do not keep
    the returned channel for long. After a renewal the previous channel stays open, so RPCs in
    flight (a log stream, an exec session) finish; it is closed at the following renewal or by
    ``close()``.
    """

    def __init__(
        self,
        target: str,
        server: Service,
        files: CertFiles,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.server = server
        self._options = [
            ("grpc.ssl_target_name_override", server.dns_name),
            ("grpc.default_authority", server.dns_name),
            *options,
        ]
        self._source = ReloadingKeyPair(files)
        self._lock = threading.Lock()
        self._channel = self._open(self._source.current)
        self._retired: grpc.Channel | None = None

    def _open(self, pair: KeyPair) -> grpc.Channel:
        return grpc.secure_channel(self.target, channel_credentials(pair), options=self._options)

    def get(self) -> grpc.Channel:
        pair = self._source.refresh()
        with self._lock:
            if pair is not None:
                if self._retired is not None:
                    self._retired.close()
                self._retired, self._channel = self._channel, self._open(pair)
            return self._channel

    def close(self) -> None:
        with self._lock:
            for channel in (self._retired, self._channel):
                if channel is not None:
                    channel.close()
            self._retired = None

    def __enter__(self) -> ServiceChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
