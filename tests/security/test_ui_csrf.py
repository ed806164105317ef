"""CSRF on the UI: a cookie-authenticated state change needs the session's X-CSRF-Token
header and no foreign Origin; otherwise 403 and nothing changes."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in

# (method, path, form) for every kind of state-changing UI request.
UI_WRITES = [
    ("POST", "/projects/new", {"name": "csrf-made"}),
    ("POST", "/p/alice/target/collaborators", {"username": "bob", "role": "admin"}),
    ("DELETE", "/p/alice/target/collaborators/bob", {}),
    ("POST", "/p/alice/target/env", {"name": "EVIL", "value": "1"}),
    ("DELETE", "/p/alice/target/env/KEEP", {}),
    ("POST", "/p/alice/target/settings", {"name": "pwned", "visibility": "public"}),
    ("POST", "/p/alice/target/delete", {"confirm": "alice/target"}),
    ("POST", "/account/keys", {"name": "stolen"}),
    ("POST", "/account/password", {"current": "x", "new": "pwned-pass", "confirm": "pwned-pass"}),
    ("POST", "/admin/teams", {"name": "evil-team"}),
    ("POST", "/logout", {}),
]


@pytest.fixture
def victim(app: FastAPI, alice: Account, bob: Account, client: TestClient) -> UiClient:
    client.post("/api/v1/projects", json={"name": "target"}, headers=alice.headers)
    client.put(
        "/api/v1/projects/alice/target/collaborators/bob",
        json={"role": "viewer"},
        headers=alice.headers,
    )
    client.put("/api/v1/projects/alice/target/env/KEEP", json={"value": "1"}, headers=alice.headers)
    return sign_in(app, alice.username, alice.password)


def _state(client: TestClient, alice: Account) -> tuple[object, ...]:
    project = client.get("/api/v1/projects/alice/target", headers=alice.headers).json()
    return (
        project.get("name"),
        project.get("visibility"),
        client.get("/api/v1/projects/alice/target/collaborators", headers=alice.headers).json(),
        client.get("/api/v1/projects/alice/target/env", headers=alice.headers).json(),
        len(client.get("/api/v1/auth/api-keys", headers=alice.headers).json()),
        client.get("/api/v1/projects", headers=alice.headers).json()["items"].__len__(),
        client.get("/api/v1/teams", headers=alice.headers).json()["items"],
    )


@pytest.mark.parametrize(("method", "path", "form"), UI_WRITES)
def test_cookie_write_without_the_csrf_token_is_refused(
    victim: UiClient, client: TestClient, alice: Account, method: str, path: str, form: dict
) -> None:
    before = _state(client, alice)
    # A forged cross-site form post: the cookie rides along, the header cannot.
    response = victim.http.request(method, path, data=form or None)
    assert response.status_code == 403, response.text
    assert "CSRF" in response.json()["detail"]
    wrong = victim.htmx(method, path, data=form or None, headers={"X-CSRF-Token": "guess"})
    assert wrong.status_code == 403
    assert _state(client, alice) == before
    assert victim.http.get("/projects").status_code == 200  # still signed in


@pytest.mark.parametrize(("method", "path", "form"), UI_WRITES)
def test_cookie_write_from_a_foreign_origin_is_refused(
    victim: UiClient, client: TestClient, alice: Account, method: str, path: str, form: dict
) -> None:
    before = _state(client, alice)
    response = victim.htmx(
        method, path, data=form or None, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403, response.text
    assert "cross-origin" in response.json()["detail"]
    assert _state(client, alice) == before


def test_the_same_request_with_token_and_own_origin_succeeds(
    victim: UiClient, client: TestClient, alice: Account
) -> None:
    """The control: the refusals above are about CSRF, not about the requests themselves."""
    response = victim.htmx(
        "POST",
        "/p/alice/target/settings",
        data={"name": "renamed", "visibility": "private"},
        headers={"Origin": "https://testserver"},
    )
    assert response.status_code == 200
    assert client.get("/api/v1/projects/alice/target", headers=alice.headers).json()["name"] == (
        "renamed"
    )


def test_ui_pages_forbid_framing_and_foreign_scripts(victim: UiClient) -> None:
    response = victim.http.get("/projects")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
