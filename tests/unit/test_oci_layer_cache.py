"""The rootfs cache keeps layers by their chain: a new image on a cached base unpacks only
its new layers, and the snapshots it shares stay exactly as they were."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.build.oci import ImageArchiveError, load_image_archive
from kiln.build.oci.testing import Entry, layer_tar, write_oci_archive

BASE = layer_tar(
    [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/sh", data=b"#!shell\n", mode=0o755),
        Entry("etc/os-release", data=b"ID=base\n"),
        Entry("etc/motd", data=b"base motd\n"),
        Entry("readonly", "dir", mode=0o555),
        Entry("readonly/file", data=b"x"),
    ]
)
DEPS = layer_tar([Entry("opt/kiln/deps/pkg.py", data=b"VERSION = 1\n")])


def _code(text: bytes) -> bytes:
    return layer_tar(
        [
            Entry("etc/.wh.motd"),
            Entry("etc/os-release", data=b"ID=app\n"),
            Entry("home/cdsw/app.py", data=text),
            Entry("readonly/added", data=b"y"),
        ]
    )


def _add(tmp_path: Path, name: str, layers: list[bytes]) -> tuple[Path, list[tuple[int, int]]]:
    archive = tmp_path / f"{name}.tar"
    write_oci_archive(archive, layers)
    events: list[tuple[int, int, str]] = []
    image = load_image_archive(
        archive, tmp_path / "cache", progress=lambda d, t, s: events.append((d, t, s))
    )
    assert image.rootfs is not None
    return image.rootfs, [(d, t) for d, t, s in events if s == "unpack"]


def test_an_image_on_a_cached_base_unpacks_only_its_new_layers(tmp_path: Path) -> None:
    base, _ = _add(tmp_path, "base", [BASE])
    first, first_unpacked = _add(tmp_path, "v1", [BASE, DEPS, _code(b"print(1)\n")])
    assert len(first_unpacked) == 2  # deps and code: the base came from the cache
    second, second_unpacked = _add(tmp_path, "v2", [BASE, DEPS, _code(b"print(2)\n")])
    assert len(second_unpacked) == 1  # only the new code layer
    assert len({base, first, second}) == 3  # snapshots: base, +deps, +code 1, +code 2

    assert (second / "home/cdsw/app.py").read_bytes() == b"print(2)\n"
    assert (first / "home/cdsw/app.py").read_bytes() == b"print(1)\n"
    # the shared snapshots are untouched by what the upper layers overwrote or deleted
    assert (base / "etc/os-release").read_bytes() == b"ID=base\n"
    assert (base / "etc/motd").read_bytes() == b"base motd\n"
    assert not (second / "etc/motd").exists()
    assert not (base / "readonly/added").exists() and (second / "readonly/added").exists()
    assert not (base / "home").exists()
    # unchanged files are shared, not copied; directory modes survive the clone
    assert (second / "bin/sh").stat().st_ino == (base / "bin/sh").stat().st_ino
    assert (second / "opt/kiln/deps/pkg.py").stat().st_ino == (
        first / "opt/kiln/deps/pkg.py"
    ).stat().st_ino
    assert (second / "readonly").stat().st_mode & 0o777 == 0o555
    snapshots = sorted(p.name for p in (tmp_path / "cache/rootfs").iterdir())
    assert len(snapshots) == 4 and not any(n.startswith(".tmp-") for n in snapshots)


def test_a_bad_upper_layer_leaves_no_snapshot_of_its_add(tmp_path: Path) -> None:
    _add(tmp_path, "base", [BASE])
    before = sorted(os.listdir(tmp_path / "cache/rootfs"))
    evil = layer_tar([Entry("etc/escape", "symlink", target="/etc"), Entry("etc/escape/x")])
    archive = tmp_path / "evil.tar"
    write_oci_archive(archive, [BASE, DEPS, evil])
    with pytest.raises(ImageArchiveError, match="layer 3"):
        load_image_archive(archive, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache/rootfs")) == before  # not even DEPS's snapshot
