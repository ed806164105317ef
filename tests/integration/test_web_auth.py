"""UI sign-in, sign-out and the account page, through the same requests a browser makes."""

from __future__ import annotations

from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Account
from tests.integration.web_ui_client import BASE, UiClient, csrf_of, sign_in

SESSION_COOKIE = "__Host-kiln_session"


@pytest.mark.parametrize(
    "path",
    ["/projects", "/projects/new", "/account", "/admin/users", "/admin/audit", "/p/a/b"],
)
def test_pages_need_sign_in_and_come_back_after(app, alice: Account, path: str) -> None:
    ui = UiClient(app)
    response = ui.http.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=" + path.replace("/", "%2F")
    response = ui.http.post(
        "/login", data={"username": alice.username, "password": alice.password, "next": path}
    )
    assert response.status_code == 303
    assert response.headers["location"] == path


def test_root_goes_to_login_or_projects(app, alice: Account) -> None:
    ui = UiClient(app)
    assert ui.http.get("/").headers["location"] == "/login"
    ui.login(alice.username, alice.password)
    assert ui.http.get("/").headers["location"] == "/projects"
    assert ui.http.get("/login").headers["location"] == "/projects"  # already signed in


def test_login_sets_a_host_only_secure_httponly_samesite_cookie(app, alice: Account) -> None:
    ui = UiClient(app)
    response = ui.login(alice.username, alice.password)
    assert response.status_code == 303
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    morsel = cookie[SESSION_COOKIE]
    assert morsel.value
    assert morsel["secure"] is True
    assert morsel["httponly"] is True
    assert morsel["samesite"].lower() in ("lax", "strict")
    assert morsel["path"] == "/"
    assert not morsel["domain"]  # host-only
    # The page carries the session's CSRF token for htmx.
    assert csrf_of(ui.page("/projects"))


def test_login_with_htmx_redirects_with_hx_redirect(app, alice: Account) -> None:
    ui = UiClient(app)
    response = ui.htmx(
        "POST",
        "/login",
        data={"username": alice.username, "password": alice.password, "next": "/account"},
    )
    assert response.status_code == 204
    assert response.headers["hx-redirect"] == "/account"
    assert SESSION_COOKIE in response.cookies


def test_wrong_password_is_shown_in_the_form(app, alice: Account) -> None:
    ui = UiClient(app)
    data = {"username": alice.username, "password": "wrong-password"}
    response = ui.htmx("POST", "/login", data=data)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "wrong username or password"
    assert "hx-redirect" not in response.headers
    # Without JavaScript, the form comes back with the reason in it.
    response = ui.http.post("/login", data=data)
    assert response.status_code == 401
    assert 'class="form-error"' in response.text
    assert "wrong username or password" in response.text
    assert SESSION_COOKIE not in response.cookies


def test_repeated_failed_logins_are_slowed_down(app, alice: Account) -> None:
    ui = UiClient(app)
    data = {"username": alice.username, "password": "nope-nope"}
    statuses = [ui.htmx("POST", "/login", data=data).status_code for _ in range(6)]
    assert statuses[:3] == [401, 401, 401]
    assert 429 in statuses
    response = ui.htmx("POST", "/login", data={**data, "password": alice.password})
    assert response.status_code == 429  # even the right password waits
    assert int(response.headers["retry-after"]) >= 1
    assert "too many failed logins" in response.json()["detail"]


@pytest.mark.parametrize(
    "next_value",
    ["https://evil.example/x", "//evil.example/x", "/\\evil.example", "javascript:alert(1)", ""],
)
def test_next_only_goes_to_a_local_path(app, alice: Account, next_value: str) -> None:
    ui = UiClient(app)
    data = {"username": alice.username, "password": alice.password, "next": next_value}
    response = ui.http.post("/login", data=data)
    assert response.headers["location"] == "/projects"
    page = ui.http.get("/login", params={"next": next_value})  # signed in: redirected
    assert page.headers["location"] == "/projects"


