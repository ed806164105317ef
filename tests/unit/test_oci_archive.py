"""Adding runtimes from oci-archive and docker-archive tars built here with tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kiln.build.oci import ImageArchiveError, load_image_archive
from kiln.build.oci.cache import chain_ids
from kiln.build.oci.testing import (
    Entry,
    image_config,
    layer_tar,
    write_docker_archive,
    write_oci_archive,
)
from kiln.runtimes.catalog import EDITOR_JUPYTERLAB, EDITOR_TERMINAL, builtin_runtime

BASE = layer_tar(
    [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/sh", data=b"#!shell\n", mode=0o755),
        Entry("usr/", "dir", mode=0o755),
        Entry("usr/bin", "dir", mode=0o755),
        Entry("usr/bin/python3.11", data=b"\x7fELF python", mode=0o755),
        Entry("usr/bin/python3", "symlink", target="python3.11"),
        Entry("usr/bin/sudo", data=b"setuid", mode=0o4755),
        Entry("usr/bin/py-link", "hardlink", target="usr/bin/python3.11"),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/os-release", data=b"ID=test\n"),
        Entry("etc/old.conf", data=b"old\n"),
        Entry("opt/app/lower.txt", data=b"lower\n"),
        Entry("opt/app/keep/deep.txt", data=b"deep\n"),
        Entry("readonly", "dir", mode=0o555),
        Entry("readonly/file", data=b"x"),
    ]
)
TOP = layer_tar(
    [
        Entry("etc/.wh.old.conf"),
        Entry("opt/app/new.txt", data=b"new\n"),  # before the opaque marker: still kept
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/after.txt", data=b"after\n"),  # after it: kept too
        Entry("usr/local/bin/jupyter-lab", data=b"#!python\n", mode=0o755),
        Entry("bin/sh", data=b"#!shell v2\n", mode=0o755),
    ]
)


def _check_rootfs(root: Path) -> None:
    assert (root / "bin/sh").read_bytes() == b"#!shell v2\n"
    assert (root / "usr/bin/python3").readlink() == Path("python3.11")
    assert not (root / "etc/old.conf").exists()
    assert (root / "etc/os-release").read_text() == "ID=test\n"
    assert sorted(p.name for p in (root / "opt/app").iterdir()) == ["after.txt", "new.txt"]
    assert not (root / "etc/.wh.old.conf").exists()
    assert (root / "usr/bin/sudo").stat().st_mode & 0o7777 == 0o755  # setuid stripped
    assert (root / "usr/bin/py-link").stat().st_ino == (root / "usr/bin/python3.11").stat().st_ino
    assert (root / "readonly").stat().st_mode & 0o777 == 0o555
    assert (root / "readonly/file").read_bytes() == b"x"


@pytest.mark.parametrize("compress", [True, False])
def test_oci_archive_layers_whiteouts_and_catalog_facts(tmp_path: Path, compress: bool) -> None:
    archive = tmp_path / "image.tar"
    digest = write_oci_archive(archive, [BASE, TOP], compress=compress)
    image = load_image_archive(archive, tmp_path / "cache")
    assert image.digest == digest
    # the rootfs is the snapshot of the whole layer chain (ChainID of the diff_ids)
    diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in (BASE, TOP)]
    chain = chain_ids(diff_ids)
    assert chain[0] == diff_ids[0]
    assert (
        chain[1] == "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    )
    assert image.rootfs == tmp_path / "cache" / "rootfs" / chain[1].removeprefix("sha256:")
    assert image.source == "oci-archive"
    assert image.name == "example/test:1"
    assert image.editors == (EDITOR_TERMINAL, EDITOR_JUPYTERLAB)
    assert image.python_version == "3.11"
    final_files = [b"#!shell v2\n", b"\x7fELF python", b"setuid", b"ID=test\n", b"x", b"new\n"]
    final_files += [b"after\n", b"#!python\n"]  # py-link shares python3.11's inode
    assert image.size_bytes == sum(len(data) for data in final_files)
    _check_rootfs(image.rootfs)
    snapshots = sorted(p.name for p in (tmp_path / "cache" / "rootfs").iterdir())
    assert snapshots == sorted(c.removeprefix("sha256:") for c in chain)  # one per layer


def test_docker_archive_gives_the_same_image(tmp_path: Path) -> None:
    oci = load_image_archive(_oci(tmp_path), tmp_path / "cache")
    docker_tar = tmp_path / "docker.tar"
    write_docker_archive(docker_tar, [BASE, TOP])
    docker = load_image_archive(docker_tar, tmp_path / "cache2", name="mine")
    assert docker.source == "docker-archive"
    assert docker.name == "mine"
    assert docker.digest == oci.digest  # same config → same image ID and cache key
    assert docker.rootfs is not None
    _check_rootfs(docker.rootfs)


def _oci(tmp_path: Path) -> Path:
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, [BASE, TOP])
    return archive


def test_second_add_is_instant_and_reuses_the_rootfs(tmp_path: Path) -> None:
    big = layer_tar([Entry(f"usr/share/f{n}", data=b"x" * 4096) for n in range(3000)])
    archive = tmp_path / "big.tar"
    write_oci_archive(archive, [BASE, big])
    started = time.perf_counter()
    first = load_image_archive(archive, tmp_path / "cache")
    first_s = time.perf_counter() - started
    marker = first.rootfs / "marker-not-in-image"  # type: ignore[operator]
    marker.write_text("x")
    started = time.perf_counter()
    second = load_image_archive(archive, tmp_path / "cache")
    second_s = time.perf_counter() - started
    assert second == first
    assert marker.exists()  # not unpacked again
    assert second_s < first_s / 5, (first_s, second_s)


def test_concurrent_adds_unpack_once(tmp_path: Path) -> None:
    archive = _oci(tmp_path)
    results, errors, unpacked = [], [], []

    def add() -> None:
        stages: set[str] = set()
        try:
            results.append(
                load_image_archive(
                    archive, tmp_path / "cache", progress=lambda *a: stages.add(a[2])
                )
            )
            unpacked.append("unpack" in stages)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(unpacked) == [False, False, False, True]  # one unpacked, three waited
    assert len({r.rootfs for r in results}) == 1
    # one snapshot per layer, and no leftover temporary directory
    names = sorted(p.name for p in (tmp_path / "cache/rootfs").iterdir())
    assert len(names) == 2 and results[0].rootfs.name in names  # type: ignore[union-attr]


def test_progress_reports_stages(tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    load_image_archive(_oci(tmp_path), tmp_path / "cache", progress=lambda *a: seen.append(a))
    stages = [s for _, _, s in seen]
    assert stages[0] == "verify" and "unpack" in stages and stages[-1] == "done"
    unpack = [(d, t) for d, t, s in seen if s == "unpack"]
    assert unpack[-1][0] == unpack[-1][1] > 0


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _write_members(archive: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_multi_platform_index_picks_linux_amd64(tmp_path: Path) -> None:
    members = _members(_oci(tmp_path))
    index = json.loads(members["index.json"])
    good = index["manifests"][0]
    arm = {**good, "platform": {"os": "linux", "architecture": "arm64"}}
    arm["digest"] = "sha256:" + "0" * 64  # never read: not the chosen platform
    index["manifests"] = [arm, {**good, "platform": {"os": "linux", "architecture": "amd64"}}]
    multi = _write_members(
        tmp_path / "multi.tar", {**members, "index.json": json.dumps(index).encode()}
    )
    assert load_image_archive(multi, tmp_path / "cache").python_version == "3.11"
    index["manifests"] = [arm, {**arm, "platform": {"os": "linux", "architecture": "s390x"}}]
    none = _write_members(
        tmp_path / "none.tar", {**members, "index.json": json.dumps(index).encode()}
    )
    with pytest.raises(
        ImageArchiveError, match=r"expected one linux/amd64 image, found 0 .*linux/arm64"
    ):
        load_image_archive(none, tmp_path / "cache3")


def test_nested_image_index_is_followed(tmp_path: Path) -> None:
    members = _members(_oci(tmp_path))
    top = json.loads(members["index.json"])
    nested = json.dumps({"schemaVersion": 2, "manifests": top["manifests"]}).encode()
    nested_digest = hashlib.sha256(nested).hexdigest()
    members[f"blobs/sha256/{nested_digest}"] = nested
    top["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": f"sha256:{nested_digest}",
            "size": len(nested),
        }
    ]
    members["index.json"] = json.dumps(top).encode()
    image = load_image_archive(_write_members(tmp_path / "nested.tar", members), tmp_path / "c")
    assert image.name == "example/test:1" and image.python_version == "3.11"
    members[f"blobs/sha256/{nested_digest}"] = nested.replace(b"schemaVersion", b"schemaversion")
    tampered = _write_members(tmp_path / "tampered.tar", members)
    with pytest.raises(ImageArchiveError, match="nested image index: digest mismatch"):
        load_image_archive(tampered, tmp_path / "c2")


def test_python_version_from_config_env_and_no_jupyter(tmp_path: Path) -> None:
    layer = layer_tar([Entry("usr/bin/true", data=b"t", mode=0o755)])
    archive = tmp_path / "py.tar"
    config = image_config([layer], env=["PATH=/usr/bin", "PYTHON_VERSION=3.12.4"])
    write_oci_archive(archive, [layer], config=config)
    image = load_image_archive(archive, tmp_path / "cache")
    assert image.python_version == "3.12"
    assert image.editors == (EDITOR_TERMINAL,)
    assert dict(image.env)["PYTHON_VERSION"] == "3.12.4"


def test_jupyter_lab_symlink_out_of_the_image_is_not_followed_on_the_host(tmp_path: Path) -> None:
    host_lab = tmp_path / "host-bin" / "jupyter-lab"
    host_lab.parent.mkdir()
    host_lab.write_text("#!host\n")
    host_lab.chmod(0o755)
    layer = layer_tar([Entry("usr/bin/jupyter-lab", "symlink", target=str(host_lab))])
    archive = tmp_path / "sym.tar"
    write_oci_archive(archive, [layer])
    assert load_image_archive(archive, tmp_path / "cache").editors == (EDITOR_TERMINAL,)


def test_zstd_layer_without_zstandard_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("zstandard is installed: zstd layers are supported")
    archive = tmp_path / "zstd.tar"
    fake = b"\x28\xb5\x2f\xfd" + b"\0" * 64
    config = image_config([BASE])
    write_oci_archive(archive, [fake], compress=False, config=config)
    with pytest.raises(ImageArchiveError, match="unsupported compression zstd"):
        load_image_archive(archive, tmp_path / "cache")


def test_builtin_runtime_entry() -> None:
    import sys

    builtin = builtin_runtime()
    assert builtin.builtin and builtin.rootfs is None and builtin.digest is None
    assert builtin.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert builtin.editors[0] == EDITOR_TERMINAL
    assert type(builtin).from_json(builtin.to_json()) == builtin


def test_types_replace_each_other_across_layers(tmp_path: Path) -> None:
    lower = layer_tar(
        [
            Entry("a/inner", data=b"dir content"),  # a: dir → file
            Entry("b", data=b"file"),  # b: file → dir
            Entry("c", "dir", mode=0o500),  # c: whited out, then recreated implicitly
            Entry("d", "symlink", target="/etc"),  # d: symlink → dir (not followed)
        ]
    )
    upper = layer_tar(
        [
            Entry("a", data=b"now a file"),
            Entry("b", "dir"),
            Entry("b/x", data=b"x"),
            Entry(".wh.c"),
            Entry("c/y", data=b"y"),
            Entry("d", "dir", mode=0o750),
            Entry("d/z", data=b"z"),
        ]
    )
    archive = tmp_path / "types.tar"
    write_oci_archive(archive, [lower, upper])
    root = load_image_archive(archive, tmp_path / "cache").rootfs
    assert root is not None
    assert (root / "a").read_bytes() == b"now a file"
    assert (root / "b/x").read_bytes() == b"x"
    assert (root / "c").stat().st_mode & 0o777 == 0o755  # not the whited-out dir's 0500
    assert not (root / "d").is_symlink() and (root / "d").stat().st_mode & 0o777 == 0o750
    assert (root / "d/z").read_bytes() == b"z"
    assert root.stat().st_mode & 0o777 == 0o755  # the workload uid can walk in


def test_crash_leftovers_are_cleaned_and_meta_rebuilt(tmp_path: Path) -> None:
    archive = _oci(tmp_path)
    cache = tmp_path / "cache"
    first = load_image_archive(archive, cache)
    assert first.rootfs is not None
    key = first.rootfs.name
    # a crash mid-unpack left a temp dir; a crash after the rename lost the meta file
    stale = cache / "rootfs" / f".tmp-{key}-crashed"
    (stale / "usr").mkdir(parents=True)
    (cache / "meta" / f"{key}.json").unlink()
    assert load_image_archive(archive, cache).size_bytes == first.size_bytes
    import shutil

    shutil.rmtree(first.rootfs)
    again = load_image_archive(archive, cache)
    assert not stale.exists()
    assert again == first
