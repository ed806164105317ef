"""git over HTTPS keeps working after the project's workloads wrote into it (a job, a
terminal session, a JupyterLab session), and a repository a workload broke gives git's own
message — as a problem+json or as git's text — and an audit record, never a 500."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_git_support import (
    GitClient,
    GitProject,
    git_fixture,
    git_url,
    http,
    make_project_fixture,
)
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

FIXTURES = (git_fixture, make_project_fixture)  # registered by import
pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("runner")]

ENDED = {"succeeded", "failed", "timed_out", "stopped"}


def wait(probe: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_job(client: httpx.Client, base: str, who: Account, script: str, body: str) -> dict:
    h = who.headers
    assert client.put(f"{base}/files/{script}", content=body.encode(), headers=h).status_code in (
        200,
        201,
    )
    name = script.replace(".", "-")
    made = client.post(f"{base}/jobs", json={"name": name, "script": script}, headers=h)
    assert made.status_code == 201, made.text
    run = client.post(f"{base}/jobs/{name}/runs", headers=h).json()

    def ended() -> dict | None:
        state = client.get(f"{base}/jobs/{name}/runs/{run['id']}", headers=h).json()
        return state if state["state"] in ENDED else None

    done: dict = wait(ended, f"run of {script}")
    assert done["state"] == "succeeded", done
    return done


def run_session(client: httpx.Client, base: str, who: Account, editor: str, command: str) -> None:
    """A session that writes into the project (from its terminal, or JupyterLab's own
    files), then stops."""
    h = who.headers
    made = client.post(f"{base}/sessions", json={"editor": editor}, headers=h)
    assert made.status_code == 201, made.text
    session = made.json()
    url = f"{base}/sessions/{session['id']}"

    def running() -> dict | None:
        state = client.get(url, headers=h).json()
        assert state["state"] in ("queued", "starting", "running"), state
        return state if state["state"] == "running" else None

    wait(running, f"{editor} session to run")
    if command:
        # What its user would type: through the workers-free path of a job, the same uid.
        run_job(client, base, who, "from-session.sh", command)
    stopped = client.delete(url, headers=h)
    assert stopped.status_code == 200, stopped.text


def clone_fetch_push(
    live: LiveServer, who: Account, project: GitProject, git: GitClient, work: Path, tag: str
) -> None:
    git.run("clone", "-q", git_url(live, project, who), str(work))
    git.run("fetch", "-q", "origin", cwd=work)
    git.commit_file(work, f"pushed-{tag}.txt", f"{tag}\n", f"push after {tag}")
    git.run("push", "-q", "origin", "HEAD:main", cwd=work)
    assert (project.directory / f"pushed-{tag}.txt").read_text() == f"{tag}\n"


def test_clone_fetch_push_work_before_and_after_workloads(
    live: LiveServer,
    alice: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    tmp_path: Path,
) -> None:
    project = make_project(alice, "busy")
    base = f"api/v1/projects/alice/{project.slug}"
    clone_fetch_push(live, alice, project, git, tmp_path / "before", "before")
    with http(live) as client:
        run_job(
            client,
            base,
            alice,
            "make.sh",
            "mkdir -p data/raw deep/er/still && echo 1,2 > data/raw/a.csv\n"
            "echo 'print(1)' > new.py && touch deep/er/still/x && chmod 600 new.py\n",
        )
        clone_fetch_push(live, alice, project, git, tmp_path / "after-job", "job")
        run_session(client, base, alice, "terminal", "echo notes > session-notes.md\n")
        clone_fetch_push(live, alice, project, git, tmp_path / "after-terminal", "terminal")
        run_session(client, base, alice, "jupyterlab", "")
        clone_fetch_push(live, alice, project, git, tmp_path / "after-jupyterlab", "jupyterlab")
    # What the workloads made is the project's (untracked until committed), never lost.
    assert (project.directory / "data" / "raw" / "a.csv").read_text() == "1,2\n"


def test_a_repository_a_workload_broke_gives_gits_reason_and_an_audit_record(
    live: LiveServer,
    alice: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    engine: Engine,
    tmp_path: Path,
) -> None:
    project = make_project(alice, "broken")
    base = f"api/v1/projects/alice/{project.slug}"
    with http(live) as client:
        run_job(client, base, alice, "break.sh", "rm -rf .git/objects .git/refs\n")
        # A client that is not git: problem+json with what git said.
        refs = client.get(
            f"git/alice/{project.slug}.git/info/refs",
            params={"service": "git-upload-pack"},
            headers=alice.headers,
        )
        assert 400 <= refs.status_code < 500 or refs.status_code == 502, refs.text
        assert refs.headers["content-type"] == "application/problem+json"
        assert "git said:" in refs.json()["detail"], refs.json()
        # A file-API write commits: git's reason, as a 409 problem.
        put = client.put(f"{base}/files/x.txt", content=b"x", headers=alice.headers)
        assert put.status_code == 409, put.text
        assert put.json()["title"] == "git failed"
    cloned = git.run("clone", "-q", git_url(live, project, alice), str(tmp_path / "c"), check=False)
    assert cloned.returncode != 0
    assert "git said:" in cloned.stderr, cloned.stderr
    failures = project.audit(engine, "git.fetch")
    assert failures and all(e.outcome == "failure" for e in failures)
    assert all(e.details["reason"] for e in failures)


def test_a_push_to_a_project_over_its_quota_is_refused_with_the_usage(
    live: LiveServer,
    alice: Account,
    admin: Account,
    make_project: Callable[..., GitProject],
    git: GitClient,
    engine: Engine,
    tmp_path: Path,
) -> None:
    project = make_project(alice, "full")
    base = f"api/v1/projects/alice/{project.slug}"
    work = tmp_path / "work"
    with http(live) as client:
        quota = client.put(
            f"{base}/quota", json={"quota_bytes": 16 * 1024**2}, headers=admin.headers
        )
        assert quota.status_code == 200, quota.text
        run_job(client, base, alice, "fill.sh", "head -c 20000000 /dev/zero > big.bin\n")
    git.run("clone", "-q", git_url(live, project, alice), str(work))  # clones still work
    git.commit_file(work, "more.txt", "more\n", "more")
    refused = git.run("push", "-q", "origin", "HEAD:main", cwd=work, check=False)
    assert refused.returncode != 0
    assert "Quota exceeded" in refused.stderr and "before pushing" in refused.stderr
    assert not (project.directory / "more.txt").exists()
    pushes = project.audit(engine)
    assert pushes[-1].outcome == "failure" and "Quota" in pushes[-1].details["reason"]
