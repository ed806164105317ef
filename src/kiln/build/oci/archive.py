"""Reading an image archive: find the one image in an ``oci-archive`` or ``docker-archive``
tar, and verify every blob against its digest before anything is unpacked.

Both formats end up as an :class:`ImagePlan`: the image config (its sha256 is the image ID and
the cache key) and the layers in order, each with the digest of the blob as stored (OCI
descriptors; docker archives only when the file is named by its digest) and its ``diff_id``
(sha256 of the *uncompressed* tar, from the config) which the unpacker checks on the fly.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kiln.domain.errors import InvalidInput

Progress = Callable[[int, int, str], None]  # (bytes_done, bytes_total, stage)

OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
CHUNK = 1 << 20
JSON_MAX_BYTES = 4 << 20  # index, manifest, config: a real one is a few KiB
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX_IN_NAME = re.compile(r"(?:^|/)(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?$")
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MAX_INDEX_DEPTH = 3


class ImageArchiveError(InvalidInput):
    """The archive is not a usable image: malformed, tampered with, unsafe or too big."""


@dataclass(frozen=True)
class Layer:
    member: str  # file inside the archive
    size: int | None  # declared size of the blob (OCI descriptors)
    digest: str | None  # expected sha256 of the blob as stored, when the format says
    diff_id: str  # expected sha256 of the uncompressed tar (image config rootfs.diff_ids)


@dataclass(frozen=True)
class ImagePlan:
    format: str
    config_digest: str  # "sha256:<hex>": the image ID, and the cache key
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    ref_name: str | None  # a tag from the archive (OCI ref.name annotation, docker RepoTags)


def digest_hex(digest: object, what: str) -> str:
    if not isinstance(digest, str) or not (match := _DIGEST.match(digest)):
        raise ImageArchiveError(f"{what}: unsupported or malformed digest {digest!r}")
    return match[1]


class ImageArchive:
    """An opened archive (an uncompressed tar, random access). Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by close())
        except (OSError, tarfile.TarError) as exc:
            raise ImageArchiveError(f"{path.name} is not a readable tar archive: {exc}") from exc
        try:
            self._members = {
                _normalize(m.name): m for m in self._tar.getmembers() if m.isfile() or m.issym()
            }
        except (OSError, tarfile.TarError, EOFError) as exc:
            self._tar.close()
            raise ImageArchiveError(f"{path.name} is a damaged tar archive: {exc}") from exc

    def __enter__(self) -> ImageArchive:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    # -- members --------------------------------------------------------------------------
    def _member(self, name: str, what: str) -> tarfile.TarInfo:
        member = self._members.get(_normalize(name))
        for _ in range(8):  # docker save links duplicate layers to the first copy
            if member is None or not member.issym():
                break
            target = _normalize(_join(_parent(_normalize(member.name)), member.linkname))
            member = self._members.get(target)
        if member is None or not member.isfile():
            raise ImageArchiveError(f"{what} is missing from the archive ({name})")
        return member

    def open_member(self, name: str, what: str) -> IO[bytes]:
        stream = self._tar.extractfile(self._member(name, what))
        assert stream is not None  # a regular file always has a stream
        return stream

    def member_size(self, name: str, what: str) -> int:
        return self._member(name, what).size

    def read_json(self, name: str, what: str, digest: str | None = None) -> tuple[Any, str]:
        """The parsed document and the sha256 hex of its bytes (checked against ``digest``)."""
        member = self._member(name, what)
        if member.size > JSON_MAX_BYTES:
            raise ImageArchiveError(f"{what} is {member.size} bytes, over {JSON_MAX_BYTES}")
        with self.open_member(name, what) as stream:
            data = stream.read()
        actual = hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest_hex(digest, what):
            raise ImageArchiveError(f"{what}: digest mismatch (expected {digest}, got {actual})")
        try:
            return json.loads(data), actual
        except ValueError as exc:
            raise ImageArchiveError(f"{what} is not valid JSON: {exc}") from exc

    def has(self, name: str) -> bool:
        return _normalize(name) in self._members

    # -- the image ------------------------------------------------------------------------
    def plan(self) -> ImagePlan:
        if self.has("oci-layout") and self.has("index.json"):
            return self._oci_plan()
        if self.has("manifest.json"):
            return self._docker_plan()
        raise ImageArchiveError(
            f"{self.path.name} is neither an oci-archive (oci-layout, index.json) nor a "
            "docker-archive (manifest.json)"
        )

    def _oci_plan(self) -> ImagePlan:
        layout, _ = self.read_json("oci-layout", "oci-layout")
        if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
            raise ImageArchiveError("oci-layout: unsupported imageLayoutVersion")
        index, _ = self.read_json("index.json", "index.json")
        descriptor, ref_name = self._pick_manifest(index, "index.json", 0)
        manifest = self._blob_json(descriptor, "image manifest")
        config_desc = manifest.get("config") if isinstance(manifest, dict) else None
        layer_descs = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(config_desc, dict) or not isinstance(layer_descs, list):
            raise ImageArchiveError("image manifest has no config or layers")
        config = self._blob_json(config_desc, "image config")
        config_hex = digest_hex(config_desc.get("digest"), "image config")
        diff_ids = _diff_ids(config, len(layer_descs))
        layers = []
        for number, (desc, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True), 1):
            if not isinstance(desc, dict):
                raise ImageArchiveError(f"layer {number}: malformed descriptor")
            hex_ = digest_hex(desc.get("digest"), f"layer {number}")
            size = desc.get("size")
            layers.append(
                Layer(
                    member=f"blobs/sha256/{hex_}",
                    size=size if isinstance(size, int) else None,
                    digest=f"sha256:{hex_}",
                    diff_id=diff_id,
                )
            )
        return ImagePlan(OCI_ARCHIVE, f"sha256:{config_hex}", config, tuple(layers), ref_name)

    def _blob_json(self, descriptor: dict[str, Any], what: str) -> Any:
        hex_ = digest_hex(descriptor.get("digest"), what)
        name = f"blobs/sha256/{hex_}"
        size = descriptor.get("size")
        if isinstance(size, int) and self.member_size(name, what) != size:
            raise ImageArchiveError(f"{what}: blob size differs from its descriptor")
        document, _ = self.read_json(name, what, f"sha256:{hex_}")
        if not isinstance(document, dict):
            raise ImageArchiveError(f"{what} is not a JSON object")
        return document

    def _pick_manifest(
        self, index: Any, what: str, depth: int
    ) -> tuple[dict[str, Any], str | None]:
        """The linux/amd64 manifest, or the only one; nested indexes are followed."""
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise ImageArchiveError(f"{what} lists no manifests")
        candidates = [m for m in manifests if isinstance(m, dict)]
        if len(candidates) > 1:
            candidates = [
                m
                for m in candidates
                if (m.get("platform") or {}).get("os") == "linux"
                and (m.get("platform") or {}).get("architecture") == "amd64"
            ]
        if len(candidates) != 1:
            platforms = sorted(
                "{os}/{architecture}".format_map(
                    {"os": "?", "architecture": "?", **(m.get("platform") or {})}
                )
                for m in manifests
                if isinstance(m, dict)
            )
            raise ImageArchiveError(
                f"{what}: expected one linux/amd64 image, found {len(candidates)} "
                f"among {len(manifests)} manifests ({', '.join(platforms)})"
            )
        chosen = candidates[0]
        annotations = chosen.get("annotations") or {}
        ref_name = annotations.get("org.opencontainers.image.ref.name")
        if chosen.get("mediaType") in _INDEX_TYPES:
            if depth >= _MAX_INDEX_DEPTH:
                raise ImageArchiveError(f"{what}: image indexes nested too deep")
            nested, nested_ref = self._pick_manifest(
                self._blob_json(chosen, "nested image index"), "nested image index", depth + 1
            )
            return nested, nested_ref or ref_name
        return chosen, ref_name if isinstance(ref_name, str) else None

    def _docker_plan(self) -> ImagePlan:
        manifest, _ = self.read_json("manifest.json", "manifest.json")
        if (
            not isinstance(manifest, list)
            or len(manifest) != 1
            or not isinstance(manifest[0], dict)
        ):
            count = len(manifest) if isinstance(manifest, list) else 0
            raise ImageArchiveError(
                f"manifest.json must describe exactly one image (it describes {count})"
            )
        entry = manifest[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageArchiveError("manifest.json: entry without Config or Layers")
        named = _HEX_IN_NAME.search(_normalize(config_name))
        config, config_hex = self.read_json(
            config_name, "image config", f"sha256:{named[1]}" if named else None
        )
        if not isinstance(config, dict):
            raise ImageArchiveError("image config is not a JSON object")
        diff_ids = _diff_ids(config, len(layer_names))
        layers = []
        for number, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True), 1):
            if not isinstance(name, str):
                raise ImageArchiveError(f"manifest.json: layer {number} is not a file name")
            by_digest = _HEX_IN_NAME.search(_normalize(name))
            layers.append(
                Layer(
                    member=name,
                    size=None,
                    digest=f"sha256:{by_digest[1]}" if by_digest else None,
                    diff_id=diff_id,
                )
            )
        tags = entry.get("RepoTags")
        ref_name = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else None
        return ImagePlan(DOCKER_ARCHIVE, f"sha256:{config_hex}", config, tuple(layers), ref_name)

    # -- verification ---------------------------------------------------------------------
    def verify_layers(
        self, plan: ImagePlan, progress: Progress | None = None, first: int = 0
    ) -> int:
        """Hash every layer blob from ``first`` on (0-based) that has a stored digest;
        returns their total blob bytes. Blobs without one (most docker archives) are checked
        against their diff_id while they are unpacked instead."""
        numbered = _numbered(plan)[first:]
        sizes = [self.member_size(layer.member, _label(n)) for n, layer in numbered]
        total, done = sum(sizes), 0
        for (number, layer), size in zip(numbered, sizes, strict=True):
            what = _label(number)
            if layer.size is not None and layer.size != size:
                raise ImageArchiveError(
                    f"{what}: blob is {size} bytes, its descriptor says {layer.size}"
                )
            if layer.digest is None:
                done += size
                continue
            with self.open_member(layer.member, what) as stream:
                done = verify_stream(stream, layer.digest, what, done, total, progress)
        return total


