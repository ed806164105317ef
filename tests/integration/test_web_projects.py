"""Project pages of the UI: list and search, creation, overview, collaborators, environment,
settings — and that they show and allow exactly what the API would."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.models import User
from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in


def create(ui: UiClient, name: str, **fields: str) -> str:
    """Create a project through the UI form; returns the page it sends the browser to."""
    response = ui.htmx("POST", "/projects/new", data={"name": name, **fields})
    assert response.status_code == 204, response.text
    return response.headers["hx-redirect"]


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def test_empty_state_then_a_project_from_the_template(
    alice_ui: UiClient, client: TestClient, alice: Account, settings
) -> None:
    page = alice_ui.page("/projects")
    assert "No projects yet" in page
    assert "Create your first project" in page
    new_page = alice_ui.page("/projects/new")
    assert 'value="python-starter"' in new_page
    location = create(alice_ui, "Churn model", source="template", template="python-starter")
    assert location == "/p/alice/churn-model"
    overview = alice_ui.page(location)
    assert "Churn model" in overview
    ca = (settings.pki_dir / "ca.crt").resolve()
    assert (
        f"git clone -c http.sslCAInfo={ca} https://alice@testserver/git/alice/churn-model.git"
        in overview
    )
    assert "kiln projects clone alice/churn-model" in overview
    api = client.get("/api/v1/projects/alice/churn-model", headers=alice.headers)
    assert api.status_code == 200
    files = sorted(p.name for p in settings.projects_dir.glob("*/*") if p.name != ".git")
    assert {"main.py", "requirements.txt"} <= set(files)
    listing = alice_ui.page("/projects")
    assert "No projects yet" not in listing
    assert 'href="/p/alice/churn-model"' in listing


def test_creation_errors_are_precise(alice_ui: UiClient) -> None:
    create(alice_ui, "demo")
    duplicate = alice_ui.htmx("POST", "/projects/new", data={"name": "demo"})
    assert duplicate.status_code == 409
    assert duplicate.json()["detail"] == "project alice/demo already exists"
    blank = alice_ui.htmx("POST", "/projects/new", data={"name": "   "})
    assert blank.status_code == 422
    assert blank.json()["detail"] == "project name must not be empty"
    bad_template = alice_ui.htmx(
        "POST", "/projects/new", data={"name": "x", "source": "template", "template": "nope"}
    )
    assert bad_template.status_code == 422
    assert "unknown template" in bad_template.json()["detail"]
    bad_slug = alice_ui.htmx("POST", "/projects/new", data={"name": "y", "slug": "Not OK"})
    assert bad_slug.status_code == 422
    assert "project slug" in bad_slug.json()["detail"]
    foreign = alice_ui.htmx("POST", "/projects/new", data={"name": "z", "owner": "someone"})
    assert foreign.status_code == 403


def test_search_as_you_type_returns_only_the_list(alice_ui: UiClient) -> None:
    for name in ("Fraud detection", "Forecast", "Churn"):
        create(alice_ui, name)
    fragment = alice_ui.htmx("GET", "/projects", params={"q": "fo"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    assert "Forecast" in fragment.text
    assert "Churn" not in fragment.text
    assert "Fraud" not in fragment.text
    none = alice_ui.htmx("GET", "/projects", params={"q": "zzz"})
    assert "No projects match" in none.text
    assert "zzz" in none.text
    # The full page with ?q= (a reload, a shared link) shows the same filter.
    page = alice_ui.page("/projects?q=churn")
    assert 'value="churn"' in page
    assert "Forecast" not in page


def test_long_lists_page_with_show_more(alice_ui: UiClient) -> None:
    for i in range(32):
        create(alice_ui, f"p{i:02d}")
    page = alice_ui.page("/projects")
    assert page.count('class="card project-card"') == 30
    assert "Show more projects" in page
    cursor_url = page.split('hx-get="/projects?')[1].split('"')[0].replace("&amp;", "&")
    more = alice_ui.htmx("GET", f"/projects?{cursor_url}")
    assert more.text.count('class="card project-card"') == 2
    assert "Show more projects" not in more.text
    assert "No projects yet" not in more.text


def test_stranger_gets_a_404_page_for_a_private_project(
    app: FastAPI, alice_ui: UiClient, bob: Account
) -> None:
    create(alice_ui, "secret-plans")
    bob_ui = sign_in(app, bob.username, bob.password)
    for suffix in ("", "/collaborators", "/env", "/settings"):
        page = bob_ui.page(f"/p/alice/secret-plans{suffix}", status=404)
        assert "Not found" in page
        assert 'class="topbar"' in page  # a real page, still signed in
    missing = bob_ui.page("/p/alice/no-such-project", status=404)
    assert "Not found" in missing
    listing = bob_ui.page("/projects")
    assert "secret-plans" not in listing
    assert "No projects yet" in listing
    # Actions on it fail the same way: nothing reveals that it exists.
    response = bob_ui.htmx("POST", "/p/alice/secret-plans/env", data={"name": "A"})
    assert response.status_code == 404


def test_collaborators_share_a_project_with_their_role(
    app: FastAPI, alice_ui: UiClient, bob: Account
) -> None:
    create(alice_ui, "shared")
    response = alice_ui.htmx(
        "POST", "/p/alice/shared/collaborators", data={"username": "bob", "role": "viewer"}
    )
    assert response.status_code == 200
    assert "<html" not in response.text
    assert 'id="collaborators"' in response.text
    assert '<option value="viewer" selected>' in response.text
    # The change is confirmed where it was made.
    assert 'role="status">bob was added as viewer of this project.</div>' in response.text
    changed = alice_ui.htmx(
        "POST", "/p/alice/shared/collaborators", data={"username": "bob", "role": "viewer"}
    )
    assert "bob is now viewer of this project." in changed.text
    unknown = alice_ui.htmx(
        "POST", "/p/alice/shared/collaborators", data={"username": "nobody", "role": "viewer"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "user 'nobody' not found"
    bad_role = alice_ui.htmx(
        "POST", "/p/alice/shared/collaborators", data={"username": "bob", "role": "owner"}
    )
    assert bad_role.status_code == 422

    bob_ui = sign_in(app, bob.username, bob.password)
    overview = bob_ui.page("/p/alice/shared")
    assert 'title="Your role on this project">viewer<' in overview
    assert "/p/alice/shared/settings" not in overview  # no Settings tab for a viewer
    assert "Add collaborator" not in bob_ui.page("/p/alice/shared/collaborators")
    bob_ui.page("/p/alice/shared/settings", status=403)
    denied = bob_ui.htmx(
        "POST", "/p/alice/shared/collaborators", data={"username": "bob", "role": "admin"}
    )
    assert denied.status_code == 403
    assert "needs the admin role" in denied.json()["detail"]

    removed = alice_ui.htmx("DELETE", "/p/alice/shared/collaborators/bob")
    assert removed.status_code == 200
    assert "No collaborators yet" in removed.text and "bob was removed." in removed.text
    bob_ui.page("/p/alice/shared", status=404)


def test_secret_environment_values_are_never_shown(
    app: FastAPI, alice_ui: UiClient, bob: Account
) -> None:
    create(alice_ui, "envy")
    assert "No variables yet" in alice_ui.page("/p/alice/envy/env")
    secret = alice_ui.htmx(
        "POST",
        "/p/alice/envy/env",
        data={"name": "DB_PASSWORD", "value": "hunter2-very-secret", "secret": "true"},
    )
    assert secret.status_code == 200
    assert "DB_PASSWORD" in secret.text
    assert "hunter2-very-secret" not in secret.text
    plain = alice_ui.htmx("POST", "/p/alice/envy/env", data={"name": "MODE", "value": "fast"})
    assert "fast" in plain.text
    bad = alice_ui.htmx("POST", "/p/alice/envy/env", data={"name": "1BAD", "value": "x"})
    assert bad.status_code == 422
    assert "is not valid" in bad.json()["detail"]
    alice_ui.htmx("POST", "/p/alice/envy/collaborators", data={"username": "bob", "role": "viewer"})
    bob_page = sign_in(app, bob.username, bob.password).page("/p/alice/envy/env")
    page = alice_ui.page("/p/alice/envy/env")
    for html in (page, bob_page):
        assert "hunter2-very-secret" not in html
        assert "DB_PASSWORD" in html
    assert "Save variable" not in bob_page  # a viewer reads, an admin writes
    gone = alice_ui.htmx("DELETE", "/p/alice/envy/env/MODE")
    assert "MODE" not in gone.text


def test_settings_rename_and_visibility(app: FastAPI, alice_ui: UiClient, bob: Account) -> None:
    create(alice_ui, "old name")
    response = alice_ui.htmx(
        "POST",
        "/p/alice/old-name/settings",
        data={"name": "New name", "description": "What it does", "visibility": "public"},
    )
    assert response.status_code == 200
    assert "Saved." in response.text
    assert 'hx-swap-oob="true">New name</h1>' in response.text  # the page title follows
    page = alice_ui.page("/p/alice/old-name")
    assert "New name" in page
    assert "What it does" in page
    # Public: any signed-in user can view it.
    assert "New name" in sign_in(app, bob.username, bob.password).page("/p/alice/old-name")
    empty = alice_ui.htmx("POST", "/p/alice/old-name/settings", data={"name": ""})
    assert empty.status_code == 422


def test_delete_needs_the_full_name_typed(alice_ui: UiClient, settings) -> None:
    create(alice_ui, "doomed")
    wrong = alice_ui.htmx("POST", "/p/alice/doomed/delete", data={"confirm": "doomed"})
    assert wrong.status_code == 422
    assert "type alice/doomed to confirm" in wrong.json()["detail"]
    alice_ui.page("/p/alice/doomed")
    right = alice_ui.htmx("POST", "/p/alice/doomed/delete", data={"confirm": "alice/doomed"})
    assert right.status_code == 204
    assert right.headers["hx-redirect"] == "/projects"
    alice_ui.page("/p/alice/doomed", status=404)
    assert not [p for p in settings.projects_dir.iterdir() if not p.name.startswith(".")]


def test_team_owned_project(
    app: FastAPI, alice_ui: UiClient, make_user: Callable[..., Account]
) -> None:
    carol = make_user("carol")
    team = alice_ui.htmx("POST", "/admin/teams", data={"name": "ds", "description": "Data"})
    assert team.status_code == 200
    assert 'id="team-ds"' in team.text
    added = alice_ui.htmx(
        "POST", "/admin/teams/ds/members", data={"username": "carol", "role": "member"}
    )
    assert added.status_code == 200
    assert "carol" in added.text
    assert 'name="owner"' in alice_ui.page("/projects/new")
    assert '<option value="ds">' in alice_ui.page("/projects/new")
    assert create(alice_ui, "team work", owner="ds") == "/p/ds/team-work"
    carol_ui = sign_in(app, carol.username, carol.password)
    page = carol_ui.page("/p/ds/team-work")
    assert 'title="Your role on this project">contributor<' in page
    # carol is not a maintainer: she sees the team but cannot change it.
    teams = carol_ui.page("/admin/teams")
    assert 'id="team-ds"' in teams
    assert "/admin/teams/ds/members" not in teams
    denied = carol_ui.htmx(
        "POST", "/admin/teams/ds/members", data={"username": "carol", "role": "maintainer"}
    )
    assert denied.status_code == 403


def test_collaborators_are_listed_by_full_name(
    app: FastAPI, alice_ui: UiClient, bob: Account, engine: Engine
) -> None:
    create(alice_ui, "named")
    with make_sessionmaker(engine)() as db:
        db.scalars(select(User).where(User.username == "bob")).one().full_name = "Bob <Builder>"
        db.commit()
    added = alice_ui.htmx(
        "POST", "/p/alice/named/collaborators", data={"username": "bob", "role": "viewer"}
    )
    assert '<td>Bob &lt;Builder&gt; <span class="mono muted small">bob</span></td>' in added.text
