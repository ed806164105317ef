"""The audit log: every change to identity and projects is recorded with who, from where and
with what outcome, and only site admins read it."""

from __future__ import annotations

import base64
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import PASSWORD, Account

AUDIT = "/api/v1/audit"
P = "/api/v1/projects/alice/demo"


def events(client: TestClient, admin: Account, **filters: str) -> list[dict[str, Any]]:
    """Every event, oldest first, read through the API page by page."""
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 7, **filters}
    while True:
        r = client.get(AUDIT, params=params, headers=admin.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        found += page["items"]
        if not page["next_cursor"]:
            return found[::-1]
        params["cursor"] = page["next_cursor"]


def ok(r: Any) -> Any:
    assert r.status_code < 400, r.text
    return r


def test_every_change_is_recorded_with_actor_address_and_outcome(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    a = alice.headers
    # logins: a failure and a success, a logout
    client.post("/api/v1/auth/login", json={"username": "alice", "password": "not-it-at-all"})
    csrf = ok(client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}))
    ok(client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf.json()["csrf_token"]}))
    # keys
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    key = ok(
        client.post(
            "/api/v1/auth/api-keys",
            json={"name": "ci"},
            headers={"Authorization": f"Basic {basic}"},
        )
    ).json()
    ok(client.delete(f"/api/v1/auth/api-keys/{key['id']}", headers=a))
    # projects, collaborators, environment
    ok(client.post("/api/v1/projects", json={"name": "demo"}, headers=a))
    ok(client.patch(P, json={"visibility": "public"}, headers=a))
    ok(client.put(f"{P}/collaborators/bob", json={"role": "contributor"}, headers=a))
    ok(client.delete(f"{P}/collaborators/bob", headers=a))
    ok(client.put(f"{P}/env/TOKEN", json={"value": "hunter2-secret", "secret": True}, headers=a))
    ok(client.delete(f"{P}/env/TOKEN", headers=a))
    ok(client.delete(P, headers=a))
    # users and teams
    new_user = {"username": "erin", "password": "erin-password-1"}
    ok(client.post("/api/v1/users", json=new_user, headers=admin.headers))
    ok(
        client.patch(
            "/api/v1/users/erin", json={"password": "another-password"}, headers=admin.headers
        )
    )
    ok(client.post("/api/v1/teams", json={"name": "lab"}, headers=a))
    ok(client.put("/api/v1/teams/lab/members/bob", json={"role": "member"}, headers=a))
    ok(client.delete("/api/v1/teams/lab/members/bob", headers=a))

    seen = [
        (e["action"], e["actor_name"], e["target"], e["outcome"]) for e in events(client, admin)
    ]
    assert seen == [
        ("auth.login", "alice", "", "failure"),
        ("auth.login", "alice", "", "success"),
        ("auth.logout", "alice", "", "success"),
        ("apikey.create", "alice", f"apikey:{key['id']}", "success"),
        ("apikey.revoke", "alice", f"apikey:{key['id']}", "success"),
        ("project.create", "alice", "project:alice/demo", "success"),
        ("project.update", "alice", "project:alice/demo", "success"),
        ("collaborator.set", "alice", "project:alice/demo", "success"),
        ("collaborator.remove", "alice", "project:alice/demo", "success"),
        ("env.set", "alice", "project:alice/demo", "success"),
        ("env.delete", "alice", "project:alice/demo", "success"),
        ("project.delete", "alice", "project:alice/demo", "success"),
        ("user.create", "root-admin", "user:erin", "success"),
        ("user.update", "root-admin", "user:erin", "success"),
        ("team.create", "alice", "team:lab", "success"),
        ("team.member.set", "alice", "team:lab", "success"),
        ("team.member.remove", "alice", "team:lab", "success"),
    ]
    everything = events(client, admin)
    assert all(e["address"] == "testclient" and e["at"] for e in everything)
    details = {e["action"]: e["details"] for e in everything}
    assert details["collaborator.set"] == {"username": "bob", "role": "contributor"}
    assert details["project.update"] == {"visibility": "public"}
    assert details["env.set"] == {"name": "TOKEN", "secret": True}
    assert details["user.update"]["password_changed"] is True
    text = repr(everything)
    for secret in ("hunter2-secret", PASSWORD, "not-it-at-all", "another-password", key["key"]):
        assert secret not in text, "the audit log must never hold a secret"


