"""Writing small image archives with tarfile, for tests (ours and the catalog's callers).

``Entry`` describes one layer member; ``layer_tar`` builds a layer, ``write_oci_archive`` and
``write_docker_archive`` wrap layers into the two archive formats, digests all correct unless
a test tampers with them afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | chr | blk | fifo
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink or hard link target
    size: int | None = None  # override the header size (with no data: a lying header)


def layer_tar(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    types = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = types[entry.kind]
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            info.linkname = entry.target
            if entry.kind == "file":
                info.size = len(entry.data) if entry.size is None else entry.size
                tar.addfile(info, io.BytesIO(entry.data) if entry.size is None else None)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: list[bytes], env: list[str] | None = None) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_oci_archive(
    path: Path,
    layers: list[bytes],
    *,
    compress: bool = True,
    config: dict[str, Any] | None = None,
    ref_name: str | None = "example/test:1",
    blobs: dict[str, bytes] | None = None,
) -> str:
    """An oci-archive of one image; returns its config digest. ``blobs`` replaces stored
    blobs by digest (to tamper) — map a digest to b"" ... or drop it with ``DROP``."""
    config_doc = config or image_config(layers)
    config_bytes = json.dumps(config_doc).encode()
    stored = [gzip.compress(layer, mtime=0) if compress else layer for layer in layers]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": OCI_LAYER_GZIP if compress else OCI_LAYER,
                "digest": sha256(b),
                "size": len(b),
            }
            for b in stored
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    descriptor: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": sha256(manifest_bytes),
        "size": len(manifest_bytes),
    }
    if ref_name:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    contents = {sha256(b): b for b in [config_bytes, manifest_bytes, *stored]}
    contents.update(blobs or {})
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        for digest, data in contents.items():
            if data is not DROP:
                _add(tar, "blobs/sha256/" + digest.removeprefix("sha256:"), data)
    return sha256(config_bytes)


DROP = b"<drop this blob>"


def write_docker_archive(
    path: Path, layers: list[bytes], *, config: dict[str, Any] | None = None
) -> str:
    """A docker-archive (``docker save`` layout) of one image; returns its config digest."""
    config_bytes = json.dumps(config or image_config(layers)).encode()
    config_hex = sha256(config_bytes).removeprefix("sha256:")
    names = [
        f"{sha256(layer).removeprefix('sha256:')[:16]}{n}/layer.tar"
        for n, layer in enumerate(layers)
    ]
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": ["example/test:1"], "Layers": names}]
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, f"{config_hex}.json", config_bytes)
        for name, layer in zip(names, layers, strict=True):
            _add(tar, name, layer)
    return sha256(config_bytes)
