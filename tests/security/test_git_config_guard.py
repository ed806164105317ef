"""A workload can write its project's .git/config (a session's terminal can). Settings there
that run programs — a filter driver named from .gitattributes above all — must never run on
the server: file writes and pushes are refused with a clear message until they are removed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kiln.storage.git import UnsafeRepoConfig, check_repo_config, init_repo, unsafe_config_keys
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_git_support import (
    GitClient,
    GitProject,
    clone,
    demo_fixture,
    git_fixture,
    git_url,
    http,
    make_project_fixture,
)

__all__ = ["demo_fixture", "git_fixture", "make_project_fixture"]  # fixtures used here


def plant_filter(repo: Path, marker: Path) -> None:
    """What a hostile session would do: a clean/smudge filter that runs a command."""
    config = repo / ".git" / "config"
    config.write_text(
        config.read_text()
        + f'[filter "evil"]\n\tclean = touch {marker}\n\tsmudge = touch {marker}\n'
    )
    (repo / ".gitattributes").write_text("* filter=evil\n")


def test_safe_and_unsafe_keys(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    init_repo(repo)
    assert unsafe_config_keys(repo) == []
    subprocess.run(
        ["git", "-C", str(repo), "remote", "add", "origin", "https://x/y.git"], check=True
    )
    subprocess.run(["git", "-C", str(repo), "config", "user.name", "Ann"], check=True)
    assert unsafe_config_keys(repo) == []
    for key, value in [
        ("filter.x.clean", "cat"),
        ("diff.x.textconv", "cat"),
        ("core.fsmonitor", "/bin/sh"),
        ("core.sshCommand", "sh"),
        ("include.path", "/etc/gitconfig"),
        ("credential.helper", "store"),
        ("remote.origin.uploadpack", "sh -c x"),
        ("submodule.m.update", "!sh"),
        ("lfs.customtransfer.x.path", "sh"),
    ]:
        subprocess.run(["git", "-C", str(repo), "config", key, value], check=True)
        assert key.lower() in unsafe_config_keys(repo), key
        subprocess.run(["git", "-C", str(repo), "config", "--unset", key], check=True)
    assert unsafe_config_keys(repo) == []


def test_file_writes_refuse_a_planted_filter_and_it_never_runs(
    live: LiveServer, demo: GitProject, alice: Account, tmp_path: Path
) -> None:
    marker = tmp_path / "filter-ran"
    plant_filter(demo.directory, marker)
    url = f"api/v1/projects/{demo.owner}/{demo.slug}/files/notes.txt"
    with http(live) as client:
        r = client.put(url, content=b"hello", headers=alice.headers)
    assert r.status_code == 409, r.text
    assert "filter.evil.clean" in r.json()["detail"]
    assert not marker.exists()
    with pytest.raises(UnsafeRepoConfig):
        check_repo_config(demo.directory)


def test_clone_and_push_refuse_a_planted_filter_and_it_never_runs(
    live: LiveServer,
    demo: GitProject,
    alice: Account,
    git: GitClient,
    tmp_path: Path,
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    git.commit_file(work, "more.py", "print(1)\n", "more")
    marker = tmp_path / "filter-ran"
    plant_filter(demo.directory, marker)
    pushed = git.run("push", "-q", git_url(live, demo, alice), "main", cwd=work, check=False)
    assert pushed.returncode != 0
    assert "git/config" in pushed.stderr or ".git/config" in pushed.stderr, pushed.stderr
    fetched = git.run("fetch", "-q", git_url(live, demo, alice), cwd=work, check=False)
    assert fetched.returncode != 0
    assert not marker.exists()
