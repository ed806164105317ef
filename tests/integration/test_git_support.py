"""Shared harness for the git smart-HTTP tests: the real ``git`` client against the live
HTTPS server. No tests here: the git test modules import its helpers, and its fixtures by
their ``*_fixture`` names (pytest registers them under ``name=``)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.models import AuditEvent
from kiln.domain.projects import find_project
from kiln.storage.git import run_git
from kiln.storage.store import ProjectStore
from kiln.testing.live import LiveServer
from tests.conftest import Account


class GitResult(subprocess.CompletedProcess[str]):
    stdout_bytes: bytes = b""


class GitClient:
    """Runs the real git client as a user would: its own empty HOME, Kiln's CA, no prompts,
    no system or global config."""

    def __init__(self, home: Path, ca_file: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_SSL_CAINFO": str(ca_file),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
            "GIT_AUTHOR_NAME": "Tester",
            "GIT_AUTHOR_EMAIL": "tester@example.com",
            "GIT_COMMITTER_NAME": "Tester",
            "GIT_COMMITTER_EMAIL": "tester@example.com",
            "LC_ALL": "C",
        }

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 240,
    ) -> GitResult:
        raw = subprocess.run(
            ["git", *args],
            cwd=cwd or self.home,
            env=self.env,
            input=input,
            capture_output=True,
            timeout=timeout,
        )
        proc = GitResult(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        proc.stdout_bytes = raw.stdout
        if check and proc.returncode != 0:
            raise AssertionError(
                f"git {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def out(self, *args: str, cwd: Path) -> str:
        return self.run(*args, cwd=cwd).stdout.strip()

    def commit_file(self, repo: Path, name: str, content: str | bytes, message: str) -> str:
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        self.run("add", "--", name, cwd=repo)
        self.run("commit", "-q", "-m", message, cwd=repo)
        return self.out("rev-parse", "HEAD", cwd=repo)


@dataclass
class GitProject:
    owner: str
    slug: str
    directory: Path  # the project's working tree on the server

    def head(self) -> str:
        return _server_git(self.directory, "rev-parse", "HEAD")

    def audit(self, engine: Engine, action: str = "git.push") -> list[AuditEvent]:
        with make_sessionmaker(engine)() as db:
            return list(
                db.scalars(
                    select(AuditEvent)
                    .where(
                        AuditEvent.action == action,
                        AuditEvent.target == f"project:{self.owner}/{self.slug}",
                    )
                    .order_by(AuditEvent.id)
                )
            )


def _server_git(repo: Path, *args: str) -> str:
    """git in a project's directory, as the server runs it (sandboxed, as the workload uid)."""
    return run_git(repo, *args).stdout.decode().strip()


def git_url(live: LiveServer, project: GitProject, who: Account | None = None) -> str:
    base = live.url.removeprefix("https://")
    auth = f"{who.username}:{who.key}@" if who is not None else ""
    return f"https://{auth}{base}git/{project.owner}/{project.slug}.git"


def http(live: LiveServer) -> httpx.Client:
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    return httpx.Client(base_url=live.url, verify=tls, timeout=60)


@pytest.fixture(name="git")
def git_fixture(live: LiveServer, tmp_path: Path) -> GitClient:
    return GitClient(tmp_path / "home", live.ca_file)


@pytest.fixture(name="make_project")
def make_project_fixture(live: LiveServer, engine: Engine) -> Callable[..., GitProject]:
    def make(
        owner: Account, name: str = "demo", template: str | None = "python-starter"
    ) -> GitProject:
        with http(live) as client:
            r = client.post(
                "api/v1/projects", json={"name": name, "template": template}, headers=owner.headers
            )
            assert r.status_code == 201, r.text
            slug = r.json()["slug"]
        with make_sessionmaker(engine)() as db:
            row = find_project(db, owner.username, slug)
            assert row is not None
            directory = ProjectStore(live.settings.projects_dir).project_dir(row.id)
        return GitProject(owner.username, slug, directory)

    return make


@pytest.fixture(name="demo")
def demo_fixture(make_project: Callable[..., GitProject], alice: Account) -> GitProject:
    """alice/demo, created from the python-starter template."""
    return make_project(alice)


def add_collaborator(
    live: LiveServer, owner: Account, project: GitProject, who: str, role: str
) -> None:
    with http(live) as client:
        r = client.put(
            f"api/v1/projects/{project.owner}/{project.slug}/collaborators/{who}",
            json={"role": role},
            headers=owner.headers,
        )
        assert r.status_code == 200, r.text


def clone(git: GitClient, url: str, dest: Path) -> Path:
    git.run("clone", "-q", url, str(dest))
    return dest
