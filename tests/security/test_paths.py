"""Path attacks on the file API: each is a 4xx, and no file outside the project is read or
written. Raw paths go over a real HTTPS connection (http.client sends them byte for byte;
httpx would normalize the dots away before the server ever saw them)."""

from __future__ import annotations

import http.client
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kiln.settings import Settings
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_files_helpers import create_project, project_dir, tree_snapshot

LONG_NAME = "n" * 300
ATTACKS = [
    "../x",
    "a/../../x",
    "../../../../etc/passwd",
    "%2e%2e/x",
    "%2E%2E/%2e%2e/secret.txt",
    ".%2e/x",
    "%252e%252e/x",  # double-encoded: a second decoder would see '..'
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "a%00b",
    "a%00/../../x",
    "a%0Ab",
    LONG_NAME,
    f"dir/{LONG_NAME}/x",
    ".git/config",
    ".git/hooks/pre-commit",
    "sub/.git/config",
    "..%5C..%5Cx",
]


def _raw(live: LiveServer, method: str, path: str, key: str, body: bytes | None = None) -> Any:
    url = urlsplit(live.url)
    context = ssl.create_default_context(cafile=str(live.ca_file))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=context, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {key}"}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        conn.close()


@pytest.fixture
def outside(settings: Settings) -> Iterator[Path]:
    """Files beside the projects that an escape would read or write."""
    root = settings.data_dir
    root.mkdir(parents=True, exist_ok=True)
    (root / "secret.txt").write_text("outside secret")
    (root / "x").mkdir(exist_ok=True)
    yield root


def _outside_snapshot(settings: Settings, own: Path) -> dict[str, bytes | str]:
    everything = tree_snapshot(settings.data_dir)
    own_rel = str(own.relative_to(settings.data_dir))
    return {
        k: v
        for k, v in everything.items()
        if not (k == own_rel or k.startswith(own_rel + "/"))
        and not k.endswith((".db", ".db-wal", ".db-shm", ".lock"))
    }


def test_raw_traversal_paths_are_refused_over_https(
    live: LiveServer, alice: Account, settings: Settings, engine: Engine, outside: Path
) -> None:
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    with httpx.Client(base_url=live.url, verify=tls, headers=alice.headers) as http:
        r = http.post("/api/v1/projects", json={"name": "target"})
        assert r.status_code == 201, r.text
        own = project_dir(settings, engine, "alice", "target")
        before = _outside_snapshot(settings, own)
        base = "/api/v1/projects/alice/target/files/"
        for attack in ATTACKS:
            for method, body in (("GET", None), ("PUT", b"pwned"), ("DELETE", None)):
                status, ctype, content = _raw(live, method, base + attack, alice.key, body)
                # A newline never matches a route (Starlette's '.*'): 404 before any handler.
                wanted = 404 if "%0A" in attack else 400
                assert status == wanted, (method, attack, status, content)
                assert b"outside secret" not in content and b"root:" not in content
                assert ctype == "application/problem+json", (attack, ctype)
            decoded = unquote(attack)  # what the URL carries, sent as JSON instead
            for op, payload in (
                ("mkdir", {"path": decoded}),
                ("move", {"source": "README.md", "destination": decoded}),
            ):
                r = http.post(f"/api/v1/projects/alice/target/{op}", json=payload)
                assert 400 <= r.status_code < 500, (op, attack, r.status_code)
    assert _outside_snapshot(settings, own) == before
    assert (outside / "secret.txt").read_text() == "outside secret"


@pytest.fixture
def two_projects(
    client: TestClient, alice: Account, bob: Account, settings: Settings, engine: Engine
) -> tuple[str, Path, Path]:
    base = create_project(client, alice, "mine")
    create_project(client, bob, "theirs")
    mine = project_dir(settings, engine, "alice", "mine")
    theirs = project_dir(settings, engine, "bob", "theirs")
    (theirs / "private.txt").write_text("bob's secret")
    (mine / "sub").mkdir()
    (mine / "sub" / "inside.txt").write_text("inside")
    (mine / "to-root").symlink_to("/")
    (mine / "to-theirs").symlink_to(f"../{theirs.name}")
    (mine / "to-private").symlink_to(theirs / "private.txt")
    return base, mine, theirs


