"""Debian's ``docker-registry`` (the CNCF distribution registry) as a real peer for tests.

It serves HTTPS with a certificate from a Kiln CA and authenticates either with HTTP Basic
(htpasswd) or with the Docker token flow: a small token service here checks the password
and signs ES256 JWTs with a certificate the registry trusts (``rootcertbundle``), exactly
what a production token service does. Each registry is a child process on a free port with
its own storage directory; it is stopped when the context ends.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kiln.pki.ca import CertificateAuthority
from kiln.testing.live import free_port

USERNAME, PASSWORD = "kiln-test", "registry-test-password"
SERVICE = "kiln-test-registry"
ISSUER = "kiln-test-token-service"


@dataclass
class RunningRegistry:
    url: str  # https://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT, as image references name it
    username: str
    password: str
    ca_file: Path
    storage: Path
    auth: str
    tokens_issued: list[dict[str, Any]]


def available() -> bool:
    return shutil.which("docker-registry") is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, cert_der: bytes) -> str:
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _token_server(
    tls: tuple[Path, Path], signer: tuple[Path, Path], issued: list[dict[str, Any]]
) -> ThreadingHTTPServer:
    loaded = serialization.load_pem_private_key(signer[1].read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    signer_key: ec.EllipticCurvePrivateKey = loaded
    signer_der = x509.load_pem_x509_certificate(signer[0].read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    expected = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            # No OAuth2 password grant here, as on Docker's own token servers: 405 makes a
            # client that tries it first (containerd, with a pull secret) use GET instead.
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            query = parse_qs(urlsplit(self.path).query)
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "sub": USERNAME,
                "aud": query.get("service", [""])[0],
                "exp": now + 300,
                "nbf": now - 10,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": access,
            }
            issued.append(claims)
            body = json.dumps({"token": _jwt(claims, signer_key, signer_der), "expires_in": 300})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tls[0]), str(tls[1]))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


@contextmanager
def docker_registry(
    workdir: Path, ca: CertificateAuthority, auth: Literal["htpasswd", "token"] = "token"
) -> Iterator[RunningRegistry]:
    """A running registry; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca.load_or_create()
    cert, key = ca.ensure_leaf("registry", ["localhost", "127.0.0.1"])
    port = free_port()
    storage = workdir / "storage"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "tls": {"certificate": str(cert), "key": str(key)},
        },
    }
    issued: list[dict[str, Any]] = []
    token_server = None
    if auth == "htpasswd":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

            # bcrypt: the only scheme the registry's htpasswd accepts (not a weak hash).
            hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH))  # noqa: S324
        (workdir / "htpasswd").write_text(f"{USERNAME}:{hashed}\n")
        config["auth"] = {"htpasswd": {"realm": "kiln-test", "path": str(workdir / "htpasswd")}}
    else:
        signer = ca.ensure_leaf("registry-token", ["token.kiln.test"])
        token_server = _token_server((cert, key), signer, issued)
        threading.Thread(target=token_server.serve_forever, daemon=True).start()
        config["auth"] = {
            "token": {
                "realm": f"https://127.0.0.1:{token_server.server_address[1]}/token",
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(ca.cert_path),
            }
        }
    config_path = workdir / "config.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log = (workdir / "registry.log").open("wb")
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/v2/", verify=context, timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "docker-registry did not start: "
                        + (workdir / "registry.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        yield RunningRegistry(
            url, f"127.0.0.1:{port}", USERNAME, PASSWORD, ca.cert_path, storage, auth, issued
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if token_server is not None:
            token_server.shutdown()
            token_server.server_close()
