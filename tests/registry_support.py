"""Helpers for the registry tests: raw OCI distribution API calls through a client (the
TestClient or httpx against a live server), tokens, and small images."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import httpx

from tests.conftest import Account

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(username: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{username}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def token(client: Any, who: Account, *scopes: str) -> str:
    """A registry token from /v2/token with ``who``'s API key as the password."""
    params = [("service", "kiln-registry")] + [("scope", s) for s in scopes]
    response = client.get("/v2/token", params=params, headers=basic(who.username, who.key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token"] == body["access_token"]
    return str(body["token"])


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def errors_of(response: httpx.Response) -> list[str]:
    """The OCI error codes of a response (its body must be the spec's error format)."""
    body = response.json()
    assert set(body) == {"errors"}, body
    for error in body["errors"]:
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return [e["code"] for e in body["errors"]]


def layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip layer blob and its diff_id."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0), sha256(raw)


@dataclass
class Image:
    config: bytes
    layers: list[bytes]
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


def make_image(files: dict[str, bytes] | None = None, **extra: Any) -> Image:
    blob, diff_id = layer(files or {"hello.txt": b"hello\n"})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(blob), "size": len(blob)}],
        **extra,
    }
    return Image(config, [blob], json.dumps(manifest).encode())


def push_blob(client: Any, repo: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
    """Monolithic: POST ?digest= with the body."""
    return client.post(
        f"/v2/{repo}/blobs/uploads/",
        params={"digest": sha256(data)},
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )


def push_image(
    client: Any, repo: str, image: Image, tag: str, headers: dict[str, str]
) -> httpx.Response:
    for blob in image.blobs:
        response = push_blob(client, repo, blob, headers)
        assert response.status_code == 201, response.text
    return client.put(
        f"/v2/{repo}/manifests/{tag}",
        content=image.manifest,
        headers={**headers, "Content-Type": OCI_MANIFEST},
    )
