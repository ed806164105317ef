"""A build's base image: its manifest and config from the registry, its root filesystem from
the runtime cache.

The base is read from the same registry the build pushes to (``runtimes/python:3.11`` by
default). The build sandbox runs on the base's unpacked root filesystem, which the runtime
cache keeps by image id (``RUNTIMES_DIR/rootfs/<config sha256>``): a base used before is
not downloaded again; a new one is fetched into a temporary OCI archive and unpacked by the
same verified code path as ``kiln runtimes add``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.build.base_image import BaseArchive, archive_blobs, write_oci_archive
from kiln.build.layers import CONFIG, MANIFEST, MANIFEST_TYPES, Blob, Layer
from kiln.build.registry_client import Reference, RegistryError
from kiln.build.target import ImageTarget


class BaseUnavailable(Exception):
    """The base image cannot be used; the message says why."""


@dataclass(frozen=True)
class Base:
    reference: Reference
    manifest_digest: str
    config: dict[str, Any]
    config_digest: str
    layers: tuple[Layer, ...]
    rootfs: Path

    @property
    def env(self) -> dict[str, str]:
        """The base config's ``Env`` as a mapping (later entries win, as in a shell)."""
        pairs = (item.partition("=") for item in self.config.get("config", {}).get("Env") or [])
        return {name: value for name, _, value in pairs if name}


def _parse_manifest(data: bytes, media_type: str, what: str) -> dict[str, Any]:
    if media_type not in MANIFEST_TYPES:
        raise BaseUnavailable(f"{what} is a {media_type}, not an image manifest")
    manifest: dict[str, Any] = json.loads(data)
    return manifest


def resolve_base(
    target: ImageTarget, reference: Reference, runtimes_dir: Path, *, unpack: bool = True
) -> Base:
    """The base ``reference`` names, unpacked into the runtime cache if it is not yet
    (``unpack=False``: only its manifest and config are read; its ``rootfs`` may not exist,
    for a builder whose installs run as pods, which pull the base themselves)."""
    from kiln.build.oci.cache import chain_ids, load_image_archive, rootfs_path

    try:
        found = target.get_manifest(reference)
    except RegistryError as exc:
        if exc.status == 404:
            raise BaseUnavailable(f"base image {reference} is not in the registry") from None
        raise BaseUnavailable(f"base image {reference}: {exc}") from None
    manifest = _parse_manifest(found.data, found.media_type, str(reference))
    config_desc = manifest["config"]
    config_digest = str(config_desc["digest"])
    with tempfile.TemporaryDirectory(prefix="kiln-base-") as tmp:
        work = Path(tmp)
        config_path = work / "config.json"
        target.fetch_blob(reference.repository, config_digest, config_path)
        config_bytes = config_path.read_bytes()
        config = json.loads(config_bytes)
        diff_ids = config.get("rootfs", {}).get("diff_ids") or []
        if len(diff_ids) != len(manifest["layers"]):
            raise BaseUnavailable(f"base image {reference}: layers and diff_ids disagree")
        layers = tuple(
            Layer(str(d["digest"]), int(d["size"]), str(d["mediaType"]), str(diff_id))
            for d, diff_id in zip(manifest["layers"], diff_ids, strict=True)
        )
        if not layers:
            raise BaseUnavailable(f"base image {reference} has no layers")
        # The cache keeps a rootfs under its layers' chain id (``kiln.build.oci.cache``): an
        # image unpacked before is found there, and its layers are not fetched again.
        rootfs = rootfs_path(runtimes_dir, chain_ids([layer.diff_id for layer in layers])[-1])
        if unpack and not rootfs.is_dir():
            paths = []
            for layer in layers:
                path = work / layer.digest.split(":")[1]
                target.fetch_blob(reference.repository, layer.digest, path)
                paths.append((layer, path))
            archive = work / "base.oci.tar"
            write_oci_archive(
                archive,
                (Blob(found.digest, len(found.data), found.media_type), found.data),
                (Blob(config_digest, len(config_bytes), CONFIG), config_bytes),
                paths,
                reference.tag or "base",
            )
            image = load_image_archive(archive, runtimes_dir)
            if image.rootfs is None:
                raise BaseUnavailable(f"base image {reference} has no root filesystem")
            rootfs = image.rootfs
    return Base(reference, found.digest, config, config_digest, layers, rootfs)


def push_archive(
    target: ImageTarget, archive: BaseArchive, reference: Reference, work: Path
) -> str:
    """Push an OCI archive written by ``base_image`` under ``reference`` (blobs the registry
    already has are not sent again); returns the manifest digest."""
    with archive_blobs(archive.path, work) as blob_path:
        manifest_path = blob_path(archive.manifest_digest)
        manifest = json.loads(manifest_path.read_bytes())
        config = manifest["config"]
        blobs = [*archive.layers, Blob(config["digest"], int(config["size"]), CONFIG)]
        for blob in blobs:
            target.place_blob(
                reference.repository, blob, open_path=functools.partial(blob_path, blob.digest)
            )
        return target.put_manifest(
            reference.repository, reference.ref, manifest_path.read_bytes(), MANIFEST
        )
