"""Helpers shared by the file-API tests (integration and security); holds no tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from kiln.db.models import Project
from kiln.settings import Settings
from kiln.storage.git import run_git
from tests.conftest import Account


def create_project(client: TestClient, account: Account, name: str) -> str:
    """Create a blank project; returns its API base, '/api/v1/projects/{owner}/{slug}'."""
    r = client.post("/api/v1/projects", json={"name": name}, headers=account.headers)
    assert r.status_code == 201, r.text
    return f"/api/v1/projects/{r.json()['owner']}/{r.json()['slug']}"


def project_dir(settings: Settings, engine: Engine, owner: str, slug: str) -> Path:
    with Session(engine) as db:
        project_id = db.scalar(
            select(Project.id).where(Project.owner_name == owner, Project.slug == slug)
        )
    assert project_id is not None
    return settings.projects_dir / str(project_id)


def project_count(engine: Engine) -> int:
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(Project)) or 0


def git(repo: Path, *args: str) -> str:
    """git in a project's directory, as the server runs it (sandboxed, as the workload uid)."""
    return run_git(repo, *args).stdout.decode()


BIG_FILE = 64 * 1024**2


def tree_snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path below ``root`` with its content (files) or link target (symlinks)."""
    found: dict[str, bytes | str] = {}
    if not root.exists():
        return found
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + str(path.readlink())
        elif path.is_file() and path.stat().st_size > BIG_FILE:
            # Project filesystem images are sparse and tens of GiB: their contents are the
            # mounted project directories, which are read on their own.
            found[rel] = f"file of {path.stat().st_size} bytes"
        elif path.is_file():
            found[rel] = path.read_bytes()
        else:
            found[rel] = "dir"
    return found


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None
