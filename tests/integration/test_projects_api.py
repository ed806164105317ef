"""Projects over the API: creation, listing, changes, deletion, collaborators, environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from kiln.settings import Settings
from kiln.storage.git import run_git
from tests.conftest import Account

PROJECTS = "/api/v1/projects"
P = f"{PROJECTS}/alice/demo"


def ok(r: Any) -> Any:
    assert r.status_code < 400, r.text
    return r.json() if r.content else None


def project_dirs(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.projects_dir.iterdir() if not p.name.startswith("."))


def git_log(path: Path) -> list[str]:
    return run_git(path, "log", "--format=%s").stdout.decode().split("\n")[:-1]


def test_create_blank_and_from_the_template(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    blank = ok(client.post(PROJECTS, json={"name": "demo"}, headers=alice.headers))
    assert {k: blank[k] for k in ("owner", "name", "slug", "visibility", "role", "owner_kind")} == {
        "owner": "alice",
        "name": "demo",
        "slug": "demo",
        "visibility": "private",
        "role": "admin",
        "owner_kind": "user",
    }
    assert blank["git_url"] == "https://testserver/git/alice/demo.git"
    [directory] = project_dirs(settings)
    assert (directory / ".git").is_dir() and [p.name for p in directory.iterdir()] == [".git"]

    body = {"name": "Churn Model <v2>", "template": "python-starter"}
    made = ok(client.post(PROJECTS, json=body, headers=alice.headers))
    assert (made["name"], made["slug"]) == ("Churn Model <v2>", "churn-model-v2")
    listing = ok(client.get(f"{PROJECTS}/alice/churn-model-v2/files/", headers=alice.headers))
    names = {e["name"] for e in listing["entries"]}
    assert {"requirements.txt", "main.py"} <= names
    [template_dir] = [d for d in project_dirs(settings) if d != directory]
    assert git_log(template_dir) == ["Create project"], "the template arrives as one commit"


def test_list_pages_and_search(client: TestClient, alice: Account, bob: Account) -> None:
    for name in ("alpha", "beta", "gamma", "100% done", "under_score"):
        ok(client.post(PROJECTS, json={"name": name}, headers=alice.headers))
    ok(client.post(PROJECTS, json={"name": "bobs"}, headers=bob.headers))
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = ok(client.get(PROJECTS, params=params, headers=alice.headers))
        assert len(page["items"]) <= 2
        seen += [p["slug"] for p in page["items"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == ["alpha", "beta", "gamma", "100-done", "under-score"]

    def search(q: str) -> list[str]:
        return [
            p["name"]
            for p in ok(client.get(PROJECTS, params={"q": q}, headers=alice.headers))["items"]
        ]

    assert search("GAM") == ["gamma"]
    assert search("%") == ["100% done"], "% is a character, not a wildcard"
    assert search("_") == ["under_score"], "_ is a character, not a wildcard"
    assert search("alice") == ["alpha", "beta", "gamma", "100% done", "under_score"]
    assert search("bobs") == [], "other people's private projects stay hidden"


def test_update_changes_what_it_names_and_keeps_the_url(client: TestClient, alice: Account) -> None:
    ok(client.post(PROJECTS, json={"name": "demo", "description": "first"}, headers=alice.headers))
    updated = ok(
        client.patch(
            P, json={"name": "Demo Project", "visibility": "public"}, headers=alice.headers
        )
    )
    assert (updated["name"], updated["slug"], updated["description"], updated["visibility"]) == (
        "Demo Project",
        "demo",
        "first",
        "public",
    )
    assert ok(client.get(P, headers=alice.headers))["name"] == "Demo Project"


def test_delete_removes_row_files_collaborators_and_env(
    client: TestClient, alice: Account, bob: Account, settings: Settings, engine: Engine
) -> None:
    ok(
        client.post(
            PROJECTS, json={"name": "demo", "template": "python-starter"}, headers=alice.headers
        )
    )
    ok(client.put(f"{P}/collaborators/bob", json={"role": "viewer"}, headers=alice.headers))
    ok(client.put(f"{P}/env/KEY", json={"value": "v"}, headers=alice.headers))
    assert client.delete(P, headers=alice.headers).status_code == 204
    assert client.get(P, headers=alice.headers).status_code == 404
    assert project_dirs(settings) == []
    with engine.connect() as conn:
        for table in ("projects", "collaborators", "project_env_vars"):
            assert conn.scalar(text(f"SELECT count(*) FROM {table}")) == 0, table
    # The name is free again, and the new project starts empty.
    ok(client.post(PROJECTS, json={"name": "demo"}, headers=alice.headers))
    assert ok(client.get(f"{P}/files/", headers=alice.headers))["entries"] == []
    assert ok(client.get(f"{P}/collaborators", headers=alice.headers)) == []


def test_collaborators_are_added_changed_and_removed(
    client: TestClient, alice: Account, bob: Account, make_user: Callable[..., Account]
) -> None:
    make_user("carol")
    ok(client.post(PROJECTS, json={"name": "demo"}, headers=alice.headers))
    ok(client.put(f"{P}/collaborators/bob", json={"role": "viewer"}, headers=alice.headers))
    ok(client.put(f"{P}/collaborators/carol", json={"role": "operator"}, headers=alice.headers))
    assert ok(client.get(P, headers=bob.headers))["role"] == "viewer"
    ok(client.put(f"{P}/collaborators/bob", json={"role": "admin"}, headers=alice.headers))
    assert ok(client.get(P, headers=bob.headers))["role"] == "admin"
    listed = ok(client.get(f"{P}/collaborators", headers=bob.headers))
    assert listed == [
        {"username": "bob", "role": "admin"},
        {"username": "carol", "role": "operator"},
    ]
    # A project admin may manage collaborators too, but the owner is never one.
    ok(client.delete(f"{P}/collaborators/carol", headers=bob.headers))
    r = client.put(f"{P}/collaborators/alice", json={"role": "viewer"}, headers=bob.headers)
    assert r.status_code == 422
    ok(client.delete(f"{P}/collaborators/bob", headers=alice.headers))
    assert client.get(P, headers=bob.headers).status_code == 404


def test_secret_values_are_never_returned(client: TestClient, alice: Account, bob: Account) -> None:
    ok(client.post(PROJECTS, json={"name": "demo"}, headers=alice.headers))
    ok(client.put(f"{P}/collaborators/bob", json={"role": "viewer"}, headers=alice.headers))
    shown = ok(
        client.put(
            f"{P}/env/DB_PASSWORD", json={"value": "s3cret!", "secret": True}, headers=alice.headers
        )
    )
    assert shown == {"name": "DB_PASSWORD", "value": None, "secret": True}
    ok(client.put(f"{P}/env/MODE", json={"value": "fast"}, headers=alice.headers))
    for who in (alice, bob):
        r = client.get(f"{P}/env", headers=who.headers)
        assert r.json() == [
            {"name": "DB_PASSWORD", "value": None, "secret": True},
            {"name": "MODE", "value": "fast", "secret": False},
        ]
        assert "s3cret!" not in r.text
    # Making a secret public takes a new value; the old one is never revealed.
    ok(client.put(f"{P}/env/DB_PASSWORD", json={"value": "public-now"}, headers=alice.headers))
    listed = ok(client.get(f"{P}/env", headers=alice.headers))
    assert listed[0] == {"name": "DB_PASSWORD", "value": "public-now", "secret": False}
    ok(client.delete(f"{P}/env/MODE", headers=alice.headers))
    assert [v["name"] for v in ok(client.get(f"{P}/env", headers=alice.headers))] == ["DB_PASSWORD"]


def test_who_may_own_a_new_project(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    ok(client.post("/api/v1/teams", json={"name": "lab"}, headers=alice.headers))
    assert (
        client.post(PROJECTS, json={"name": "x", "owner": "lab"}, headers=bob.headers).status_code
        == 403
    )
    assert (
        client.post(PROJECTS, json={"name": "x", "owner": "alice"}, headers=bob.headers).status_code
        == 403
    )
    for_alice = ok(
        client.post(PROJECTS, json={"name": "x", "owner": "alice"}, headers=admin.headers)
    )
    assert for_alice["owner"] == "alice"
    assert ok(client.get(f"{PROJECTS}/alice/x", headers=alice.headers))["role"] == "admin"
    for_team = ok(client.post(PROJECTS, json={"name": "y", "owner": "lab"}, headers=admin.headers))
    assert for_team["owner_kind"] == "team"
