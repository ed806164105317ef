"""Manifests: parsing and checking what a client pushes, and writing image manifests.

Accepted: OCI image manifests and indexes, Docker schema 2 manifests and manifest lists.
Anything else (schema 1, an unknown media type, JSON that is not one of these) is refused
with MANIFEST_INVALID before anything is stored.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.build.registry.errors import DigestInvalid, ManifestInvalid
from kiln.build.registry.names import check_digest, digest_of

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Layers a registry need not hold (their ``urls`` say where they live).
_FOREIGN_LAYER_PREFIXES = (
    "application/vnd.oci.image.layer.nondistributable.",
    "application/vnd.docker.image.rootfs.foreign.",
)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    artifact_type: str  # for the referrers API (an image's defaults to its config's type)
    subject: str | None
    annotations: dict[str, str]
    blobs: tuple[Descriptor, ...]  # config and layers the repository must hold
    manifests: tuple[Descriptor, ...]  # an index's children, which it must hold too


def parse_manifest(body: bytes, content_type: str) -> ParsedManifest:
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(
            f"manifest is {len(body)} bytes, over the limit of {MAX_MANIFEST_BYTES}", status=413
        )
    media_type = content_type.split(";")[0].strip().lower()
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("manifest mediaType is not a string")
    if media_type not in MANIFEST_TYPES:
        if declared in MANIFEST_TYPES and media_type in ("", "application/json"):
            media_type = str(declared)
        else:
            raise ManifestInvalid(
                f"unsupported manifest media type {(media_type or declared or '')[:100]!r}; "
                f"this registry takes {', '.join(sorted(MANIFEST_TYPES))}"
            )
    if declared is not None and declared != media_type:
        raise ManifestInvalid(
            f"manifest mediaType {declared[:100]!r} differs from Content-Type {media_type!r}"
        )
    if document.get("schemaVersion") != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2")
    subject = document.get("subject")
    subject_digest = _descriptor(subject, "subject").digest if subject is not None else None
    annotations = _annotations(document.get("annotations"), "manifest annotations")
    artifact_type = _optional_str(document.get("artifactType"), "artifactType")
    if media_type in IMAGE_TYPES:
        config = _descriptor(document.get("config"), "config")
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalid("image manifest has no layers list")
        parsed_layers = [_descriptor(layer, f"layer {n}") for n, layer in enumerate(layers, 1)]
        required = [config, *(d for d in parsed_layers if not _is_foreign(d))]
        return ParsedManifest(
            media_type,
            artifact_type or config.media_type,
            subject_digest,
            annotations,
            tuple(required),
            (),
        )
    children = document.get("manifests")
    if not isinstance(children, list):
        raise ManifestInvalid("index has no manifests list")
    parsed = tuple(_descriptor(child, f"manifest {n}") for n, child in enumerate(children, 1))
    return ParsedManifest(media_type, artifact_type, subject_digest, annotations, (), parsed)


def _is_foreign(descriptor: Descriptor) -> bool:
    return descriptor.media_type.startswith(_FOREIGN_LAYER_PREFIXES)


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{what} is not a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{what} has no mediaType")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{what} has no digest")
    try:
        check_digest(digest)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{what}: {exc.detail}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{what} has no valid size")
    data = value.get("data")
    if data is not None:
        _check_embedded_data(data, digest, size, what)
    return Descriptor(
        media_type,
        digest,
        size,
        _optional_str(value.get("artifactType"), f"{what} artifactType"),
        _annotations(value.get("annotations"), f"{what} annotations"),
    )


def _check_embedded_data(data: object, digest: str, size: int, what: str) -> None:
    """A descriptor may carry its content inline (``data``); it must be that content."""
    if not isinstance(data, str):
        raise ManifestInvalid(f"{what}: data is not base64 text")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestInvalid(f"{what}: data is not valid base64") from None
    if len(raw) != size or digest_of(raw, digest.partition(":")[0]) != digest:
        raise ManifestInvalid(f"{what}: embedded data does not match its digest and size")


def _optional_str(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestInvalid(f"{what} is not a string")
    return value


def _annotations(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestInvalid(f"{what} must map strings to strings")
    return dict(value)


def image_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    annotations: dict[str, str] | None = None,
    subject: Descriptor | None = None,
) -> bytes:
    """The bytes of an OCI image manifest (compact JSON, keys in a fixed order, so the same
    inputs give the same digest)."""
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if subject is not None:
        document["subject"] = subject.to_json()
    if annotations:
        document["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(document, separators=(",", ":")).encode()
