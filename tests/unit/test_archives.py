"""Archive extraction (uploads) and folder archives (downloads), on real files."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from kiln.domain.errors import BadPath, KilnError, TooLarge
from kiln.storage.archives import BadArchive, extract_archive, folder_archive
from kiln.storage.safepath import ROOT, parse_path
from kiln.storage.store import ProjectStore
from tests.integration.test_files_helpers import file_member, link_member, tar_bytes

MB = 1024 * 1024


def _extract(
    data: bytes, name: str, dest: Path, max_bytes: int = 10 * MB, max_entries: int = 100
) -> None:
    dest.mkdir(exist_ok=True)
    extract_archive(io.BytesIO(data), name, dest, max_bytes=max_bytes, max_entries=max_entries)


def _zip(entries: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.create_system = 3
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_tar_with_one_top_folder_is_hoisted(tmp_path: Path) -> None:
    exe = tarfile.TarInfo("proj/run.sh")
    exe.mode = 0o755
    data = tar_bytes(
        file_member("./proj/README.md", b"# readme\n"),
        file_member("proj/src/main.py", b"print(1)\n"),
        (exe, b"#!/bin/sh\n"),
        file_member("proj/.git/hooks/post-checkout", b"rm -rf /"),  # skipped, never written
    )
    dest = tmp_path / "dest"
    _extract(data, "p.tar.gz", dest)
    assert _files(dest) == {
        "README.md": b"# readme\n",
        "src/main.py": b"print(1)\n",
        "run.sh": b"#!/bin/sh\n",
    }
    assert os.stat(dest / "run.sh").st_mode & 0o111
    assert not os.stat(dest / "README.md").st_mode & 0o111


def test_zip_without_a_single_top_folder_stays_as_is(tmp_path: Path) -> None:
    data = _zip({"a/x.txt": b"x", "b.txt": b"b", "__MACOSX/a/._x.txt": b"junk"})
    dest = tmp_path / "dest"
    _extract(data, "p.zip", dest)
    assert _files(dest) == {"a/x.txt": b"x", "b.txt": b"b"}


@pytest.mark.parametrize(
    "member",
    [
        file_member("../evil.txt", b"x"),
        file_member("a/../../evil.txt", b"x"),
        file_member("/tmp/evil.txt", b"x"),
        file_member("a/\x1b[31mred", b"x"),
        file_member("x" * 300, b"x"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "control", "long-name"],
)
def test_escaping_or_bad_names_refuse_the_archive(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    with pytest.raises(BadPath):
        _extract(tar_bytes(file_member("ok.txt", b"ok"), member), "p.tgz", tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [link_member("escape", str(Path("/tmp"))), file_member("escape/pwned", b"x")],
        [link_member("inner", "ok.txt")],  # even a link that stays inside
        [link_member("hard", "/etc/passwd", hard=True)],
        [_special("dev", tarfile.CHRTYPE)],
        [_special("disk", tarfile.BLKTYPE)],
        [_special("pipe", tarfile.FIFOTYPE)],
    ],
    ids=[
        "symlink-then-file-through-it",
        "inner-symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
    ],
)
def test_links_and_devices_refuse_the_archive(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(BadArchive, match="archives may hold only files"):
        _extract(tar_bytes(file_member("ok.txt", b"ok"), *members), "p.tar", dest)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not Path("/tmp/pwned").exists()


def test_zip_symlink_and_device_entries_are_refused(tmp_path: Path) -> None:
    link = _zip({"ok.txt": b"ok", "link": b"/etc"}, modes={"link": stat.S_IFLNK | 0o777})
    with pytest.raises(BadArchive, match="a link"):
        _extract(link, "p.zip", tmp_path / "a")
    fifo = _zip({"pipe": b""}, modes={"pipe": stat.S_IFIFO | 0o644})
    with pytest.raises(BadArchive, match="special"):
        _extract(fifo, "p.zip", tmp_path / "b")
    backslash = _zip({"..\\..\\evil.txt": b"x"})
    with pytest.raises(BadPath):
        _extract(backslash, "p.zip", tmp_path / "c")


def test_zip_bomb_is_stopped(tmp_path: Path) -> None:
    bomb = _zip({"bomb.bin": b"\0" * (20 * MB)})
    assert len(bomb) < 100 * 1024
    with pytest.raises(TooLarge):
        _extract(bomb, "bomb.zip", tmp_path / "a", max_bytes=MB)


def _lie_about_size(data: bytes, size: int) -> bytes:
    """Rewrite every uncompressed-size field (local header and central directory)."""
    raw = bytearray(data)
    local = raw.find(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, size)
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, size)
    return bytes(raw)


def test_zip_that_lies_about_its_sizes_cannot_write_more(tmp_path: Path) -> None:
    bomb = _lie_about_size(_zip({"bomb.bin": b"\0" * (20 * MB)}), 1000)
    dest = tmp_path / "a"
    with pytest.raises(KilnError):
        _extract(bomb, "bomb.zip", dest, max_bytes=MB)
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= MB


def test_gzip_bomb_and_byte_cap_for_tar(tmp_path: Path) -> None:
    bomb = tar_bytes(file_member("zeros.bin", b"\0" * (20 * MB)))
    assert len(bomb) < 100 * 1024
    dest = tmp_path / "a"
    with pytest.raises(TooLarge):
        _extract(bomb, "bomb.tar.gz", dest, max_bytes=MB)
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= MB


def test_entry_count_is_capped(tmp_path: Path) -> None:
    many = [file_member(f"f{i}.txt", b"x") for i in range(11)]
    with pytest.raises(TooLarge, match="more than 10 entries"):
        _extract(tar_bytes(*many), "p.tgz", tmp_path / "a", max_entries=10)
    with pytest.raises(TooLarge, match="more than 10 entries"):
        _extract(_zip({f"f{i}": b"x" for i in range(11)}), "p.zip", tmp_path / "b", max_entries=10)


def test_huge_extension_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info = tarfile.TarInfo("a.txt")
    info.pax_headers = {"comment": "x" * (2 * MB)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    with pytest.raises(BadArchive, match="extension header"):
        _extract(buf.getvalue(), "p.tar", tmp_path / "a")


def test_duplicates_corrupt_and_unknown_archives(tmp_path: Path) -> None:
    twice = tar_bytes(file_member("a.txt", b"1"), file_member("a.txt", b"2"))
    with pytest.raises(BadArchive, match="more than once"):
        _extract(twice, "p.tgz", tmp_path / "a")
    with pytest.raises(BadArchive, match="not a valid"):
        _extract(b"this is not gzip at all", "p.tar.gz", tmp_path / "b")
    with pytest.raises(BadArchive, match="not a valid"):
        _extract(b"PK\x03\x04 broken", "p.zip", tmp_path / "c")
    with pytest.raises(BadArchive, match="not a supported archive"):
        _extract(b"Rar!", "p.rar", tmp_path / "d")


def test_failed_upload_leaves_no_staging_behind(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path / "projects")
    bad = tar_bytes(file_member("ok.txt", b"ok"), file_member("../evil", b"x"))
    with pytest.raises(BadPath):
        store.stage_archive(io.BytesIO(bad), "bad.tgz", max_bytes=MB, max_entries=10)
    assert os.listdir(tmp_path / "projects") == []
    good = tar_bytes(file_member("top/ok.txt", b"ok"))
    staged = store.stage_archive(io.BytesIO(good), "good.tgz", max_bytes=MB, max_entries=10)
    final = store.create_from_archive(7, staged)
    assert final == tmp_path / "projects" / "7" and (final / "ok.txt").read_bytes() == b"ok"
    assert sorted(os.listdir(tmp_path / "projects")) == ["7"]


def test_folder_archives_skip_git_links_and_specials(tmp_path: Path) -> None:
    project = tmp_path / "p"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "config").write_text("[core]")
    (project / "src").mkdir()
    (project / "src" / "main.py").write_bytes(b"print(1)\n")
    (project / "empty").mkdir()
    (project / "big.bin").write_bytes(os.urandom(300_000))
    (project / "link").symlink_to("/etc")
    os.mkfifo(project / "pipe")

    tgz = b"".join(folder_archive(project, ROOT, "tar.gz", "p"))
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        assert sorted(tar.getnames()) == ["p", "p/big.bin", "p/empty", "p/src", "p/src/main.py"]
        assert tar.extractfile("p/big.bin").read() == (project / "big.bin").read_bytes()  # type: ignore[union-attr]

    zipped = b"".join(folder_archive(project, parse_path("src/"), "zip", "src"))
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == ["src/", "src/main.py"]
        assert zf.read("src/main.py") == b"print(1)\n"

    with pytest.raises(BadPath, match="symbolic link"):
        folder_archive(project, parse_path("link/"), "zip", "link")
