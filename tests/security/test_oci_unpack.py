"""Hostile image archives: each is refused with a precise message and leaves no rootfs."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from kiln.build.oci import ImageArchiveError, UnpackLimits, load_image_archive
from kiln.build.oci.testing import (
    DROP,
    Entry,
    image_config,
    layer_tar,
    sha256,
    write_docker_archive,
    write_oci_archive,
)
from kiln.domain.errors import InvalidInput

BASE = layer_tar([Entry("usr/bin/sh", data=b"sh", mode=0o755), Entry("etc", "dir")])


def _refused(
    tmp_path: Path, layers: list[bytes], match: str, limits: UnpackLimits | None = None
) -> ImageArchiveError:
    archive = tmp_path / "bad.tar"
    write_oci_archive(archive, layers)
    return _refused_archive(tmp_path, archive, match, limits)


def _refused_archive(
    tmp_path: Path, archive: Path, match: str, limits: UnpackLimits | None = None
) -> ImageArchiveError:
    cache = tmp_path / "cache"
    with pytest.raises(ImageArchiveError, match=match) as caught:
        load_image_archive(archive, cache, limits=limits)
    assert isinstance(caught.value, InvalidInput) and caught.value.status == 422
    leftovers = list((cache / "rootfs").iterdir()) if (cache / "rootfs").exists() else []
    assert leftovers == [], "a partial rootfs was left in the cache"
    return caught.value


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory a hostile image would love to write into."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "victim").write_text("untouched")
    return target


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"


def test_dotdot_entry(tmp_path: Path) -> None:
    bad = layer_tar([Entry("usr/../../../escape", data=b"x")])
    _refused(tmp_path, [BASE, bad], r"layer 2: path 'usr/../../../escape' escapes with '\.\.'")


def test_absolute_path(tmp_path: Path) -> None:
    bad = layer_tar([Entry("/etc/passwd", data=b"root::0:0")])
    _refused(tmp_path, [bad], r"layer 1: absolute path '/etc/passwd'")


def test_symlink_then_file_through_it(tmp_path: Path, outside: Path) -> None:
    bad = layer_tar(
        [Entry("evil", "symlink", target=str(outside)), Entry("evil/victim", data=b"pwned")]
    )
    _refused(tmp_path, [bad], r"path 'evil/victim' goes through 'evil', which is a symlink")
    _untouched(outside)


def test_symlink_in_lower_layer_then_file_through_it(tmp_path: Path, outside: Path) -> None:
    lower = layer_tar([Entry("usr/lib", "symlink", target=str(outside))])
    upper = layer_tar([Entry("usr/lib/newfile", data=b"pwned")])
    _refused(tmp_path, [BASE, lower, upper], r"layer 3: path 'usr/lib/newfile' goes through")
    _untouched(outside)


def test_relative_symlink_escape_across_layers(tmp_path: Path, outside: Path) -> None:
    depth = len(tmp_path.parts) + 5
    lower = layer_tar([Entry("up", "symlink", target="../" * depth + str(outside).lstrip("/"))])
    upper = layer_tar([Entry("up/victim", data=b"pwned"), Entry("up/new", data=b"x")])
    _refused(tmp_path, [lower, upper], r"goes through 'up', which is a symlink")
    _untouched(outside)


def test_whiteout_through_a_symlink(tmp_path: Path, outside: Path) -> None:
    lower = layer_tar([Entry("link", "symlink", target=str(outside))])
    upper = layer_tar([Entry("link/.wh.victim")])
    _refused(tmp_path, [lower, upper], r"goes through 'link', which is a symlink")
    _untouched(outside)


def test_opaque_dir_through_a_symlink_deletes_nothing_outside(
    tmp_path: Path, outside: Path
) -> None:
    lower = layer_tar([Entry("link", "symlink", target=str(outside))])
    upper = layer_tar([Entry("link/.wh..wh..opq")])
    archive = tmp_path / "opq.tar"
    write_oci_archive(archive, [BASE, lower, upper])
    image = load_image_archive(archive, tmp_path / "cache")  # nothing to hide below
    assert image.rootfs is not None and (image.rootfs / "link").is_symlink()
    _untouched(outside)


@pytest.mark.parametrize(
    ("kind", "word"), [("chr", "a device node"), ("blk", "a device node"), ("fifo", "a FIFO")]
)
def test_device_nodes_and_fifos(tmp_path: Path, kind: str, word: str) -> None:
    bad = layer_tar([Entry("dev", "dir"), Entry("dev/thing", kind)])
    _refused(tmp_path, [BASE, bad], f"layer 2: 'dev/thing' is {word}")


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("../../etc/passwd", r"escapes with '\.\.'"),
        ("/etc/passwd", r"absolute path '/etc/passwd'"),
        ("etc/missing", r"points to a file that does not exist"),
        ("etc", r"points to a directory"),
    ],
)
def test_hard_links_must_stay_inside(tmp_path: Path, target: str, match: str) -> None:
    bad = layer_tar([Entry("usr/bin/link", "hardlink", target=target)])
    _refused(tmp_path, [BASE, bad], match)


def test_hard_link_through_a_symlinked_parent(tmp_path: Path, outside: Path) -> None:
    lower = layer_tar([Entry("out", "symlink", target=str(outside))])
    upper = layer_tar([Entry("stolen", "hardlink", target="out/victim")])
    _refused(tmp_path, [lower, upper], r"goes through 'out', which is a symlink")


def test_layer_digest_mismatch(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    stored = gzip.compress(BASE, mtime=0)
    write_oci_archive(archive, [BASE], blobs={sha256(stored): stored + b"tampered"})
    _refused_archive(tmp_path, archive, r"layer 1: blob is \d+ bytes, its descriptor says")


def test_layer_content_tampered_same_size(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    stored = gzip.compress(BASE, mtime=0)
    flipped = stored[:-12] + bytes([stored[-12] ^ 1]) + stored[-11:]
    write_oci_archive(archive, [BASE], blobs={sha256(stored): flipped})
    _refused_archive(tmp_path, archive, r"layer 1: digest mismatch \(expected sha256:")


def test_config_diff_id_mismatch(tmp_path: Path) -> None:
    other = layer_tar([Entry("usr/bin/other", data=b"o")])
    archive = tmp_path / "bad.tar"
    write_oci_archive(archive, [BASE], config=image_config([other]))
    _refused_archive(tmp_path, archive, r"layer 1: uncompressed digest mismatch")


def test_docker_archive_layer_not_matching_diff_id(tmp_path: Path) -> None:
    other = layer_tar([Entry("usr/bin/other", data=b"o")])
    archive = tmp_path / "bad-docker.tar"
    write_docker_archive(archive, [BASE], config=image_config([other]))
    _refused_archive(tmp_path, archive, r"layer 1: uncompressed digest mismatch")


def test_missing_blob(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    write_oci_archive(archive, [BASE], blobs={sha256(gzip.compress(BASE, mtime=0)): DROP})
    _refused_archive(tmp_path, archive, r"layer 1 is missing from the archive \(blobs/sha256/")


def test_not_an_image(tmp_path: Path) -> None:
    archive = tmp_path / "plain.tar"
    archive.write_bytes(BASE)
    _refused_archive(tmp_path, archive, "neither an oci-archive .* nor a docker-archive")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    _refused_archive(tmp_path, junk, "is not a readable tar archive")


def test_size_cap_from_headers(tmp_path: Path) -> None:
    big = layer_tar([Entry("usr/big", data=b"\0" * 300_000)])
    error = _refused(
        tmp_path, [BASE, big], "unpacks to more than 100000 bytes", UnpackLimits(max_bytes=100_000)
    )
    assert "layer 2" in error.detail


def test_entry_count_cap(tmp_path: Path) -> None:
    many = layer_tar([Entry(f"f{n}", data=b"") for n in range(60)])
    _refused(tmp_path, [many], "more than 50 entries", UnpackLimits(max_entries=50))


def test_decompression_bomb_after_the_tar_end(tmp_path: Path) -> None:
    """Legit headers, then 64 MiB of zeros the tar reader never asks for: caught while
    hashing the stream for its diff_id, before it is all inflated."""
    bomb = BASE + b"\0" * (64 << 20)
    _refused(
        tmp_path,
        [bomb],
        "layer 1 decompresses to more than",
        UnpackLimits(max_bytes=1 << 20, max_entries=100),
    )


def test_failure_in_a_late_layer_leaves_nothing(tmp_path: Path) -> None:
    good = layer_tar([Entry(f"usr/share/{n}", data=b"data" * 100) for n in range(200)])
    bad = layer_tar([Entry("dev/null", "chr")])
    _refused(tmp_path, [BASE, good, bad], "layer 3: 'dev/null' is a device node")
    # and the cache still works for a good image afterwards
    archive = tmp_path / "good.tar"
    write_oci_archive(archive, [BASE, good])
    assert load_image_archive(archive, tmp_path / "cache").rootfs is not None


def test_entry_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    upper = layer_tar([Entry("usr/bin/sh/inside", data=b"x")])
    _refused(tmp_path, [BASE, upper], r"goes through 'usr/bin/sh', which is not a directory")


def test_truncated_archive(tmp_path: Path) -> None:
    archive = tmp_path / "whole.tar"
    big = layer_tar([Entry(f"usr/share/{n}", data=os.urandom(2048)) for n in range(50)])
    write_oci_archive(archive, [BASE, big], compress=False)
    data = archive.read_bytes()
    # cut inside the last member's data, keeping whole 512-byte blocks
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) - 40 * 512])
    _refused_archive(
        tmp_path, truncated, "truncated.tar is a damaged tar archive: unexpected end of data"
    )


def test_name_the_filesystem_refuses(tmp_path: Path) -> None:
    bad = layer_tar([Entry("usr/" + "n" * 300, data=b"x")])
    _refused(tmp_path, [BASE, bad], r"layer 2: cannot write 'usr/nnn.*': File name too long")