def test_symlinks_to_root_and_to_another_project_are_not_followed(
    client: TestClient, alice: Account, settings: Settings, two_projects: tuple[str, Path, Path]
) -> None:
    base, mine, theirs = two_projects
    h = alice.headers
    before = _outside_snapshot(settings, mine)

    top = {e["name"]: e["type"] for e in client.get(f"{base}/files/", headers=h).json()["entries"]}
    assert top["to-root"] == top["to-theirs"] == top["to-private"] == "symlink"

    reads = [
        "to-root/etc/passwd",
        "to-root",
        "to-root/",
        "to-theirs/private.txt",
        "to-theirs/",
        "to-private",
    ]
    for path in reads:
        r = client.get(f"{base}/files/{path}", headers=h)
        assert r.status_code == 400, (path, r.text)
        assert "symbolic link" in r.json()["detail"]
        assert b"bob's secret" not in r.content and b"root:" not in r.content
    for path in ("to-root/etc/passwd", "to-root", "to-theirs/", "to-private"):
        r = client.get(f"{base}/files/{path}", params={"format": "zip"}, headers=h)
        assert r.status_code == 400, (path, r.text)

    writes = [
        client.put(f"{base}/files/to-root/tmp/kiln-pwned", content=b"x", headers=h),
        client.put(f"{base}/files/to-theirs/private.txt", content=b"x", headers=h),
        client.put(f"{base}/files/to-theirs/new.txt", content=b"x", headers=h),
        client.put(f"{base}/files/to-private", content=b"x", headers=h),
        client.delete(f"{base}/files/to-theirs/private.txt", headers=h),
        client.post(f"{base}/mkdir", json={"path": "to-theirs/d"}, headers=h),
        client.post(f"{base}/move", json={"source": "to-private", "destination": "p"}, headers=h),
        client.post(
            f"{base}/move", json={"source": "to-theirs/private.txt", "destination": "p"}, headers=h
        ),
        client.post(
            f"{base}/move",
            json={"source": "sub/inside.txt", "destination": "to-theirs/i"},
            headers=h,
        ),
    ]
    assert [r.status_code for r in writes] == [400] * len(writes), [r.text for r in writes]
    assert not Path("/tmp/kiln-pwned").exists()
    assert (theirs / "private.txt").read_text() == "bob's secret"
    assert _outside_snapshot(settings, mine) == before

    # Deleting a link removes the link itself, never what it points to.
    r = client.delete(f"{base}/files/to-theirs?recursive=true", headers=h)
    assert r.status_code == 204, r.text
    assert not (mine / "to-theirs").is_symlink() and (theirs / "private.txt").exists()
    assert _outside_snapshot(settings, mine) == before


def _swap_folder_on_open(monkeypatch: pytest.MonkeyPatch, folder: Path, target: Path) -> list[str]:
    """The first time the file API opens ``folder`` by name relative to a directory fd,
    replace it with a symlink to ``target`` first: a swap between check and use."""
    real_open = os.open
    swapped: list[str] = []

    def racing_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == folder.name and dir_fd is not None and not swapped:
            swapped.append(path)
            folder.rename(folder.with_name(folder.name + ".real"))
            folder.symlink_to(target)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", racing_open)
    return swapped


@pytest.mark.parametrize("operation", ["read", "list", "write", "mkdir", "zip"])
def test_symlink_swapped_in_mid_request_is_refused(
    client: TestClient,
    alice: Account,
    settings: Settings,
    two_projects: tuple[str, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    base, mine, theirs = two_projects
    (theirs / "inside.txt").write_text("bob's copy")  # what a followed swap would serve
    before = _outside_snapshot(settings, mine)
    h = alice.headers
    requests: dict[str, Callable[[], httpx.Response]] = {
        "read": lambda: client.get(f"{base}/files/sub/inside.txt", headers=h),
        "list": lambda: client.get(f"{base}/files/sub/", headers=h),
        "write": lambda: client.put(f"{base}/files/sub/pwned.txt", content=b"x", headers=h),
        "mkdir": lambda: client.post(f"{base}/mkdir", json={"path": "sub/newdir"}, headers=h),
        "zip": lambda: client.get(f"{base}/files/sub/", params={"format": "zip"}, headers=h),
    }
    swapped = _swap_folder_on_open(monkeypatch, mine / "sub", theirs)
    r = requests[operation]()
    assert swapped == ["sub"]
    assert r.status_code == 400, r.text
    assert "symbolic link" in r.json()["detail"]
    assert b"bob's copy" not in r.content
    assert _outside_snapshot(settings, mine) == before
