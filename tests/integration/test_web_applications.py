"""The applications pages' forms, as htmx posts them: create, edit (the form filled in with
what is saved), bad input shown as problem+json with the field and nothing written, the
CSRF token required, and viewers who see the page but get no form. The runner is not needed:
what the forms write is what is checked."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)

FORM: dict[str, Any] = {
    "name": "sales",
    "subdomain": "sales",
    "script": "app.py",
    "description": "numbers",
    "runtime": "",
    "profile": "",
    "env": "MODE=demo\n",
}


@pytest.fixture
def project(client: TestClient, alice: Account) -> tuple[str, str]:
    """alice's project with app.py in it: (API path, UI path)."""
    api = make_project(client, alice)
    written = client.put(f"{api}/files/app.py", content=b"print(1)\n", headers=alice.headers)
    assert written.status_code in (200, 201), written.text
    return api, api.replace("/api/v1/projects", "/p")


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def test_create_then_edit_through_the_forms(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    assert "New application" in alice_ui.page(f"{page}/applications/new")
    created = alice_ui.htmx("POST", f"{page}/applications/new", data=FORM | {"public": "true"})
    assert created.status_code == 204, created.text
    assert created.headers["hx-redirect"] == f"{page}/applications/sales"
    app = client.get(f"{api}/applications/sales", headers=alice.headers).json()
    assert (app["subdomain"], app["script"], app["description"]) == ("sales", "app.py", "numbers")
    assert app["env"] == {"MODE": "demo"} and app["public"] is True

    edit = alice_ui.page(f"{page}/applications/sales/edit")
    assert 'value="sales"' in edit and "MODE=demo" in edit and "checked" in edit
    # Unticked, the box is not posted: the app is no longer public.
    changed = alice_ui.htmx(
        "POST", f"{page}/applications/sales/edit", data=FORM | {"env": "MODE=live\n"}
    )
    assert changed.status_code == 204, changed.text
    app = client.get(f"{api}/applications/sales", headers=alice.headers).json()
    assert app["env"] == {"MODE": "live"} and app["public"] is False


def test_bad_input_is_shown_and_nothing_is_written(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    cases = {
        "subdomain": ("www", "reserved for Kiln"),
        "script": ("missing.py", "does not exist in the project"),
        "env": ("NOEQUALS", "NAME=VALUE"),
        "name": ("", "must not be empty"),
        "profile": ("huge", "no resource profile named 'huge'"),
    }
    for field, (value, message) in cases.items():
        response = alice_ui.htmx("POST", f"{page}/applications/new", data=FORM | {field: value})
        assert 400 <= response.status_code < 500, (field, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert message in response.json()["detail"], (field, response.json())
    too_long = alice_ui.htmx("POST", f"{page}/applications/new", data=FORM | {"name": "n" * 3000})
    assert too_long.status_code == 422, too_long.text
    assert client.get(f"{api}/applications", headers=alice.headers).json() == []
    assert 'class="form-error"' in alice_ui.page(f"{page}/applications/new")


def test_the_csrf_token_is_required(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    forged = alice_ui.htmx(
        "POST", f"{page}/applications/new", data=FORM, headers={"X-CSRF-Token": "wrong"}
    )
    assert forged.status_code == 403
    assert alice_ui.http.post(f"{page}/applications/new", data=FORM).status_code == 403
    assert client.get(f"{api}/applications", headers=alice.headers).json() == []


def test_viewers_see_the_application_but_not_the_forms(
    app: FastAPI,
    alice_ui: UiClient,
    client: TestClient,
    alice: Account,
    bob: Account,
    project: tuple[str, str],
) -> None:
    api, page = project
    assert alice_ui.htmx("POST", f"{page}/applications/new", data=FORM).status_code == 204
    share(client, api, alice, bob, "viewer")
    bob_ui = sign_in(app, bob.username, bob.password)
    assert "sales" in bob_ui.page(f"{page}/applications/sales")
    bob_ui.page(f"{page}/applications/new", status=403)
    edited = bob_ui.htmx("POST", f"{page}/applications/sales/edit", data=FORM | {"env": ""})
    assert edited.status_code == 403
    stopped = bob_ui.htmx("POST", f"{page}/applications/sales/stop")
    assert stopped.status_code == 403
    app_now = client.get(f"{api}/applications/sales", headers=alice.headers).json()
    assert app_now["env"] == {"MODE": "demo"} and app_now["desired"] == "running"
