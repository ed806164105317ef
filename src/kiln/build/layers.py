"""OCI image pieces a build writes: layers, configs, manifests — all byte-for-byte reproducible.

A layer arrives as an uncompressed tar *stream* (``git archive``, or the tar a build sandbox
wrote) and Kiln never looks inside it: it only hashes the bytes (the ``diff_id``) and
compresses them with a fixed gzip header (no file name, mtime 0), hashing the result (the
blob ``digest``). The same tar therefore always gives the same digests on the same zlib.
JSON documents are written canonically (sorted keys, no spaces), so the same content is the
same blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (INDEX, DOCKER_LIST)
# gzip level: fixed, because it is part of what makes a layer's digest reproducible.
GZIP_LEVEL = 6
_CHUNK = 1024 * 1024


class LayerTooLarge(Exception):
    """The uncompressed stream passed its byte limit."""


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: a config, a manifest or a compressed layer."""

    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type}


@dataclass(frozen=True)
class Layer(Blob):
    """A compressed layer and the digest of its uncompressed tar (the config's diff_id)."""

    diff_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "diff_id": self.diff_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layer:
        return cls(
            str(data["digest"]), int(data["size"]), str(data["media_type"]), str(data["diff_id"])
        )


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_blob(document: Mapping[str, Any], media_type: str) -> tuple[Blob, bytes]:
    data = canonical_json(document)
    return Blob(sha256_digest(data), len(data), media_type), data


def compress_layer(chunks: Iterable[bytes], out: BinaryIO, *, limit: int | None = None) -> Layer:
    """Gzip an uncompressed tar stream into ``out``; returns the layer's digests and size.

    The gzip header is zlib's own (mtime 0, no name), so equal input gives equal output.
    ``limit`` bounds the uncompressed bytes read (``LayerTooLarge`` past it)."""
    diff = hashlib.sha256()
    blob = hashlib.sha256()
    size = seen = 0
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for chunk in chunks:
        seen += len(chunk)
        if limit is not None and seen > limit:
            raise LayerTooLarge(f"the layer is larger than {limit} bytes")
        diff.update(chunk)
        packed = packer.compress(chunk)
        if packed:
            blob.update(packed)
            out.write(packed)
            size += len(packed)
    packed = packer.flush()
    blob.update(packed)
    out.write(packed)
    size += len(packed)
    return Layer(
        "sha256:" + blob.hexdigest(), size, LAYER_GZIP, diff_id="sha256:" + diff.hexdigest()
    )


def read_chunks(stream: BinaryIO, chunk: int = _CHUNK) -> Iterable[bytes]:
    while data := stream.read(chunk):
        yield data


def compress_file(source: Path, dest: Path, *, limit: int | None = None) -> Layer:
    """``compress_layer`` of a tar file into ``dest`` (never following a symlink at
    ``source``: it may be a file a sandbox wrote)."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as stream, dest.open("wb") as out:
        return compress_layer(read_chunks(stream), out, limit=limit)


def image_manifest(
    config: Blob, layers: Sequence[Blob], annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return manifest
