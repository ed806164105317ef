"""Hostile pushes and requests against git smart HTTP, with the real git client.

Every test checks the same two things at the end: nothing was written outside the project's
directory, and no hook or configured command ran on the server.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.storage.git import run_git
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_git_support import (
    GitClient,
    GitProject,
    add_collaborator,
    clone,
    demo_fixture,
    git_fixture,
    git_url,
    http,
    make_project_fixture,
)

FIXTURES = (demo_fixture, git_fixture, make_project_fixture)  # registered by import

HOOKS = (
    "pre-receive",
    "update",
    "post-receive",
    "post-update",
    "push-to-checkout",
    "reference-transaction",
    "post-checkout",
    "post-index-change",
)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the data dir that no push may ever write into."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that any hook or command run on the server would create."""
    return tmp_path / "a-hook-ran"


@pytest.fixture
def work(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> Path:
    return clone(git, git_url(live, demo, alice), tmp_path / "work")


@pytest.fixture(autouse=True)
def nothing_escapes(
    request: pytest.FixtureRequest, tmp_path: Path, outside: Path, marker: Path
) -> Iterator[None]:
    yield
    assert list(outside.iterdir()) == [], "a push wrote outside the project"
    assert not marker.exists(), "a hook or configured command ran on the server"
    assert not Path("/tmp/kiln-git-pwned").exists()
    for name in ("x", "pwned", "hooks"):
        assert not (tmp_path / "data" / name).exists()
        assert not (tmp_path / "data" / "projects" / name).exists()


def _tree(git: GitClient, repo: Path, entries: list[tuple[str, str, str]]) -> str:
    """Write a tree object with exactly these (mode, name, sha) entries, bypassing every
    check the client would make: what a hostile client can send."""

    def sort_key(entry: tuple[str, str, str]) -> bytes:
        mode, name, _sha = entry
        return name.encode() + (b"/" if mode == "40000" else b"")

    raw = b"".join(
        f"{mode} {name}".encode() + b"\0" + bytes.fromhex(sha)
        for mode, name, sha in sorted(entries, key=sort_key)
    )
    return git.run(
        "hash-object", "-t", "tree", "-w", "--literally", "--stdin", cwd=repo, input=raw
    ).stdout.strip()


def _blob(git: GitClient, repo: Path, content: bytes) -> str:
    return git.run("hash-object", "-w", "--stdin", cwd=repo, input=content).stdout.strip()


def _commit(git: GitClient, repo: Path, tree: str, message: str = "crafted") -> str:
    parent = git.out("rev-parse", "HEAD", cwd=repo)
    sha = git.out("commit-tree", tree, "-p", parent, "-m", message, cwd=repo)
    git.run("update-ref", "HEAD", sha, cwd=repo)
    return sha


def _hook_script(marker: Path) -> bytes:
    return f"#!/bin/sh\necho ran >> {marker}\n".encode()


def _root_with(git: GitClient, repo: Path, extra: list[tuple[str, str, str]]) -> str:
    """The current HEAD tree plus ``extra`` entries."""
    listing = git.out("ls-tree", "HEAD", cwd=repo).splitlines()
    entries = []
    for line in listing:
        meta, name = line.split("\t", 1)
        mode, _kind, sha = meta.split()
        entries.append((mode.lstrip("0") if mode == "040000" else mode, name, sha))
    names = {name for _m, name, _s in extra}
    return _tree(git, repo, [e for e in entries if e[1] not in names] + extra)


def _refused(git: GitClient, work: Path, demo: GitProject, before: str, *needles: str) -> None:
    push = git.run("push", "origin", "HEAD:main", cwd=work, check=False)
    assert push.returncode != 0, push.stderr
    for needle in needles:
        assert needle in push.stderr, push.stderr
    assert demo.head() == before


# ---- .git in trees, and names that climb ----------------------------------------------------


@pytest.mark.parametrize("name", [".git", ".GIT", "git~1", ".git\u200c", ".Git."])
def test_dot_git_directory_in_a_push_is_refused(
    git: GitClient, work: Path, demo: GitProject, marker: Path, name: str
) -> None:
    hook = _blob(git, work, _hook_script(marker))
    hooks = _tree(git, work, [("100755", h, hook) for h in HOOKS])
    dotgit = _tree(git, work, [("40000", "hooks", hooks)])
    before = demo.head()
    _commit(git, work, _root_with(git, work, [("40000", name, dotgit)]))
    _refused(git, work, demo, before, "hasDotgit")


def test_dot_git_symlink_in_a_push_is_refused(
    git: GitClient, work: Path, demo: GitProject, outside: Path
) -> None:
    target = _blob(git, work, str(outside).encode())
    before = demo.head()
    _commit(git, work, _root_with(git, work, [("120000", ".git", target)]))
    _refused(git, work, demo, before, "hasDotgit")


@pytest.mark.parametrize(("name", "problem"), [("..", "hasDotdot"), (".", "hasDot")])
def test_dot_and_dotdot_entries_are_refused(
    git: GitClient, work: Path, demo: GitProject, name: str, problem: str
) -> None:
    blob = _blob(git, work, b"escaped\n")
    inner = _tree(git, work, [("100644", "x", blob)])
    before = demo.head()
    _commit(git, work, _root_with(git, work, [("40000", name, inner)]))
    _refused(git, work, demo, before, problem)


def test_a_name_that_is_both_a_symlink_and_a_directory_is_refused(
    git: GitClient, work: Path, demo: GitProject, outside: Path
) -> None:
    link = _blob(git, work, str(outside).encode())
    inner = _tree(git, work, [("100644", "x", _blob(git, work, b"through the link\n"))])
    before = demo.head()
    _commit(git, work, _root_with(git, work, [("120000", "link", link), ("40000", "link", inner)]))
    _refused(git, work, demo, before, "duplicateEntries")


# ---- .gitmodules --------------------------------------------------------------------------

_GITMODULES_REFUSED = [
    (
        '[submodule "../../hooks"]\n\tpath = sub\n\turl = https://example.invalid/x.git\n',
        "gitmodulesName",
    ),
    (
        '[submodule "a/../../../b"]\n\tpath = sub\n\turl = https://example.invalid/x.git\n',
        "gitmodulesName",
    ),
    (
        '[submodule "sub"]\n\tpath = sub\n\turl = --upload-pack=touch /tmp/kiln-git-pwned\n',
        "gitmodulesUrl",
    ),
    ('[submodule "sub"]\n\tpath = -sub\n\turl = https://example.invalid/x.git\n', "gitmodulesPath"),
]


@pytest.mark.parametrize(("gitmodules", "problem"), _GITMODULES_REFUSED)
def test_malicious_gitmodules_are_refused(
    git: GitClient, work: Path, demo: GitProject, gitmodules: str, problem: str
) -> None:
    head = git.out("rev-parse", "HEAD", cwd=work)
    extra = [
        ("100644", ".gitmodules", _blob(git, work, gitmodules.encode())),
        ("160000", "sub", head),
    ]
    before = demo.head()
    _commit(git, work, _root_with(git, work, extra))
    _refused(git, work, demo, before, problem)


def test_symlinked_gitmodules_is_refused(
    git: GitClient, work: Path, demo: GitProject, outside: Path
) -> None:
    target = _blob(git, work, str(outside / "modules").encode())
    before = demo.head()
    _commit(git, work, _root_with(git, work, [("120000", ".gitmodules", target)]))
    _refused(git, work, demo, before, "gitmodulesSymlink")


def test_gitmodules_path_with_dotdot_is_harmless(
    git: GitClient, work: Path, demo: GitProject, outside: Path
) -> None:
    """fsck has nothing against a ``path`` that climbs; it is harmless because the server
    never checks out submodules: the gitlink becomes an empty directory inside the project."""
    gitmodules = (
        f'[submodule "sub"]\n\tpath = ../../../{outside.name}/sub\n'
        f"\turl = https://example.invalid/x.git\n"
    )
    head = git.out("rev-parse", "HEAD", cwd=work)
    extra = [
        ("100644", ".gitmodules", _blob(git, work, gitmodules.encode())),
        ("160000", "sub", head),
    ]
    _commit(git, work, _root_with(git, work, extra))
    git.run("push", "-q", "origin", "HEAD:main", cwd=work)
    assert demo.head() == git.out("rev-parse", "HEAD", cwd=work)
    sub = demo.directory / "sub"
    assert sub.is_dir() and list(sub.iterdir()) == []


# ---- symlinks -----------------------------------------------------------------------------


def _link_then_file(git: GitClient, work: Path, target: str) -> tuple[str, str]:
    (work / "link").symlink_to(target)
    git.run("add", "link", cwd=work)
    git.run("commit", "-q", "-m", "A link", cwd=work)
    first = git.out("rev-parse", "HEAD", cwd=work)
    git.run("rm", "-q", "link", cwd=work)
    (work / "link").mkdir()
    (work / "link" / "x").write_text("through the link?\n")
    git.run("add", "link/x", cwd=work)
    git.run("commit", "-q", "-m", "A file where the link was", cwd=work)
    return first, git.out("rev-parse", "HEAD", cwd=work)


@pytest.mark.parametrize("target", ["absolute", "relative", "into .git"])
@pytest.mark.parametrize("pushes", ["one push", "two pushes"])
def test_symlink_then_file_through_it_stays_inside(
    git: GitClient, work: Path, demo: GitProject, outside: Path, target: str, pushes: str
) -> None:
    """A link out of the project, then a file "inside" it in a later commit: git replaces
    the link by a directory and never writes through it."""
    target = {
        "absolute": str(outside),
        "relative": f"../../../{outside.name}",
        "into .git": ".git/hooks",
    }[target]
    first, second = _link_then_file(git, work, target)
    if pushes == "two pushes":
        git.run("push", "-q", "origin", f"{first}:refs/heads/main", cwd=work)
        link = demo.directory / "link"
        # A symlink in the project may point anywhere: it is data. Server-side file code
        # must not follow it out (the files API's safe paths refuse to).
        assert link.is_symlink() and os.readlink(link) == target
    git.run("push", "-q", "origin", "main", cwd=work)
    assert demo.head() == second
    link = demo.directory / "link"
    assert not link.is_symlink() and link.is_dir()
    assert (link / "x").read_text() == "through the link?\n"
    hooks = demo.directory / ".git" / "hooks"
    assert all(p.name.endswith(".sample") for p in hooks.iterdir())


# ---- nothing on the server runs -----------------------------------------------------------


def test_planted_hooks_and_configured_commands_never_run(
    git: GitClient, work: Path, demo: GitProject, marker: Path, tmp_path: Path
) -> None:
    """Hooks planted in the repository never run (a push overrides hooksPath), and a config
    that names programs (a workload can write .git/config) cannot reach the host: git runs
    sandboxed, so hooksPath and fsmonitor pointing at host paths find nothing there.
    (tests/security/test_git_planted.py plants every such setting from a real sandbox.)"""
    script = _hook_script(marker)
    planted = tmp_path / "planted-hooks"
    planted.mkdir()
    for directory in (demo.directory / ".git" / "hooks", planted):
        for name in HOOKS:
            hook = directory / name
            hook.write_bytes(script)
            hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    new_head = git.commit_file(work, "ok.txt", "fine\n", "Normal push")
    git.run("push", "-q", "origin", "main", cwd=work)
    assert demo.head() == new_head
    assert (demo.directory / "ok.txt").read_text() == "fine\n"  # still updateInstead

    monitor = tmp_path / "fsmonitor.sh"
    monitor.write_bytes(script)
    monitor.chmod(0o755)
    run_git(demo.directory, "config", "core.hooksPath", str(planted))
    run_git(demo.directory, "config", "core.fsmonitor", str(monitor))
    newer = git.commit_file(work, "more.txt", "more\n", "Push despite planted config")
    git.run("push", "-q", "origin", "main", cwd=work)
    assert demo.head() == newer


# ---- requests a git client would not send -------------------------------------------------


def _pkt(line: str) -> bytes:
    data = line.encode()
    return f"{len(data) + 4:04x}".encode() + data


def test_gzip_bombs_are_stopped_by_their_inflated_size(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, work: Path
) -> None:
    """Bodies that git would read to the end: a push whose pack stores 16 MiB uncompressed,
    and a fetch negotiation with 16 MiB of "have" lines, each gzipped to a few KiB."""
    live.settings.web.max_request_bytes = 1024 * 1024
    live.settings.storage.max_push_bytes = 1024 * 1024
    before = demo.head()
    new = git.commit_file(work, "zeros.bin", bytes(16 * 1024 * 1024), "Zeros")
    pack = git.run(
        "-c",
        "pack.compression=0",
        "pack-objects",
        "--stdout",
        "--revs",
        cwd=work,
        input=f"{new}\n^{before}\n".encode(),
    ).stdout_bytes
    push = _pkt(f"{before} {new} refs/heads/main\0report-status\n") + b"0000" + pack
    wants = _pkt(f"want {before} multi_ack_detailed\n") + b"0000"
    fetch = wants + _pkt(f"have {before}\n") * (16 * 1024 * 1024 // 50) + _pkt("done\n")
    base = f"git/{demo.owner}/{demo.slug}.git"
    with http(live) as client:
        for service, body in (("git-receive-pack", push), ("git-upload-pack", fetch)):
            bomb = gzip.compress(body, compresslevel=9)
            assert len(body) > 16 * 1024 * 1024 and len(bomb) < 200 * 1024
            r = client.post(
                f"{base}/{service}",
                content=bomb,
                headers={
                    **alice.headers,
                    "Content-Type": f"application/x-{service}-request",
                    "Content-Encoding": "gzip",
                },
            )
            assert r.status_code == 413, r.text
            assert r.headers["content-type"] == "application/problem+json"
    assert demo.head() == before
    assert not (demo.directory / "zeros.bin").exists()


def test_direct_posts_are_authorized_like_the_advertisement(
    live: LiveServer,
    alice: Account,
    bob: Account,
    make_user: Callable[..., Account],
    demo: GitProject,
) -> None:
    carol = make_user("carol")
    add_collaborator(live, alice, demo, "bob", "viewer")
    before = demo.head()
    url = f"git/{demo.owner}/{demo.slug}.git/git-receive-pack"
    kind = {"Content-Type": "application/x-git-receive-pack-request"}
    command = f"{before} {'1' * 40} refs/heads/main\0 report-status\n".encode()
    body = f"{len(command) + 4:04x}".encode() + command + b"0000"
    with http(live) as client:
        anonymous = client.post(url, content=body, headers=kind)
        assert anonymous.status_code == 401
        viewer = client.post(url, content=body, headers={**kind, **bob.headers})
        assert viewer.status_code == 403
        stranger = client.post(url, content=body, headers={**kind, **carol.headers})
        assert stranger.status_code == 404
        fetch = client.post(
            f"git/{demo.owner}/{demo.slug}.git/git-upload-pack",
            content=b"0000",
            headers={"Content-Type": "application/x-git-upload-pack-request", **carol.headers},
        )
        assert fetch.status_code == 404
    assert demo.head() == before


def test_one_project_cannot_reach_another(
    live: LiveServer,
    alice: Account,
    bob: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    tmp_path: Path,
) -> None:
    mine = make_project(alice, "mine")
    theirs = make_project(bob, "theirs")
    (theirs.directory / "secret.txt").write_text("bob's\n")
    run_git(theirs.directory, "add", "secret.txt")
    run_git(
        theirs.directory, "-c", "user.name=b", "-c", "user.email=b@x", "commit", "-qm", "secret"
    )
    base = git_url(live, mine, alice)
    for trick in ("/../../bob/theirs.git", "/..%2f..%2fbob%2ftheirs.git"):
        got = git.run("clone", base + trick, str(tmp_path / "t"), check=False)
        assert got.returncode != 0
        assert not (tmp_path / "t" / "secret.txt").exists()
