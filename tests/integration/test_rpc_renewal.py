"""Certificate renewal without restarts, on a real gRPC server with real certificate files.

What a server presents is read from a raw TLS handshake (Python's ssl module), so these tests
see the certificate on the wire, not what our own code believes it loaded.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from kiln.pki.ca import issue_service_certificate, make_ca, save_leaf
from kiln.rpc import runner_pb2, runner_pb2_grpc
from kiln.rpc.identity import WEB, CertFiles, Service
from kiln.rpc.renewal import CertificateRenewer, ensure_service_certificate, renewal_due
from kiln.rpc.testing import EchoRunner, TestPki, running_runner
from kiln.rpc.tls import ServiceChannel

TIMEOUT = 10


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def served_serial(port: int, client: CertFiles) -> int:
    """Serial number of the certificate the server presents on a new connection."""
    ctx = ssl.create_default_context(cafile=str(client.ca))
    ctx.load_cert_chain(client.cert, client.key)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=Service.RUNNER.dns_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(files: CertFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def ping(port: int, client: CertFiles) -> str:
    """Ping over a brand-new channel (so a brand-new TLS handshake)."""
    with ServiceChannel(f"127.0.0.1:{port}", Service.RUNNER, client) as channel:
        stub = runner_pb2_grpc.RunnerStub(channel.get())
        return stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity


def force_renewal(pki: TestPki, service: Service) -> None:
    # fraction=1.0: "renew when less than the whole lifetime remains", i.e. always.
    assert ensure_service_certificate(pki.authority, service, fraction=1.0)


def test_new_connections_get_the_renewed_server_certificate_without_a_restart(pki: TestPki) -> None:
    runner, web = pki.files(Service.RUNNER), pki.files(Service.WEB)
    with running_runner(runner, EchoRunner()) as port:
        old = file_serial(runner)
        assert served_serial(port, web) == old
        with ServiceChannel(f"127.0.0.1:{port}", Service.RUNNER, web) as long_lived:
            stub = runner_pb2_grpc.RunnerStub(long_lived.get())
            assert stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity == WEB

            force_renewal(pki, Service.RUNNER)

            new = file_serial(runner)
            assert new != old
            assert served_serial(port, web) == new
            assert ping(port, web) == WEB
            # The connection made before the renewal keeps working.
            assert stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity == WEB


def test_an_expired_server_certificate_is_renewed_in_place(pki: TestPki) -> None:
    runner, web = CertFiles.for_service(pki.directory, Service.RUNNER), pki.files(Service.WEB)
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    stale = issue_service_certificate(
        pki.ca, "runner", lifetime=dt.timedelta(days=1), now=two_days_ago
    )
    save_leaf(stale, pki.ca, runner.cert, runner.key)
    echo = EchoRunner()
    with running_runner(runner, echo) as port:
        with pytest.raises(grpc.RpcError) as refused:
            ping(port, web)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        assert ensure_service_certificate(pki.authority, Service.RUNNER)

        assert ping(port, web) == WEB
    assert echo.calls == [("Ping", WEB)]


def test_a_half_written_renewal_is_not_served(pki: TestPki) -> None:
    runner, web = pki.files(Service.RUNNER), pki.files(Service.WEB)
    with running_runner(runner, EchoRunner()) as port:
        old = file_serial(runner)
        fresh = issue_service_certificate(pki.ca, "runner")
        runner.key.write_bytes(fresh.key_pem)  # the key is renamed first; the chain not yet

        assert served_serial(port, web) == old  # old pair kept, no broken handshake
        assert ping(port, web) == WEB

        runner.cert.write_bytes(fresh.cert_pem + pki.ca.cert_pem)
        assert served_serial(port, web) == fresh.cert.serial_number


def test_the_client_presents_its_renewed_certificate(pki: TestPki) -> None:
    web = pki.files(Service.WEB)
    echo = EchoRunner()
    with (
        running_runner(pki.files(Service.RUNNER), echo) as port,
        ServiceChannel(f"127.0.0.1:{port}", Service.RUNNER, web) as channel,
    ):
        runner_pb2_grpc.RunnerStub(channel.get()).Ping(runner_pb2.PingRequest(), timeout=TIMEOUT)
        force_renewal(pki, Service.WEB)
        runner_pb2_grpc.RunnerStub(channel.get()).Ping(runner_pb2.PingRequest(), timeout=TIMEOUT)

    presented = [x509.load_pem_x509_certificate(pem).serial_number for pem in echo.peer_certs]
    assert len(presented) == 2
    assert presented[0] != presented[1] == file_serial(web)


def test_the_renewer_replaces_a_due_certificate_in_the_background(pki: TestPki) -> None:
    runner, web = pki.files(Service.RUNNER), pki.files(Service.WEB)
    renewer = CertificateRenewer(pki.authority, Service.RUNNER, interval=0.05)
    with running_runner(runner, EchoRunner()) as port:
        renewer.start()
        try:
            fresh = file_serial(runner)
            time.sleep(0.3)
            assert file_serial(runner) == fresh  # not due: left alone

            # 4 h left of 24 h is under a third: due.
            twenty_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=20)
            due = issue_service_certificate(pki.ca, "runner", now=twenty_hours_ago)
            save_leaf(due, pki.ca, runner.cert, runner.key)
            deadline = time.monotonic() + 10
            while file_serial(runner) == due.cert.serial_number and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            renewer.stop()
        renewed = file_serial(runner)
        assert renewed not in (fresh, due.cert.serial_number)
        assert served_serial(port, web) == renewed


def test_a_certificate_from_a_previous_ca_is_reissued(pki: TestPki) -> None:
    runner = CertFiles.for_service(pki.directory, Service.RUNNER)
    old_ca = make_ca("retired CA")
    save_leaf(issue_service_certificate(old_ca, "runner"), old_ca, runner.cert, runner.key)

    assert ensure_service_certificate(pki.authority, Service.RUNNER)
    assert not ensure_service_certificate(pki.authority, Service.RUNNER)  # now fine: kept
    issuer = x509.load_pem_x509_certificate(runner.cert.read_bytes()).issuer
    assert issuer == pki.ca.cert.subject


def test_renewal_is_due_when_under_a_third_of_the_lifetime_remains(pki: TestPki) -> None:
    cert = issue_service_certificate(pki.ca, "web").cert
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    third_left = cert.not_valid_after_utc - lifetime / 3
    assert not renewal_due(cert, now=third_left - dt.timedelta(minutes=1))
    assert renewal_due(cert, now=third_left + dt.timedelta(minutes=1))
