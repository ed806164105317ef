"""User-controlled text is shown as text on every UI page: never as markup."""

from __future__ import annotations

import markupsafe
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Account
from tests.integration.web_ui_client import sign_in

SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'
QUOTE_BREAK = "x' onmouseover='alert(3)"  # breaks out of single-quoted attributes


def _assert_escaped(page: str, raw: str, where: str) -> None:
    assert raw not in page, f"{where}: raw markup {raw!r} in the page"
    assert escaped(raw) in page, f"{where}: {raw!r} is not shown at all"


def escaped(raw: str) -> str:
    """As Jinja's autoescape writes it (markupsafe: &lt; &gt; &amp; &#34; &#39;)."""
    return str(markupsafe.escape(raw))


def test_a_script_project_name_is_escaped_on_every_page(
    app: FastAPI, client: TestClient, alice: Account, bob: Account
) -> None:
    created = client.post(
        "/api/v1/projects",
        json={"name": SCRIPT, "description": IMG, "visibility": "public"},
        headers=alice.headers,
    )
    assert created.status_code == 201
    slug = created.json()["slug"]
    client.put(
        f"/api/v1/projects/alice/{slug}/env/HTML",
        json={"value": QUOTE_BREAK},
        headers=alice.headers,
    )
    client.put(
        f"/api/v1/projects/alice/{slug}/collaborators/bob",
        json={"role": "viewer"},
        headers=alice.headers,
    )
    ui = sign_in(app, alice.username, alice.password)
    pages = {
        "list": ui.page("/projects"),
        "search": ui.htmx("GET", "/projects", params={"q": "script"}).text,
        "search page": ui.page("/projects?q=" + SCRIPT),
        "overview": ui.page(f"/p/alice/{slug}"),
        "collaborators": ui.page(f"/p/alice/{slug}/collaborators"),
        "env": ui.page(f"/p/alice/{slug}/env"),
        "settings": ui.page(f"/p/alice/{slug}/settings"),
        "bob's overview": sign_in(app, bob.username, bob.password).page(f"/p/alice/{slug}"),
    }
    for where, page in pages.items():
        if where != "search page":
            _assert_escaped(page, SCRIPT, where)
        assert "<script>alert" not in page, where
        assert "<img src=x" not in page, where
    _assert_escaped(pages["search page"], SCRIPT, "search box value")
    _assert_escaped(pages["overview"], IMG, "description")
    _assert_escaped(pages["settings"], IMG, "description textarea")
    assert QUOTE_BREAK not in pages["env"]
    assert escaped(QUOTE_BREAK) in pages["env"]
    # The settings form echoes the name inside an attribute value, quoted and escaped.
    assert f'value="{escaped(SCRIPT)}"' in pages["settings"]

    saved = ui.htmx(
        "POST", f"/p/alice/{slug}/settings", data={"name": SCRIPT + "2", "description": IMG}
    )
    _assert_escaped(saved.text, SCRIPT + "2", "saved settings fragment")


def test_user_and_team_text_is_escaped_on_admin_pages(
    app: FastAPI, client: TestClient, admin: Account
) -> None:
    client.post(
        "/api/v1/users",
        json={"username": "mallory", "password": "mallory-pass", "full_name": SCRIPT},
        headers=admin.headers,
    )
    client.post("/api/v1/teams", json={"name": "red", "description": IMG}, headers=admin.headers)
    client.post("/api/v1/auth/api-keys", json={"name": QUOTE_BREAK}, headers=admin.headers)
    client.post("/api/v1/projects", json={"name": SCRIPT}, headers=admin.headers)
    ui = sign_in(app, admin.username, admin.password)
    _assert_escaped(ui.page("/admin/users"), SCRIPT, "users")
    _assert_escaped(ui.page("/admin/teams"), IMG, "teams")
    account = ui.page("/account")
    assert QUOTE_BREAK not in account
    assert escaped(QUOTE_BREAK) in account
    audit = ui.page("/admin/audit")
    assert "<script>alert" not in audit
    # A failed login with markup as the username lands in the audit log as text too.
    ui.http.post("/login", data={"username": SCRIPT, "password": "whatever-pass"})
    _assert_escaped(ui.page("/admin/audit?action=auth.login"), SCRIPT, "audit actor")


def test_error_pages_escape_what_the_url_said(app: FastAPI, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    page = ui.page("/p/%3Cimg%20src%3Dx%20onerror%3D%22alert(2)%22%3E/demo", status=404)
    _assert_escaped(page, IMG, "404 page for a project")
    page = ui.page("/p/alice/demo/%3Cscript%3Ealert(1)%3C%2Fscript%3E", status=404)
    _assert_escaped(page, SCRIPT, "404 page for an unknown page")
