"""The safe-path gate: what it refuses, and that it never follows a symlink, even one swapped
in between a check and its use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.domain.errors import BadPath, Conflict, KilnError, NotFound
from kiln.runtimes.local.ownership import adopt_tree
from kiln.storage import files, safepath
from kiln.storage.git import commit_all, init_repo, repo_owner
from kiln.storage.safepath import ROOT, ProjectFS, SafePath, parse_path

REFUSED = [
    "../x",
    "a/../../x",
    "..",
    "./x",
    "a/./b",
    "a//b",
    "/etc/passwd",
    "//etc/passwd",
    "a\x00b",
    "a\x01b",
    "a\nb",
    "a\x7fb",
    "a\u009bb",  # C1 control (CSI)
    "a\\..\\b",
    "x" * 256,
    "é" * 128,  # 256 bytes
    "a/" * 2100 + "b",  # over 4096 bytes in total
    ".git",
    ".git/config",
    "a/.git/hooks/pre-commit",
    ".GIT/hooks/x",
    "%2e%2e/x",
    "%2E%2e",
    "a/%2e",
    "%252e%252e/x",  # decodes to '..' on a second and third decoding
    "\udc80",  # not encodable as UTF-8
    ".kiln-upload-1234.part",  # Kiln's temporary files
]


@pytest.mark.parametrize("raw", REFUSED, ids=repr)
def test_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        parse_path(raw)


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ("a/b.txt", ("a", "b.txt")),
        ("dir/", ("dir",)),
        ("x" * 255, ("x" * 255,)),
        ("é" * 127, ("é" * 127,)),
        (".gitignore", (".gitignore",)),
        (".github/workflows/ci.yml", (".github", "workflows", "ci.yml")),
        ("%41 100%.txt", ("%41 100%.txt",)),
        ("a b/c-d_e", ("a b", "c-d_e")),
        ("...", ("...",)),
    ],
)
def test_accepted(raw: str, parts: tuple[str, ...]) -> None:
    assert parse_path(raw).parts == parts


def test_top_only_where_allowed() -> None:
    assert parse_path("", allow_root=True) == ROOT
    for raw in ("", "/"):
        with pytest.raises(BadPath):
            parse_path(raw)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A project dir and, beside it, an 'outside' folder with a secret."""
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "sub" / "inside.txt").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    return project, outside


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_symlinks_are_never_followed(layout: tuple[Path, Path]) -> None:
    project, outside = layout
    (project / "to-outside").symlink_to(outside)
    (project / "secret-link").symlink_to(outside / "secret.txt")
    (project / "to-root").symlink_to("/")
    with ProjectFS(project) as fs:
        for path in ("to-outside/secret.txt", "secret-link", "to-root/etc/passwd"):
            with pytest.raises(BadPath, match="symbolic link"):
                fs.open_file(parse_path(path))
        with pytest.raises(BadPath, match="symbolic link"):
            fs.open_dir(parse_path("to-outside/new"), create=True)
        fd, _ = fs.open_file(parse_path("sub/inside.txt"))
        os.close(fd)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_file_where_a_folder_is_expected(layout: tuple[Path, Path]) -> None:
    project, _ = layout
    with ProjectFS(project) as fs:
        with pytest.raises(BadPath, match="is a file"):
            fs.open_dir(parse_path("sub/inside.txt/x"), create=True)
        with pytest.raises(NotFound):
            fs.open_file(parse_path("sub/missing.txt"))
        with pytest.raises(BadPath, match="is a folder"):
            fs.open_file(parse_path("sub"))


def _swap_on_open(
    monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[], None]
) -> list[str]:
    """Wrap os.open so that the first time ``name`` is opened relative to a directory fd,
    ``swap`` runs first: the attacker wins the race at the worst moment."""
    real_open = os.open
    swapped: list[str] = []

    def racing_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == name and dir_fd is not None and not swapped:
            swapped.append(name)
            swap()
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", racing_open)
    return swapped


def _folder_to_link(folder: Path, target: Path) -> Callable[[], None]:
    def swap() -> None:
        folder.rename(folder.with_name(folder.name + ".moved"))
        folder.symlink_to(target)

    return swap


