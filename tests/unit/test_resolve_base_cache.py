"""``resolve_base`` finds a base image it unpacked before in the runtime cache (kept under its
layers' chain id) and fetches only the image's config again, not its layers: the runner
resolves a model image each time it starts a replica."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from kiln.build.bases import resolve_base
from kiln.build.layers import CONFIG, LAYER_GZIP, MANIFEST
from kiln.build.registry_client import Manifest, Reference


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OneImageRegistry:
    """An ImageTarget holding one image of one layer, counting the blobs it serves."""

    def __init__(self) -> None:
        plain = io.BytesIO()
        with tarfile.open(fileobj=plain, mode="w") as tar:
            data = b"hello\n"
            entry = tarfile.TarInfo("etc/greeting")
            entry.size, entry.mode = len(data), 0o644
            tar.addfile(entry, io.BytesIO(data))
        layer = gzip.compress(plain.getvalue(), mtime=0)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [_sha(plain.getvalue())]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": _sha(config), "size": len(config)},
                "layers": [{"mediaType": LAYER_GZIP, "digest": _sha(layer), "size": len(layer)}],
            }
        ).encode()
        self.blobs = {_sha(config): config, _sha(layer): layer}
        self.layer_digest = _sha(layer)
        self.manifest = Manifest(manifest, MANIFEST, _sha(manifest))
        self.fetched: list[str] = []

    def get_manifest(self, reference: Reference) -> Manifest:
        return self.manifest

    def fetch_blob(self, repository: str, digest: str, dest: Path) -> int:
        self.fetched.append(digest)
        dest.write_bytes(self.blobs[digest])
        return len(self.blobs[digest])


def test_a_base_unpacked_before_is_not_fetched_again(tmp_path: Path) -> None:
    registry = OneImageRegistry()
    reference = Reference.parse("runtimes/tiny:1")
    first = resolve_base(registry, reference, tmp_path)  # type: ignore[arg-type]
    assert (first.rootfs / "etc" / "greeting").read_text() == "hello\n"
    assert registry.layer_digest in registry.fetched

    registry.fetched.clear()
    again = resolve_base(registry, reference, tmp_path)  # type: ignore[arg-type]
    assert again.rootfs == first.rootfs
    assert registry.fetched == [again.config_digest]  # the config alone
