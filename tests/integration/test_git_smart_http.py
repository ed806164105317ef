"""Git smart HTTP with the real git client against the live HTTPS server."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from kiln.storage.git import commit_all, repo_lock, run_git
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


def test_clone_commit_push_updates_project_files(
    live: LiveServer,
    alice: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
    engine: Engine,
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    assert (work / "requirements.txt").is_file()
    assert git.out("rev-parse", "HEAD", cwd=work) == demo.head()

    new_head = git.commit_file(work, "analysis/notes.md", "# results\n", "Add notes")
    push = git.run("push", "origin", "main", cwd=work)
    assert "main -> main" in push.stderr

    assert (demo.directory / "analysis" / "notes.md").read_text() == "# results\n"
    assert demo.head() == new_head
    shown = run_git(demo.directory, "show", "HEAD:analysis/notes.md")
    assert shown.stdout == b"# results\n"
    clean = run_git(demo.directory, "status", "--porcelain")
    assert clean.stdout == b""  # the working tree is exactly the pushed commit

    events = demo.audit(engine)
    assert [(e.actor_name, e.outcome) for e in events] == [("alice", "success")]
    assert events[0].details["refs"] == {"refs/heads/main": "updated"}
    assert events[0].details["bytes"] > 0


def test_fetch_sees_server_side_commits_and_new_branches_push(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    # A file-API write: a commit made on the server under the repository lock.
    with repo_lock(demo.directory):
        (demo.directory / "from-ui.txt").write_text("edited in the browser\n")
        commit_all(demo.directory, "Edit from the UI")
    git.run("pull", "-q", "--ff-only", cwd=work)
    assert (work / "from-ui.txt").read_text() == "edited in the browser\n"

    # Other branches are stored without touching the working tree; deleting them works.
    git.run("switch", "-q", "-c", "topic", cwd=work)
    git.commit_file(work, "topic.txt", "t\n", "Topic work")
    git.run("push", "-q", "origin", "topic", cwd=work)
    assert not (demo.directory / "topic.txt").exists()
    refs = git.out("ls-remote", "origin", cwd=work)
    assert "refs/heads/topic" in refs
    git.run("push", "-q", "origin", "--delete", "topic", cwd=work)
    assert "refs/heads/topic" not in git.out("ls-remote", "origin", cwd=work)


def test_viewer_clones_but_cannot_push(
    live: LiveServer,
    alice: Account,
    bob: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
    engine: Engine,
) -> None:
    add_collaborator(live, alice, demo, "bob", "viewer")
    before = demo.head()
    work = clone(git, git_url(live, demo, bob), tmp_path / "work")
    git.commit_file(work, "bob.txt", "hi\n", "Bob's change")

    push = git.run("push", "origin", "main", cwd=work, check=False)
    assert push.returncode != 0
    assert "push refused" in push.stderr
    assert "contributor role" in push.stderr and "viewer" in push.stderr
    assert "403" in push.stderr
    assert demo.head() == before
    assert not (demo.directory / "bob.txt").exists()
    events = demo.audit(engine)
    assert [(e.actor_name, e.outcome, e.details["reason"]) for e in events] == [
        ("bob", "failure", "forbidden")
    ]

    # Raised to contributor, the same push goes through.
    add_collaborator(live, alice, demo, "bob", "contributor")
    git.run("push", "-q", "origin", "main", cwd=work)
    assert (demo.directory / "bob.txt").read_text() == "hi\n"


def test_stranger_cannot_learn_a_private_project_exists(
    live: LiveServer, bob: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    cloned = git.run("clone", git_url(live, demo, bob), str(tmp_path / "x"), check=False)
    assert cloned.returncode != 0
    assert "remote: project alice/demo not found" in cloned.stderr
    assert "repository 'https://localhost" in cloned.stderr  # git's wording for a 404
    with http(live) as client:
        for service in ("git-upload-pack", "git-receive-pack"):
            r = client.get(
                f"git/{demo.owner}/{demo.slug}.git/info/refs",
                params={"service": service},
                auth=("bob", bob.key),
            )
            assert r.status_code == 404
            assert r.headers["content-type"] == "application/problem+json"
        missing = client.get(
            "git/alice/no-such-project.git/info/refs",
            params={"service": "git-upload-pack"},
            auth=("bob", bob.key),
        )
        assert missing.status_code == 404
        # Same answer for "exists but hidden" and "does not exist", apart from the name.
        assert r.json()["title"] == missing.json()["title"]


def test_no_credentials_get_a_basic_challenge(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    cloned = git.run("clone", git_url(live, demo), str(tmp_path / "x"), check=False)
    assert cloned.returncode != 0
    # git got the 401 challenge and wanted to ask for a username (prompts are disabled).
    assert "could not read Username" in cloned.stderr

    with http(live) as client:
        url = f"git/{demo.owner}/{demo.slug}.git/info/refs?service=git-upload-pack"
        r = client.get(url)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="Kiln"'
        assert r.headers["content-type"] == "application/problem+json"
        wrong = client.get(url, auth=("alice", "kiln_not-a-real-key"))
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == 'Basic realm="Kiln"'
        password = client.get(url, auth=("alice", alice.password))
        assert password.status_code == 401
        assert "API key" in password.json()["detail"]
        bearer = client.get(url, headers=alice.headers)
        assert bearer.status_code == 200
        assert bearer.headers["content-type"] == "application/x-git-upload-pack-advertisement"

    bad_key = git_url(live, demo).replace("https://", "https://alice:kiln_wrong@")
    refused = git.run("clone", bad_key, str(tmp_path / "y"), check=False)
    assert refused.returncode != 0
    assert "Authentication failed" in refused.stderr
    assert "remote: the API key is not valid" in refused.stderr


def test_push_refused_while_project_has_uncommitted_changes(
    live: LiveServer,
    alice: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
    engine: Engine,
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    git.commit_file(work, "pushed.txt", "from git\n", "Pushed change")
    # A session edited a tracked file on the server and did not commit it.
    readme = demo.directory / "README.md"
    edited = readme.read_text() + "\nedited in a session\n"
    readme.write_text(edited)
    before = demo.head()

    push = git.run("push", "origin", "main", cwd=work, check=False)
    assert push.returncode != 0
    assert "[remote rejected]" in push.stderr
    assert "Working directory has unstaged changes" in push.stderr
    assert demo.head() == before
    assert readme.read_text() == edited
    assert not (demo.directory / "pushed.txt").exists()
    events = demo.audit(engine)
    assert [e.outcome for e in events] == ["failure"]
    assert events[0].details["refs"] == {"refs/heads/main": "rejected"}

    # An untracked file where the push would put one is not overwritten either.
    run_git(demo.directory, "checkout", "README.md")
    untracked = demo.directory / "pushed.txt"
    untracked.write_text("a session's output\n")
    again = git.run("push", "origin", "main", cwd=work, check=False)
    assert again.returncode != 0
    assert "Could not update working tree to new HEAD" in again.stderr
    assert demo.head() == before
    assert untracked.read_text() == "a session's output\n"

    untracked.unlink()
    git.run("push", "-q", "origin", "main", cwd=work)
    assert untracked.read_text() == "from git\n"


def test_push_over_the_size_limit_is_refused_whole(
    live: LiveServer,
    alice: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
    engine: Engine,
) -> None:
    live.settings.storage.max_push_bytes = 256 * 1024
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    git.commit_file(work, "small.txt", "fine\n", "Small")
    git.commit_file(work, "data.bin", os.urandom(1024 * 1024), "Big")
    before = demo.head()

    push = git.run("push", "origin", "main", cwd=work, check=False)
    assert push.returncode != 0
    assert "413" in push.stderr
    assert demo.head() == before
    assert not (demo.directory / "small.txt").exists()
    assert not (demo.directory / "data.bin").exists()
    objects = demo.directory / ".git" / "objects"
    leftovers = [p.name for p in objects.iterdir() if "incoming" in p.name or "tmp" in p.name]
    assert leftovers == []  # git dropped its quarantine: nothing of the push was kept
    events = demo.audit(engine)
    assert [e.outcome for e in events] == ["failure"]
    assert "larger than this server's limit" in events[0].details["reason"]

    # Under the limit, the same repository pushes fine once the big file is gone.
    git.run("reset", "-q", "--hard", "HEAD~1", cwd=work)
    git.run("push", "-q", "origin", "main", cwd=work)
    assert (demo.directory / "small.txt").exists()


def test_force_push_and_deleting_main_are_refused(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    git.commit_file(work, "a.txt", "a\n", "A")
    git.run("push", "-q", "origin", "main", cwd=work)
    git.run("reset", "-q", "--hard", "HEAD~1", cwd=work)
    git.commit_file(work, "b.txt", "b\n", "B")
    head = demo.head()

    forced = git.run("push", "--force", "origin", "main", cwd=work, check=False)
    assert forced.returncode != 0
    assert "non-fast-forward" in forced.stderr or "denying non-fast-forward" in forced.stderr
    deleted = git.run("push", "origin", "--delete", "main", cwd=work, check=False)
    assert deleted.returncode != 0
    assert "deletion of the current branch prohibited" in deleted.stderr
    assert demo.head() == head
    assert (demo.directory / "a.txt").exists()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "git/alice", 404),
        ("GET", "git/alice/demo.git", 404),
        ("GET", "git/alice/demo.git/HEAD", 404),
        ("GET", "git/alice/demo.git/objects/info/packs", 404),
        ("GET", "git/alice/demo.git/config", 404),
        ("GET", "git/alice/demo.git/info/refs", 400),
        ("GET", "git/alice/demo.git/info/refs?service=git-upload-archive", 400),
        ("GET", "git/alice/demo.git/info/refs?service=", 400),
        ("POST", "git/alice/demo.git/info/refs?service=git-upload-pack", 405),
        ("GET", "git/alice/demo.git/git-upload-pack", 405),
        ("PUT", "git/alice/demo.git/git-receive-pack", 405),
        ("GET", "git/alice/%2e%2e/demo.git/info/refs?service=git-upload-pack", 404),
        ("GET", "git/%2e%2e/%2e%2e/info/refs?service=git-upload-pack", 404),
        # The app refuses NUL anywhere in a URL before routing; 404 if it reached us.
        ("GET", "git/alice/demo%00.git/info/refs?service=git-upload-pack", (400, 404)),
        ("GET", "git/alice/" + "a" * 300 + ".git/info/refs?service=git-upload-pack", 404),
        ("GET", "git/ALICE/demo.git/info/refs?service=git-upload-pack", 404),
        ("GET", "git/alice/demo.git/info/refs/../../x?service=git-upload-pack", 404),
    ],
)
def test_malformed_git_paths_are_4xx_problems(
    live: LiveServer,
    alice: Account,
    demo: GitProject,
    method: str,
    path: str,
    status: int | tuple[int, ...],
) -> None:
    with http(live) as client:
        r = client.request(method, path, headers=alice.headers)
    expected = status if isinstance(status, tuple) else (status,)
    assert r.status_code in expected, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == r.status_code


def test_bad_request_bodies_are_4xx(live: LiveServer, alice: Account, demo: GitProject) -> None:
    url = f"git/{demo.owner}/{demo.slug}.git/git-upload-pack"
    with http(live) as client:
        wrong_type = client.post(url, content=b"0000", headers={**alice.headers})
        assert wrong_type.status_code == 415
        kind = {"Content-Type": "application/x-git-upload-pack-request", **alice.headers}
        not_gzip = client.post(url, content=b"plain", headers={**kind, "Content-Encoding": "gzip"})
        assert not_gzip.status_code == 400
        assert "gzip" in not_gzip.json()["detail"]
        brotli = client.post(url, content=b"x", headers={**kind, "Content-Encoding": "br"})
        assert brotli.status_code == 415
        empty = client.post(url, content=b"0000", headers=kind)
        assert empty.status_code == 200  # git itself answers a bare flush


def test_project_url_without_dot_git_works(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    url = git_url(live, demo, alice).removesuffix(".git")
    work = clone(git, url, tmp_path / "work")
    assert (work / "README.md").is_file()


def test_two_users_push_in_turn(
    live: LiveServer,
    alice: Account,
    bob: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
) -> None:
    add_collaborator(live, alice, demo, "bob", "contributor")
    mine = clone(git, git_url(live, demo, alice), tmp_path / "a")
    theirs = clone(git, git_url(live, demo, bob), tmp_path / "b")
    git.commit_file(mine, "alice.txt", "a\n", "Alice")
    git.run("push", "-q", "origin", "main", cwd=mine)
    git.commit_file(theirs, "bob.txt", "b\n", "Bob")
    stale = git.run("push", "origin", "main", cwd=theirs, check=False)
    assert stale.returncode != 0 and "fetch first" in stale.stderr
    git.run("pull", "-q", "--rebase", cwd=theirs)
    git.run("push", "-q", "origin", "main", cwd=theirs)
    assert (demo.directory / "alice.txt").exists() and (demo.directory / "bob.txt").exists()


@pytest.mark.slow
def test_large_push_and_clone_stream_without_buffering(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    """48 MiB of incompressible data up and down again: the server's Python heap (uvicorn,
    Starlette and the bridge all run in this process) grows by a few pipe-sized chunks,
    never by the size of the pack."""
    size = 48 * 1024 * 1024
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    git.commit_file(work, "weights.bin", os.urandom(size), "Model weights")

    tracemalloc.start()
    try:
        git.run("push", "-q", "origin", "main", cwd=work)
        _, push_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        copy = clone(git, git_url(live, demo, alice), tmp_path / "copy")
        _, clone_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (demo.directory / "weights.bin").stat().st_size == size
    assert (copy / "weights.bin").read_bytes() == (work / "weights.bin").read_bytes()
    limit = 8 * 1024 * 1024
    assert push_peak < limit, f"push peak {push_peak / 2**20:.1f} MiB"
    assert clone_peak < limit, f"clone peak {clone_peak / 2**20:.1f} MiB"
    print(f"push peak {push_peak / 2**20:.2f} MiB, clone peak {clone_peak / 2**20:.2f} MiB")


def test_push_waits_for_the_repository_lock(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    """File-API writes hold the same lock: a push never interleaves with one."""
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    new_head = git.commit_file(work, "later.txt", "after the lock\n", "Waits")
    before = demo.head()
    with repo_lock(demo.directory):
        push = subprocess.Popen(
            ["git", "push", "-q", "origin", "main"],
            cwd=work,
            env=git.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(2)
        assert push.poll() is None  # receive-pack has not started
        assert demo.head() == before
    _, err = push.communicate(timeout=60)
    assert push.returncode == 0, err
    assert demo.head() == new_head


def test_client_vanishing_mid_push_applies_nothing_and_frees_the_lock(
    live: LiveServer,
    alice: Account,
    demo: GitProject,
    git: GitClient,
    tmp_path: Path,
    engine: Engine,
) -> None:
    work = clone(git, git_url(live, demo, alice), tmp_path / "work")
    before = demo.head()
    new = git.commit_file(work, "big.bin", os.urandom(4 * 1024 * 1024), "Big")
    pack = git.run(
        "pack-objects", "--stdout", "--revs", cwd=work, input=f"{new}\n^{before}\n".encode()
    ).stdout_bytes
    command = f"{before} {new} refs/heads/main\0report-status\n".encode()
    body = f"{len(command) + 4:04x}".encode() + command + b"0000" + pack
    host, port = live.url.removeprefix("https://").rstrip("/").split(":")
    auth = base64.b64encode(f"alice:{alice.key}".encode()).decode()
    head = (
        f"POST /git/{demo.owner}/{demo.slug}.git/git-receive-pack HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
        "Content-Type: application/x-git-receive-pack-request\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    raw = socket.create_connection((host, int(port)))
    with tls.wrap_socket(raw, server_hostname=host) as conn:
        conn.sendall(head + body[: len(body) // 2])
        time.sleep(1)  # let the server start git and feed it half a pack

    # The lock is free again (a stuck lock would hang this push) and nothing of the half
    # push was applied.
    git.run("reset", "-q", "--hard", before, cwd=work)
    later = git.commit_file(work, "small.txt", "ok\n", "Small")
    git.run("push", "-q", "origin", "main", cwd=work, timeout=60)
    assert demo.head() == later
    first = demo.audit(engine)[0]
    assert first.outcome == "failure" and first.details["bytes"] > 1024 * 1024
    assert first.details["refs"] == {"refs/heads/main": "rejected"}
    assert not (demo.directory / "big.bin").exists()
    objects = demo.directory / ".git" / "objects"
    assert [p for p in objects.iterdir() if "incoming" in p.name] == []


def test_protocols_partial_and_shallow_clones(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    url = git_url(live, demo, alice)
    git.env["GIT_TRACE_PACKET"] = "1"
    v2 = git.run("-c", "protocol.version=2", "clone", url, str(tmp_path / "v2"))
    assert "< version 2" in v2.stderr  # the Git-Protocol header reached upload-pack
    v0 = git.run("-c", "protocol.version=0", "clone", url, str(tmp_path / "v0"))
    assert "< version 2" not in v0.stderr
    del git.env["GIT_TRACE_PACKET"]
    for args in (["--filter=blob:none"], ["--depth", "1"]):
        dest = tmp_path / args[0].strip("-").replace("=", "_").replace(":", "_")
        clone_args = ["clone", "-q", *args, url, str(dest)]
        git.run(*clone_args)
        assert (dest / "README.md").is_file()
    promisor = git.out("config", "remote.origin.promisor", cwd=tmp_path / "filter_blob_none")
    assert promisor == "true"


def test_push_an_existing_repository_into_a_blank_project(
    live: LiveServer,
    alice: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    tmp_path: Path,
) -> None:
    blank = make_project(alice, "blank", template=None)
    local = tmp_path / "existing"
    git.run("init", "-q", "-b", "main", str(local))
    head = git.commit_file(local, "train.py", "print('hi')\n", "First")
    git.run("remote", "add", "origin", git_url(live, blank, alice), cwd=local)
    git.run("push", "-q", "-u", "origin", "main", cwd=local)
    assert blank.head() == head
    assert (blank.directory / "train.py").read_text() == "print('hi')\n"


def test_a_push_moves_the_projects_updated_time(
    live: LiveServer, alice: Account, demo: GitProject, git: GitClient, tmp_path: Path
) -> None:
    with http(live) as client:
        before = client.get(f"api/v1/projects/alice/{demo.slug}", headers=alice.headers).json()
    work = clone(git, git_url(live, demo, alice), tmp_path / "w")
    git.commit_file(work, "pushed.txt", "x\n", "push")
    git.run("push", "-q", "origin", "main", cwd=work)
    with http(live) as client:
        after = client.get(f"api/v1/projects/alice/{demo.slug}", headers=alice.headers).json()
    assert after["updated_at"] > before["updated_at"]