def test_folder_swapped_for_a_symlink_mid_read_is_refused(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, outside = layout
    (outside / "inside.txt").write_text("outside copy")  # what a followed link would read
    swapped = _swap_on_open(monkeypatch, "sub", _folder_to_link(project / "sub", outside))
    with pytest.raises(BadPath, match="symbolic link"):
        files.open_for_read(project, parse_path("sub/inside.txt"))
    assert swapped == ["sub"] and (project / "sub").is_symlink()


def test_file_swapped_for_a_symlink_mid_read_is_refused(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, outside = layout
    target = project / "sub" / "inside.txt"

    def swap() -> None:
        target.unlink()
        target.symlink_to(outside / "secret.txt")

    swapped = _swap_on_open(monkeypatch, "inside.txt", swap)
    with pytest.raises(BadPath, match="symbolic link"):
        files.open_for_read(project, parse_path("sub/inside.txt"))
    assert swapped == ["inside.txt"]


@pytest.fixture
def repo(layout: tuple[Path, Path]) -> Path:
    project, _ = layout
    owner = repo_owner()
    if owner is not None:  # as Kiln keeps project trees: owned by the workload uid
        adopt_tree(project, owner, owner)
    init_repo(project)
    commit_all(project, "init")
    return project


LIMITS = files.Limits(max_file_bytes=1 << 20, quota_bytes=1 << 30)
AUTHOR = ("Alice", "alice@example.com")


def test_folder_swapped_for_a_symlink_mid_write_writes_nothing_outside(
    repo: Path, layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, outside = layout
    before = _snapshot(outside)
    swapped = _swap_on_open(monkeypatch, "sub", _folder_to_link(repo / "sub", outside))
    with pytest.raises(BadPath, match="symbolic link"):
        files.write_file(repo, parse_path("sub/pwned.txt"), [b"owned"], LIMITS, AUTHOR)
    assert swapped == ["sub"]
    assert _snapshot(outside) == before


def test_folder_swapped_after_it_was_opened_keeps_the_write_inside(
    repo: Path, layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race lost the other way: the folder is swapped after its fd was opened. The write
    goes through that fd, so it lands in the real folder (moved, still inside the project)."""
    _, outside = layout
    before = _snapshot(outside)
    real_open = os.open
    state = {"swapped": False}

    def racing_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if isinstance(path, str) and path.startswith(safepath.TEMP_PREFIX) and not state["swapped"]:
            state["swapped"] = True
            _folder_to_link(repo / "sub", outside)()
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", racing_open)
    # git may refuse to commit a path through the new link: a failure is fine, a leak is not.
    with contextlib.suppress(KilnError):
        files.write_file(repo, parse_path("sub/pwned.txt"), [b"owned"], LIMITS, AUTHOR)
    assert state["swapped"]
    assert _snapshot(outside) == before
    assert (repo / "sub.moved" / "pwned.txt").read_bytes() == b"owned"


def test_failed_write_leaves_nothing_behind(repo: Path) -> None:
    before = _snapshot(repo)
    small = files.Limits(max_file_bytes=10, quota_bytes=1 << 30)
    with pytest.raises(KilnError):
        files.write_file(repo, parse_path("new/deeper/f.bin"), [b"12345", b"678901"], small, AUTHOR)
    assert _snapshot(repo) == before
    assert not (repo / "new").exists()

    def broken() -> Any:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        files.write_file(repo, parse_path("sub/f.bin"), broken(), LIMITS, AUTHOR)
    assert _snapshot(repo) == before
    assert not [p for p in (repo / "sub").iterdir() if p.name.startswith(safepath.TEMP_PREFIX)]


def test_write_refuses_to_replace_a_symlink_or_a_folder(repo: Path) -> None:
    (repo / "link").symlink_to("/etc/passwd")
    with pytest.raises(BadPath, match="symbolic link"):
        files.write_file(repo, parse_path("link"), [b"x"], LIMITS, AUTHOR)
    with pytest.raises(Conflict):
        files.write_file(repo, parse_path("sub"), [b"x"], LIMITS, AUTHOR)
    assert (repo / "link").is_symlink()


def test_walk_lists_links_without_following_and_skips_git(repo: Path) -> None:
    (repo / "link").symlink_to("/")
    (repo / "sub" / ".git").mkdir()
    (repo / "sub" / ".git" / "x").write_text("nested repo")
    with ProjectFS(repo) as fs:
        seen = {str(item.path): safepath.kind_of(item.st.st_mode) for item in fs.walk()}
    assert seen == {"link": "symlink", "sub": "dir", "sub/inside.txt": "file"}


def test_safepath_helpers() -> None:
    path = SafePath(("a", "b"))
    assert str(path) == "a/b" and path.name == "b" and path.parent == SafePath(("a",))
    assert path.child("c").is_within(path) and not SafePath(("ab",)).is_within(SafePath(("a",)))


def test_usage_counts_files_but_not_git_or_link_targets(repo: Path) -> None:
    (repo / "big.bin").write_bytes(b"x" * 1000)
    (repo / "deep" / "er").mkdir(parents=True)
    (repo / "deep" / "er" / "f").write_bytes(b"y" * 10)
    (repo / "link").symlink_to("/usr")  # counts as the link itself (4 bytes), not /usr
    with ProjectFS(repo) as fs:
        assert files.usage_bytes(fs) == 1000 + 10 + len("inside") + len("/usr")