def verify_stream(
    stream: IO[bytes], digest: str, what: str, done: int, total: int, progress: Progress | None
) -> int:
    """Hash ``stream`` against ``digest`` (sha256 or sha512), reporting progress; returns
    ``done`` plus the bytes read."""
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise ImageArchiveError(f"{what}: unsupported digest {digest[:80]!r}")
    h = hashlib.new(algorithm)
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total, "verify")
    if f"{algorithm}:{h.hexdigest()}" != digest:
        raise ImageArchiveError(
            f"{what}: digest mismatch (expected {digest}, got {algorithm}:{h.hexdigest()})"
        )
    return done


def _label(number: int) -> str:
    return f"layer {number}"


def _numbered(plan: ImagePlan) -> list[tuple[int, Layer]]:
    return list(enumerate(plan.layers, 1))


def _diff_ids(config: dict[str, Any], count: int) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) != count:
        raise ImageArchiveError(
            f"image config lists {len(ids) if isinstance(ids, list) else 'no'} diff_ids "
            f"for {count} layers"
        )
    for number, diff_id in enumerate(ids, 1):
        digest_hex(diff_id, f"image config diff_id {number}")
    return [str(d) for d in ids]


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _parent(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _join(base: str, target: str) -> str:
    parts = [] if target.startswith("/") or not base else base.split("/")
    for part in target.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)
