"""Kiln's internal CA: what it signs, where it keeps keys, and when it renews."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kiln.pki.ca import (
    CertificateAuthority,
    content_domain,
    issue_certificate,
    make_ca,
    spiffe_ids,
    web_server_names,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ca_is_a_ca_that_signs_only_leaves() -> None:
    ca = make_ca()
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.cert.verify_directly_issued_by(ca.cert)  # self-signed
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert lifetime > dt.timedelta(days=365 * 5)


def test_a_leaf_carries_dns_ip_and_spiffe_names_and_its_usages() -> None:
    ca = make_ca()
    names = ["localhost", "127.0.0.1", "::1", "*.kiln.example", "spiffe://kiln/web"]
    leaf = issue_certificate(ca, "web", names, server=True, client=True)
    leaf.cert.verify_directly_issued_by(ca.cert)
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "*.kiln.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert spiffe_ids(leaf.cert) == ["spiffe://kiln/web"]
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_only = issue_certificate(ca, "web", ["localhost"])
    eku = server_only.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_web_server_names_cover_localhost_and_the_domain() -> None:
    assert web_server_names("localhost") == [
        "localhost",
        "127.0.0.1",
        "::1",
        "*.kiln.localhost",
        "10.0.2.2",  # where sessions of the local runtime see the host's loopback
    ]
    names = web_server_names("kiln.example.org")
    assert {"kiln.example.org", "*.kiln.example.org", "localhost"} <= set(names)


def test_the_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    first = authority.load_or_create()
    assert mode(tmp_path / "pki") == 0o700
    assert mode(authority.key_path) == 0o600
    again = CertificateAuthority(tmp_path / "pki").load_or_create()
    assert again.cert == first.cert


def test_a_leaf_is_kept_while_fresh_and_a_tls_client_trusts_it(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    cert_path, key_path = authority.ensure_leaf("web-server", web_server_names("localhost"))
    assert mode(key_path) == 0o600
    serial = load(cert_path).serial_number
    authority.ensure_leaf("web-server", web_server_names("localhost"))
    assert load(cert_path).serial_number == serial, "a fresh certificate is not reissued"
    # The files work as they are for a real TLS server, and clients trusting ca.crt accept it.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(authority.cert_path))
    for name in ("localhost", "127.0.0.1"):
        tls_handshake(server, client, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(server, client, "kiln.example.org")


def test_user_content_subdomains_of_a_real_domain_are_covered(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    cert_path, key_path = authority.ensure_leaf("web", web_server_names("kiln.example.org"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(authority.cert_path))
    for name in ("kiln.example.org", "app-1.kiln.example.org", "localhost"):
        tls_handshake(server, client, name)


def test_user_content_subdomains_of_localhost_are_covered(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    cert_path, key_path = authority.ensure_leaf("web", web_server_names("localhost"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(authority.cert_path))
    tls_handshake(server, client, f"session-1.{content_domain('localhost')}")
    tls_handshake(server, client, "localhost")


def tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A complete TLS handshake in memory, as a browser or git would do it."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(client_in, client_out, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(client_out.read())
        client_in.write(to_client.read())
        if all(done.values()):
            return
    raise AssertionError("the TLS handshake did not finish")


def test_a_leaf_is_renewed_near_expiry_or_when_its_names_change(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    ca = authority.load_or_create()
    names = web_server_names("localhost")
    cert_path, key_path = authority.ensure_leaf("web-server", names)
    # Replace it with one that expires in ten days: inside the 30-day renewal window.
    short = issue_certificate(ca, "web-server", names, lifetime=dt.timedelta(days=10))
    cert_path.write_bytes(short.cert_pem + ca.cert_pem)
    key_path.write_bytes(short.key_pem)
    authority.ensure_leaf("web-server", names)
    renewed = load(cert_path)
    assert renewed.serial_number != short.cert.serial_number
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
    # A new domain means new names.
    authority.ensure_leaf("web-server", web_server_names("kiln.example.org"))
    san = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "kiln.example.org" in san.value.get_values_for_type(x509.DNSName)


def test_a_leaf_from_a_replaced_ca_is_reissued(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "pki")
    cert_path, _ = authority.ensure_leaf("web-server", ["localhost"])
    authority.cert_path.unlink()  # an admin resets the CA
    authority.key_path.unlink()
    new_ca = authority.load_or_create()
    authority.ensure_leaf("web-server", ["localhost"])
    load(cert_path).verify_directly_issued_by(new_ca.cert)