def test_login_from_a_foreign_origin_is_refused(app, alice: Account) -> None:
    ui = UiClient(app)
    response = ui.htmx(
        "POST",
        "/login",
        data={"username": alice.username, "password": alice.password},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert SESSION_COOKIE not in response.cookies


def test_logout_ends_the_session_on_the_server(app, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    token = ui.http.cookies[SESSION_COOKIE]
    response = ui.htmx("POST", "/logout")
    assert response.status_code == 204
    assert response.headers["hx-redirect"] == "/login"
    assert SESSION_COOKIE not in ui.http.cookies  # the browser is told to forget it
    # Someone who kept a copy of the cookie gets nothing.
    replay = TestClient(app, base_url=BASE, follow_redirects=False)
    replay.cookies.set(SESSION_COOKIE, token)
    assert replay.get("/projects").status_code == 303
    assert replay.get("/api/v1/auth/me").status_code == 401


def test_signing_in_again_rotates_the_session(app, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    first = ui.http.cookies[SESSION_COOKIE]
    ui.login(alice.username, alice.password)
    assert ui.http.cookies[SESSION_COOKIE] != first
    replay = TestClient(app, base_url=BASE, follow_redirects=False)
    replay.cookies.set(SESSION_COOKIE, first)
    assert replay.get("/projects").status_code == 303


def test_an_expired_session_in_an_htmx_request_sends_the_browser_to_login(
    app, alice: Account
) -> None:
    ui = sign_in(app, alice.username, alice.password)
    ui.http.cookies.set(SESSION_COOKIE, "not-a-session")
    response = ui.htmx("POST", "/account/keys", data={"name": "x"})
    assert response.status_code == 401
    assert response.headers["hx-redirect"] == "/login?next=%2Fprojects"


# ---- account page -------------------------------------------------------------------------


def test_api_key_is_shown_once_and_works_until_revoked(app, client, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    response = ui.htmx(
        "POST", "/account/keys", data={"name": "ci-runner-key", "expires_at": "2999-12-31"}
    )
    assert response.status_code == 200
    assert "Copy your new key now" in response.text
    key = response.text.split('id="new-key">')[1].split("<")[0]
    assert key.startswith("kiln_")
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {key}"})
    assert me.json()["username"] == alice.username
    page = ui.page("/account")
    assert key not in page  # never again
    assert key[:11] in page  # its prefix identifies it
    assert "2999-12-31 23:59 UTC" in page
    key_id = next(
        k["id"]
        for k in client.get("/api/v1/auth/api-keys", headers=alice.headers).json()
        if k["name"] == "ci-runner-key"
    )
    response = ui.htmx("DELETE", f"/account/keys/{key_id}")
    assert response.status_code == 200
    assert "ci-runner-key" not in response.text
    revoked = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {key}"})
    assert revoked.status_code == 401


def test_bad_key_expiry_is_explained(app, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    response = ui.htmx("POST", "/account/keys", data={"expires_at": "2001-01-01"})
    assert response.status_code == 422
    assert response.json()["detail"] == "expires_at must be in the future"
    response = ui.htmx("POST", "/account/keys", data={"expires_at": "tomorrow"})
    assert response.status_code == 422
    assert "2030-01-31" in response.json()["detail"]


def test_change_password(app, alice: Account) -> None:
    ui = sign_in(app, alice.username, alice.password)
    wrong = ui.htmx(
        "POST",
        "/account/password",
        data={"current": "not-it-at-all", "new": "a-new-password", "confirm": "a-new-password"},
    )
    assert wrong.status_code == 403
    assert wrong.json()["detail"] == "the current password is missing or wrong"
    mismatch = ui.htmx(
        "POST",
        "/account/password",
        data={"current": alice.password, "new": "a-new-password", "confirm": "another-one"},
    )
    assert mismatch.status_code == 422
    short = ui.htmx(
        "POST",
        "/account/password",
        data={"current": alice.password, "new": "short", "confirm": "short"},
    )
    assert short.status_code == 422
    assert "8 characters" in short.json()["detail"]
    ok = ui.htmx(
        "POST",
        "/account/password",
        data={"current": alice.password, "new": "a-new-password", "confirm": "a-new-password"},
    )
    assert ok.status_code == 200
    assert "password was changed" in ok.text
    assert UiClient(app).login(alice.username, alice.password).status_code == 401
    assert UiClient(app).login(alice.username, "a-new-password").status_code == 303
