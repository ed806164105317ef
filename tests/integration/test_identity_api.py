"""Users and teams over the API: who may create and change them, and what follows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from kiln.api.deps import SESSION_COOKIE
from tests.conftest import PASSWORD, Account

USERS, TEAMS = "/api/v1/users", "/api/v1/teams"


def ok(r: Any) -> Any:
    assert r.status_code < 400, r.text
    return r.json() if r.content else None


def login(client: TestClient, username: str, password: str) -> tuple[str, str]:
    """A separate browser: (session cookie, CSRF token)."""
    r = client.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    cookie = r.cookies.get(SESSION_COOKIE) or client.cookies.get(SESSION_COOKIE)
    client.cookies.clear()
    assert cookie
    return cookie, r.json()["csrf_token"]


def as_browser(cookie: str, csrf: str = "") -> dict[str, str]:
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    return {**headers, "X-CSRF-Token": csrf} if csrf else headers


def test_only_site_admins_create_users(client: TestClient, admin: Account, alice: Account) -> None:
    body = {"username": "erin", "password": "erin-password", "full_name": "Erin E."}
    r = client.post(USERS, json=body, headers=alice.headers)
    assert r.status_code == 403
    created = ok(client.post(USERS, json=body, headers=admin.headers))
    assert created["username"] == "erin" and created["is_site_admin"] is False
    assert "password" not in created and "password_hash" not in created
    cookie, _ = login(client, "erin", "erin-password")
    assert ok(client.get("/api/v1/auth/me", headers=as_browser(cookie)))["full_name"] == "Erin E."


def test_users_are_listed_page_by_page(
    client: TestClient, make_user: Callable[..., Account]
) -> None:
    accounts = [make_user(f"user-{i}") for i in range(5)]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = ok(client.get(USERS, params=params, headers=accounts[0].headers))
        seen += [u["username"] for u in page["items"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == [a.username for a in accounts]
    assert ok(client.get(f"{USERS}/user-3", headers=accounts[0].headers))["username"] == "user-3"


def test_people_change_their_own_profile_but_not_their_powers(
    client: TestClient, alice: Account, bob: Account
) -> None:
    me = f"{USERS}/alice"
    changed = ok(
        client.patch(me, json={"full_name": "Alice A.", "email": "a@x.org"}, headers=alice.headers)
    )
    assert (changed["full_name"], changed["email"]) == ("Alice A.", "a@x.org")
    for body in ({"is_site_admin": True}, {"is_active": False}):
        r = client.patch(me, json=body, headers=alice.headers)
        assert r.status_code == 403, body
    r = client.patch(f"{USERS}/bob", json={"full_name": "Not Bob"}, headers=alice.headers)
    assert r.status_code == 403
    assert ok(client.get(f"{USERS}/bob", headers=bob.headers))["full_name"] == ""


def test_a_new_password_ends_every_other_session(
    client: TestClient, alice: Account, admin: Account
) -> None:
    here, csrf = login(client, "alice", PASSWORD)
    elsewhere, _ = login(client, "alice", PASSWORD)
    r = client.patch(
        f"{USERS}/alice", json={"password": "a-new-password"}, headers=as_browser(here, csrf)
    )
    assert r.status_code == 403 and "current password" in r.json()["detail"]
    r = client.patch(
        f"{USERS}/alice",
        json={"password": "a-new-password", "current_password": "not-my-password"},
        headers=as_browser(here, csrf),
    )
    assert r.status_code == 403
    r = client.patch(
        f"{USERS}/alice",
        json={"password": "a-new-password", "current_password": PASSWORD},
        headers=as_browser(here, csrf),
    )
    assert r.status_code == 200, r.text
    assert client.get("/api/v1/auth/me", headers=as_browser(here)).status_code == 200
    assert client.get("/api/v1/auth/me", headers=as_browser(elsewhere)).status_code == 401
    assert (
        client.post(
            "/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}
        ).status_code
        == 401
    )
    # An administrator's reset ends all of them; API keys stay (revoke those separately).
    r = client.patch(f"{USERS}/alice", json={"password": "reset-by-admin"}, headers=admin.headers)
    assert r.status_code == 200
    assert client.get("/api/v1/auth/me", headers=as_browser(here)).status_code == 401
    assert client.get("/api/v1/auth/me", headers=alice.headers).status_code == 200
    login(client, "alice", "reset-by-admin")


def test_teams_are_run_by_their_maintainers(
    client: TestClient, alice: Account, bob: Account, make_user: Callable[..., Account]
) -> None:
    carol = make_user("carol")
    team = ok(
        client.post(TEAMS, json={"name": "lab", "description": "ML lab"}, headers=alice.headers)
    )
    assert team["members"] == [{"username": "alice", "full_name": "", "role": "maintainer"}]
    ok(client.put(f"{TEAMS}/lab/members/bob", json={}, headers=alice.headers))
    # A plain member cannot change the team.
    r = client.put(f"{TEAMS}/lab/members/carol", json={}, headers=bob.headers)
    assert r.status_code == 403
    r = client.delete(f"{TEAMS}/lab/members/alice", headers=bob.headers)
    assert r.status_code == 403
    # A maintainer promotes; the new maintainer can then manage members.
    ok(client.put(f"{TEAMS}/lab/members/bob", json={"role": "maintainer"}, headers=alice.headers))
    ok(client.put(f"{TEAMS}/lab/members/carol", json={}, headers=bob.headers))
    members = ok(client.get(f"{TEAMS}/lab", headers=carol.headers))["members"]
    assert {(m["username"], m["role"]) for m in members} == {
        ("alice", "maintainer"),
        ("bob", "maintainer"),
        ("carol", "member"),
    }
    ok(client.delete(f"{TEAMS}/lab/members/carol", headers=bob.headers))
    # Out of the team, carol no longer sees it; bob, still in it, does.
    assert ok(client.get(TEAMS, headers=carol.headers))["items"] == []
    assert [t["name"] for t in ok(client.get(TEAMS, headers=bob.headers))["items"]] == ["lab"]


def test_team_membership_grants_roles_on_team_projects(
    client: TestClient, alice: Account, bob: Account
) -> None:
    ok(client.post(TEAMS, json={"name": "lab"}, headers=alice.headers))
    project = ok(
        client.post(
            "/api/v1/projects", json={"name": "model", "owner": "lab"}, headers=alice.headers
        )
    )
    assert (project["owner"], project["owner_kind"]) == ("lab", "team")
    url = "/api/v1/projects/lab/model"
    assert client.get(url, headers=bob.headers).status_code == 404
    ok(client.put(f"{TEAMS}/lab/members/bob", json={}, headers=alice.headers))
    assert ok(client.get(url, headers=bob.headers))["role"] == "contributor"
    ok(client.put(f"{TEAMS}/lab/members/bob", json={"role": "maintainer"}, headers=alice.headers))
    assert ok(client.get(url, headers=bob.headers))["role"] == "admin"
    ok(client.delete(f"{TEAMS}/lab/members/bob", headers=alice.headers))
    assert client.get(url, headers=bob.headers).status_code == 404


def test_email_addresses_are_for_their_owner_and_admins(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    r = client.patch(f"{USERS}/alice", json={"email": "alice@example.org"}, headers=alice.headers)
    assert r.status_code == 200
    assert ok(client.get(f"{USERS}/alice", headers=alice.headers))["email"] == "alice@example.org"
    assert ok(client.get(f"{USERS}/alice", headers=admin.headers))["email"] == "alice@example.org"
    assert ok(client.get(f"{USERS}/alice", headers=bob.headers))["email"] == ""
    listed = ok(client.get(USERS, headers=bob.headers))["items"]
    assert {u["username"]: u["email"] for u in listed}["alice"] == ""


def test_teams_are_visible_to_their_members_and_site_admins_only(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    ok(client.post(TEAMS, json={"name": "lab"}, headers=alice.headers))
    ok(client.post(TEAMS, json={"name": "other"}, headers=bob.headers))
    names = lambda who: [t["name"] for t in ok(client.get(TEAMS, headers=who.headers))["items"]]  # noqa: E731
    assert names(alice) == ["lab"] and names(bob) == ["other"]
    assert sorted(names(admin)) == ["lab", "other"]
    # Another user's team does not exist for bob: not its members, not a way to join it.
    assert client.get(f"{TEAMS}/lab", headers=bob.headers).status_code == 404
    assert client.put(f"{TEAMS}/lab/members/bob", json={}, headers=bob.headers).status_code == 404
    assert client.delete(f"{TEAMS}/lab/members/alice", headers=bob.headers).status_code == 404
    assert ok(client.get(f"{TEAMS}/lab", headers=admin.headers))["name"] == "lab"
    # Once a member, bob sees it (and, as a plain member, still cannot change it).
    ok(client.put(f"{TEAMS}/lab/members/bob", json={}, headers=alice.headers))
    assert names(bob) == ["lab", "other"]
    assert client.put(f"{TEAMS}/lab/members/bob", json={}, headers=bob.headers).status_code == 403
