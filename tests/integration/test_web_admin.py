"""Administration pages: users, teams, the audit log."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.models import User
from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in


@pytest.fixture
def admin_ui(app: FastAPI, admin: Account) -> UiClient:
    return sign_in(app, admin.username, admin.password)


@pytest.mark.parametrize("path", ["/admin/users", "/admin/audit"])
def test_admin_pages_need_a_site_admin(app: FastAPI, alice: Account, path: str) -> None:
    ui = sign_in(app, alice.username, alice.password)
    page = ui.page(path, status=403)
    assert "this needs a site administrator" in page
    assert "/admin/users" not in ui.page("/projects")  # and the top bar does not offer them


def test_admin_creates_disables_and_promotes_users(app: FastAPI, admin_ui: UiClient) -> None:
    page = admin_ui.page("/admin/users")
    assert "root-admin" in page
    response = admin_ui.htmx(
        "POST",
        "/admin/users",
        data={"username": "dave", "password": "dave-password", "full_name": "Dave D"},
    )
    assert response.status_code == 200
    assert response.headers["hx-trigger"] == "users-changed"  # the table reloads itself
    assert "dave" in response.text
    rows = admin_ui.htmx("GET", "/admin/users")
    assert "<html" not in rows.text
    assert 'id="user-dave"' in rows.text
    assert "Dave D" in rows.text
    taken = admin_ui.htmx(
        "POST", "/admin/users", data={"username": "dave", "password": "dave-password"}
    )
    assert taken.status_code == 409
    assert taken.json()["detail"] == "the name 'dave' is already taken"
    short = admin_ui.htmx("POST", "/admin/users", data={"username": "eve", "password": "x"})
    assert short.status_code == 422

    dave = sign_in(app, "dave", "dave-password")
    disabled = admin_ui.htmx("POST", "/admin/users/dave", data={"action": "disable"})
    assert disabled.status_code == 200
    assert "badge-disabled" in disabled.text
    assert dave.http.get("/projects").status_code == 303  # signed out at once
    assert UiClient(app).login("dave", "dave-password").status_code == 401
    admin_ui.htmx("POST", "/admin/users/dave", data={"action": "enable"})
    assert UiClient(app).login("dave", "dave-password").status_code == 303

    promoted = admin_ui.htmx("POST", "/admin/users/dave", data={"action": "make-admin"})
    assert "site admin" in promoted.text
    assert "/admin/audit" in sign_in(app, "dave", "dave-password").page("/projects")
    bad = admin_ui.htmx("POST", "/admin/users/dave", data={"action": "delete-everything"})
    assert bad.status_code == 422
    self_disable = admin_ui.htmx("POST", "/admin/users/root-admin", data={"action": "disable"})
    assert self_disable.status_code == 403


def test_non_admin_cannot_use_admin_actions(app: FastAPI, alice: Account, bob: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    response = ui.htmx("POST", "/admin/users", data={"username": "x1", "password": "p" * 10})
    assert response.status_code == 403
    response = ui.htmx("POST", "/admin/users/bob", data={"action": "disable"})
    assert response.status_code == 403
    assert sign_in(app, bob.username, bob.password)


def test_teams_page_empty_state_and_creation(app: FastAPI, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    assert "You are not in a team yet" in ui.page("/admin/teams")
    card = ui.htmx("POST", "/admin/teams", data={"name": "vision", "description": "CV folks"})
    assert card.status_code == 200
    assert 'id="teams-empty" hx-swap-oob="delete"' in card.text
    assert "maintainer" in card.text
    # The new card says what happened and what to do next.
    assert 'role="status">Team vision created; you are its maintainer.' in card.text
    page = ui.page("/admin/teams")
    assert "not in a team" not in page and "<h1>Your teams</h1>" in page
    assert "CV folks" in page
    dup = ui.htmx("POST", "/admin/teams", data={"name": "vision"})
    assert dup.status_code == 409
    clash = ui.htmx("POST", "/admin/teams", data={"name": "alice"})  # one namespace
    assert clash.status_code == 409


def test_audit_log_pages_and_filters(app: FastAPI, admin_ui: UiClient, alice: Account) -> None:
    for _ in range(3):
        UiClient(app).login(alice.username, "wrong-password")
    for i in range(55):
        admin_ui.htmx("POST", "/account/keys", data={"name": f"k{i}"})
    first = admin_ui.page("/admin/audit")
    assert first.count("<tr>") == 1 + 50  # header + a page of 50
    assert "Older events" in first
    older = first.split('href="/admin/audit?')[-1].split('"')[0].replace("&amp;", "&")
    second = admin_ui.page(f"/admin/audit?{older}")
    assert "Newest" in second
    assert "auth.login" in second  # the earliest events are on the second page
    failures = admin_ui.page("/admin/audit?action=auth.login&actor=alice")
    assert failures.count("badge-failure") == 3
    assert "apikey.create" not in failures
    nothing = admin_ui.page("/admin/audit?action=no.such.action")
    assert "No events match this filter" in nothing


def test_users_see_only_their_own_teams_and_admins_see_all(
    app: FastAPI, admin_ui: UiClient, alice: Account, bob: Account, engine: Engine
) -> None:
    """/admin/teams lists a user's own teams; another team and its members stay hidden (404
    for its card actions, as for a private project); a site admin sees every team."""
    alice_ui = sign_in(app, alice.username, alice.password)
    bob_ui = sign_in(app, bob.username, bob.password)
    assert alice_ui.htmx("POST", "/admin/teams", data={"name": "secret-lab"}).status_code == 200
    assert bob_ui.htmx("POST", "/admin/teams", data={"name": "bobs-team"}).status_code == 200
    with make_sessionmaker(engine)() as db:
        db.scalars(select(User).where(User.username == "alice")).one().full_name = "Alice Liddell"
        db.commit()
    added = alice_ui.htmx(
        "POST", "/admin/teams/secret-lab/members", data={"username": "root-admin"}
    )
    assert "root-admin is now a member of secret-lab." in added.text
    assert "Alice Liddell" in added.text  # members by their full names, usernames beside

    bob_page = bob_ui.page("/admin/teams")
    assert "bobs-team" in bob_page and "secret-lab" not in bob_page and "alice" not in bob_page
    # bob cannot add himself to alice's team or even learn that it exists.
    sneak = bob_ui.htmx("POST", "/admin/teams/secret-lab/members", data={"username": "bob"})
    assert sneak.status_code == 404
    gone = bob_ui.htmx("DELETE", "/admin/teams/secret-lab/members/alice")
    assert gone.status_code == 404

    admin_page = admin_ui.page("/admin/teams")
    assert "<h1>All teams</h1>" in admin_page
    assert "secret-lab" in admin_page and "bobs-team" in admin_page