def test_refused_changes_are_recorded_as_denied(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    ok(
        client.post(
            "/api/v1/projects", json={"name": "demo", "visibility": "public"}, headers=alice.headers
        )
    )
    r = client.put(f"{P}/env/X", json={"value": "1"}, headers=bob.headers)
    assert r.status_code == 403
    r = client.delete(P, headers=bob.headers)
    assert r.status_code == 403
    denied = [e for e in events(client, admin) if e["outcome"] == "denied"]
    assert [(e["actor_name"], e["target"], e["details"]["needs"]) for e in denied] == [
        ("bob", "project:alice/demo", "admin"),
        ("bob", "project:alice/demo", "admin"),
    ]


def test_only_site_admins_read_the_log_and_can_filter_it(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    assert client.get(AUDIT).status_code == 401
    r = client.get(AUDIT, headers=alice.headers)
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    for who in (alice, bob):
        ok(client.post("/api/v1/projects", json={"name": f"p-{who.username}"}, headers=who.headers))
    mine = events(client, admin, actor="bob")
    assert [(e["action"], e["target"]) for e in mine] == [("project.create", "project:bob/p-bob")]
    created = events(client, admin, action="project.create")
    assert [e["actor_name"] for e in created] == ["alice", "bob"]
    newest = client.get(AUDIT, params={"limit": 1}, headers=admin.headers).json()["items"]
    assert newest[0]["actor_name"] == "bob", "newest first"


def test_applications_and_the_site_setting_are_recorded(
    client: TestClient, alice: Account, admin: Account
) -> None:
    a = alice.headers
    apps = f"{P}/applications"
    ok(client.post("/api/v1/projects", json={"name": "demo"}, headers=a))
    ok(client.put(f"{P}/files/app.py", content=b"print(1)\n", headers=a))
    ok(client.post(apps, json={"name": "web", "subdomain": "web", "script": "app.py"}, headers=a))
    ok(client.patch(f"{apps}/web", json={"env": {"MODE": "fast-9"}, "public": True}, headers=a))
    ok(client.post(f"{apps}/web/restart", headers=a))
    ok(client.post(f"{apps}/web/stop", headers=a))
    ok(client.post(f"{apps}/web/start", headers=a))
    ok(client.get(f"{apps}/web/open", headers=a, follow_redirects=False))
    ok(client.delete(f"{apps}/web", headers=a))
    settings = {"public_applications": True}
    ok(client.patch("/api/v1/site-settings", json=settings, headers=admin.headers))

    recorded = [
        e for e in events(client, admin) if e["action"].startswith(("application.", "site."))
    ]
    assert [(e["action"], e["actor_name"], e["target"]) for e in recorded] == [
        ("application.create", "alice", "project:alice/demo"),
        ("application.update", "alice", "project:alice/demo"),
        ("application.restart", "alice", "project:alice/demo"),
        ("application.stop", "alice", "project:alice/demo"),
        ("application.start", "alice", "project:alice/demo"),
        ("application.open", "alice", "project:alice/demo"),
        ("application.delete", "alice", "project:alice/demo"),
        ("site.settings", "root-admin", recorded[-1]["target"]),
    ]
    details = [e["details"] for e in recorded]
    assert details[0] == {"application": "web", "subdomain": "web", "public": False}
    assert details[1] == {"application": "web", "fields": ["env", "public"], "restarted": True}
    assert details[6] == {"application": "web", "subdomain": "web"}
    assert details[7] == {"public_applications": True}
    assert "fast-9" not in repr(recorded), "environment values stay out of the log"
