"""Runtimes from Kiln's own registry: resolve ``runtimes/python:3.12`` to an image manifest,
then unpack its layers from the registry's blob store into the rootfs cache (only the layers
the cache lacks; see ``cache.unpack_image``).

Verification is the archive's: the manifest is found by tag or digest in the repository, the
config's bytes must hash to the manifest's config digest, every new layer blob to its
descriptor's digest, and every layer's uncompressed stream to the config's ``diff_id``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from kiln.build.oci.archive import (
    JSON_MAX_BYTES,
    ImageArchiveError,
    ImagePlan,
    Layer,
    Progress,
    digest_hex,
    verify_stream,
)
from kiln.build.oci.cache import unpack_image
from kiln.build.oci.unpack import UnpackLimits
from kiln.build.registry.errors import RegistryError
from kiln.build.registry.manifests import INDEX_TYPES
from kiln.build.registry.names import (
    check_digest,
    check_tag,
    digest_of,
    is_digest,
    parse_repository,
)
from kiln.build.registry.service import Registry
from kiln.build.registry.storage import BlobStore
from kiln.runtimes.catalog import RuntimeImage

REGISTRY = "registry"
_MAX_INDEX_DEPTH = 3
_HOST = re.compile(r"[^/]*[.:][^/]*|localhost")


@dataclass(frozen=True)
class ImageRef:
    repository: str
    reference: str  # a tag or a digest

    def __str__(self) -> str:
        sep = "@" if is_digest(self.reference) else ":"
        return f"{self.repository}{sep}{self.reference}"


def parse_image_ref(text: str) -> ImageRef:
    """``runtimes/python:3.12``, ``runtimes/python@sha256:…`` or ``runtimes/python`` (tag
    ``latest``); a leading ``host[:port]/`` (as podman shows it) is dropped."""
    text = text.strip()
    first, _, rest = text.partition("/")
    if rest and _HOST.fullmatch(first):
        text = rest
    if "@" in text:
        repository, _, reference = text.partition("@")
        check_digest(reference)
    else:
        head, _, tail = text.rpartition(":")
        repository, reference = (head, tail) if head and "/" not in tail else (text, "latest")
        check_tag(reference)
    parse_repository(repository)
    return ImageRef(repository, reference)


class RegistryLayers:
    """Layer blobs from the registry's store (members are blob digests)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    def open_member(self, member: str, what: str) -> IO[bytes]:
        try:
            return self.store.open(member)
        except RegistryError:
            raise ImageArchiveError(f"{what}: blob {member} is missing from the registry") from None

    def member_size(self, member: str, what: str) -> int:
        size = self.store.size(member)
        if size is None:
            raise ImageArchiveError(f"{what}: blob {member} is missing from the registry")
        return size

    def verify_layers(
        self, plan: ImagePlan, progress: Progress | None = None, first: int = 0
    ) -> int:
        todo = list(enumerate(plan.layers, 1))[first:]
        total = sum(self.member_size(layer.member, f"layer {n}") for n, layer in todo)
        done = 0
        for number, layer in todo:
            assert layer.digest is not None  # registry layers always have one
            with self.open_member(layer.member, f"layer {number}") as stream:
                done = verify_stream(stream, layer.digest, f"layer {number}", done, total, progress)
        return total


def registry_plan(registry: Registry, db: Session, ref: ImageRef) -> tuple[ImagePlan, str]:
    """The image ``ref`` names (the linux/amd64 one of an index) and its manifest digest."""
    manifest = registry.get_manifest(db, ref.repository, ref.reference)
    document = _json(manifest.content, "manifest")
    digest = manifest.digest
    for _ in range(_MAX_INDEX_DEPTH):
        if manifest.media_type not in INDEX_TYPES:
            break
        digest = _pick_platform(document, str(ref))
        manifest = registry.get_manifest(db, ref.repository, digest)
        document = _json(manifest.content, "manifest")
    else:
        raise ImageArchiveError(f"{ref}: image indexes nested too deep")
    config_desc, layer_descs = document.get("config"), document.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layer_descs, list):
        raise ImageArchiveError(f"{ref}: the manifest has no config or layers")
    config_digest = str(config_desc.get("digest"))
    registry.stat_blob(db, ref.repository, config_digest)
    with registry.store.open(config_digest) as stream:
        raw = stream.read(JSON_MAX_BYTES + 1)
    if len(raw) > JSON_MAX_BYTES:
        raise ImageArchiveError(f"{ref}: the image config is over {JSON_MAX_BYTES} bytes")
    if digest_of(raw, config_digest.partition(":")[0]) != config_digest:
        raise ImageArchiveError(f"{ref}: the image config does not match its digest")
    config = _json(raw, "image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_descs):
        raise ImageArchiveError(
            f"{ref}: the image config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'}"
            f" diff_ids for {len(layer_descs)} layers"
        )
    layers = []
    for number, (desc, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True), 1):
        digest_hex(diff_id, f"image config diff_id {number}")
        if not isinstance(desc, dict):
            raise ImageArchiveError(f"layer {number}: malformed descriptor")
        blob = registry.stat_blob(db, ref.repository, str(desc.get("digest")))
        layers.append(Layer(blob.digest, blob.size, blob.digest, str(diff_id)))
    plan = ImagePlan(REGISTRY, config_digest, config, tuple(layers), str(ref))
    return plan, digest


def load_registry_image(
    registry: Registry,
    db: Session,
    ref: ImageRef,
    cache_dir: Path,
    *,
    name: str,
    limits: UnpackLimits | None = None,
    progress: Progress | None = None,
) -> tuple[RuntimeImage, str]:
    """Unpack ``ref`` from the registry into ``cache_dir``; returns the image and the digest
    of the image manifest that was unpacked (what a runtime records and the registry keeps)."""
    plan, manifest_digest = registry_plan(registry, db, ref)
    image = unpack_image(
        RegistryLayers(registry.store), plan, cache_dir, name=name, limits=limits, progress=progress
    )
    return image, manifest_digest


def _pick_platform(index: dict[str, Any], what: str) -> str:
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if len(manifests) > 1:
        manifests = [
            m
            for m in manifests
            if (m.get("platform") or {}).get("os") == "linux"
            and (m.get("platform") or {}).get("architecture") == "amd64"
        ]
    if len(manifests) != 1:
        raise ImageArchiveError(f"{what}: expected one linux/amd64 image in the index")
    return str(manifests[0].get("digest"))


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ImageArchiveError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ImageArchiveError(f"{what} is not a JSON object")
    return document
