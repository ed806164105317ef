"""Interoperability with a real OCI client: archives written or rewritten by skopeo load,
and unpack to the same root filesystem as the ones we write ourselves."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kiln.build.oci import load_image_archive
from kiln.build.oci.testing import Entry, layer_tar, write_docker_archive, write_oci_archive
from kiln.runtimes.catalog import EDITOR_JUPYTERLAB

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")

BASE = layer_tar(
    [
        Entry("usr/bin/python3.11", data=b"\x7fELF", mode=0o755),
        Entry("usr/bin/python3", "symlink", target="python3.11"),
        Entry("usr/bin/hard", "hardlink", target="usr/bin/python3.11"),
        Entry("opt/app/lower.txt", data=b"lower"),
        Entry("etc/old", data=b"old"),
    ]
)
TOP = layer_tar(
    [
        Entry("etc/.wh.old"),
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/upper.txt", data=b"upper"),
        Entry("usr/local/bin/jupyter-lab", data=b"#!", mode=0o755),
    ]
)


def _skopeo(source: str, dest: str) -> None:
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", source, dest],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _tree(root: Path) -> dict[str, str]:
    """Every path with what it is: content, link target, or 'dir'."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = "-> " + str(path.readlink())
        elif path.is_dir():
            tree[rel] = "dir"
        else:
            tree[rel] = path.read_text(errors="replace") + f" ({path.stat().st_mode & 0o777:o})"
    return tree


def test_skopeo_converted_archives_unpack_identically(tmp_path: Path) -> None:
    ours_oci = tmp_path / "ours-oci.tar"
    ours_docker = tmp_path / "ours-docker.tar"
    write_oci_archive(ours_oci, [BASE, TOP])
    write_docker_archive(ours_docker, [BASE, TOP])
    theirs_docker = tmp_path / "skopeo-docker.tar"
    theirs_oci = tmp_path / "skopeo-oci.tar"
    _skopeo(f"oci-archive:{ours_oci}", f"docker-archive:{theirs_docker}:example/x:1")
    _skopeo(f"docker-archive:{ours_docker}", f"oci-archive:{theirs_oci}:example/y:2")

    reference = load_image_archive(ours_oci, tmp_path / "cache-ours")
    assert reference.rootfs is not None
    expected = _tree(reference.rootfs)
    assert expected["opt/app/upper.txt"] == "upper (644)" and "opt/app/lower.txt" not in expected
    assert "etc/old" not in expected
    for archive, source, name, same_config in [
        # oci → docker keeps the config byte for byte: same image ID
        (theirs_docker, "docker-archive", "docker.io/example/x:1", True),
        # docker → oci re-serialises the config JSON (and gzips the layers with Go's gzip)
        (theirs_oci, "oci-archive", "example/y:2", False),
    ]:
        image = load_image_archive(archive, tmp_path / f"cache-{archive.stem}")
        assert (image.source, image.name) == (source, name)
        assert (image.digest == reference.digest) is same_config
        assert image.rootfs is not None and _tree(image.rootfs) == expected
        assert EDITOR_JUPYTERLAB in image.editors and image.python_version == "3.11"
        hard = image.rootfs / "usr/bin/hard"
        assert hard.stat().st_ino == (image.rootfs / "usr/bin/python3.11").stat().st_ino


def test_skopeo_reads_our_oci_layout(tmp_path: Path) -> None:
    """The other direction: skopeo accepts what we write (it verifies digests itself)."""
    ours = tmp_path / "ours.tar"
    digest = write_oci_archive(ours, [BASE, TOP])
    out = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", "--raw", f"oci-archive:{ours}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert json.loads(out)["config"]["digest"] == digest
