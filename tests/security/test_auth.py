"""Browser sessions, CSRF, API keys, login throttling: the ways in, and how they close."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text, update

from kiln.api.deps import SESSION_COOKIE
from kiln.db.models import ApiKey, AuditEvent, User, WebSession
from tests.conftest import PASSWORD, Account

ME = "/api/v1/auth/me"
KEYS = "/api/v1/auth/api-keys"


def login(client: TestClient, username: str, password: str = PASSWORD, **kw: object) -> str:
    """Log in; return the CSRF token. The cookie stays in the client's jar."""
    r = client.post("/api/v1/auth/login", json={"username": username, "password": password}, **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return str(r.json()["csrf_token"])


def session_cookie(client: TestClient) -> str:
    value = client.cookies.get(SESSION_COOKIE)
    assert value
    return value


def with_cookie(client: TestClient, token: str) -> None:
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, token, domain="testserver.local")  # as the jar files it


def basic(username: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    }


def audit_rows(engine: Engine, action: str) -> list[AuditEvent]:
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).where(AuditEvent.action == action))
        return list(rows)  # type: ignore[arg-type]


# ---- browser sessions ---------------------------------------------------------------------


def test_login_cookie_is_host_only_secure_httponly_lax(client: TestClient, alice: Account) -> None:
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200
    raw = r.headers["set-cookie"]
    morsel = SimpleCookie(raw)[SESSION_COOKIE]
    assert morsel["secure"] is True and morsel["httponly"] is True
    assert morsel["samesite"].lower() == "lax"
    assert morsel["path"] == "/"
    assert not morsel["domain"], "a __Host- cookie must be host-only"
    assert r.json()["user"]["username"] == "alice" and r.json()["csrf_token"]
    assert client.get(ME).json()["username"] == "alice"


def test_wrong_password_and_unknown_user_look_the_same(client: TestClient, alice: Account) -> None:
    a = client.post("/api/v1/auth/login", json={"username": "alice", "password": "wrong-pass"})
    b = client.post("/api/v1/auth/login", json={"username": "nobody", "password": "wrong-pass"})
    assert a.status_code == b.status_code == 401
    assert a.json()["detail"] == b.json()["detail"]
    assert SESSION_COOKIE not in a.headers.get("set-cookie", "")


def test_login_rotates_the_session(client: TestClient, alice: Account, engine: Engine) -> None:
    login(client, "alice")
    first = session_cookie(client)
    login(client, "alice")  # sends the first cookie along
    second = session_cookie(client)
    assert first != second
    with_cookie(client, first)
    assert client.get(ME).status_code == 401
    with_cookie(client, second)
    assert client.get(ME).status_code == 200
    with engine.connect() as conn:
        hashes = list(conn.scalars(select(WebSession.token_hash)))
    assert hashes == [hashlib.sha256(second.encode()).hexdigest()], "only hashes are stored"


def test_logout_kills_the_session_on_the_server(client: TestClient, alice: Account) -> None:
    csrf = login(client, "alice")
    token = session_cookie(client)
    r = client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204
    with_cookie(client, token)  # a client that ignores the deletion keeps its copy
    assert client.get(ME).status_code == 401


def test_login_from_a_foreign_origin_is_refused(client: TestClient, alice: Account) -> None:
    """Login CSRF: another site must not sign the browser into the attacker's account."""
    r = client.post(
        "/api/v1/auth/login",
        json={"username": "alice", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert SESSION_COOKIE not in r.headers.get("set-cookie", "")
    login(client, "alice", headers={"Origin": "https://testserver"})


# ---- CSRF ---------------------------------------------------------------------------------


def test_cookie_requests_that_change_state_need_the_csrf_token(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    csrf = login(client, "alice")
    body = {"name": "demo"}
    refused = [
        client.post("/api/v1/projects", json=body),
        client.post("/api/v1/projects", json=body, headers={"X-CSRF-Token": "forged"}),
        client.post(
            "/api/v1/projects",
            json=body,
            headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        ),
        client.post(
            "/api/v1/projects", json=body, headers={"X-CSRF-Token": csrf, "Origin": "null"}
        ),
        client.post(KEYS, json={}),
        client.post("/api/v1/auth/logout"),
    ]
    for r in refused:
        assert r.status_code == 403, r.text
        assert r.headers["content-type"] == "application/problem+json"
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM projects")) == 0
    assert client.get(ME).status_code == 200, "reads need no token"
    ok = client.post(
        "/api/v1/projects",
        json=body,
        headers={"X-CSRF-Token": csrf, "Origin": "https://testserver"},
    )
    assert ok.status_code == 201, ok.text


def test_bearer_requests_need_no_csrf_token(client: TestClient, alice: Account) -> None:
    """A foreign site cannot attach an Authorization header, so there is nothing to forge."""
    r = client.post(
        "/api/v1/projects",
        json={"name": "demo"},
        headers={**alice.headers, "Origin": "https://elsewhere.example"},
    )
    assert r.status_code == 201, r.text


# ---- API keys -----------------------------------------------------------------------------


def test_api_key_lifecycle(client: TestClient, alice: Account, engine: Engine) -> None:
    r = client.post(KEYS, json={"name": "laptop"}, headers=basic("alice", PASSWORD))
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("kiln_") and len(key) > 40
    assert created["prefix"] == key[: len(created["prefix"])]
    bearer = {"Authorization": f"Bearer {key}"}

    # Stored as a hash only: no column of any key row holds the key.
    with engine.connect() as conn:
        rows = [tuple(str(v) for v in row) for row in conn.execute(text("SELECT * FROM api_keys"))]
    assert rows and not any(key in value for row in rows for value in row)
    with engine.connect() as conn:
        stored = conn.scalar(select(ApiKey.key_hash).where(ApiKey.id == created["id"]))
    assert stored == hashlib.sha256(key.encode()).hexdigest()

    assert client.get(ME, headers=bearer).json()["username"] == "alice"
    listed = client.get(KEYS, headers=bearer).json()
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "key" not in mine and mine["name"] == "laptop"
    assert mine["last_used_at"] is not None, "a use is recorded"

    r = client.delete(f"{KEYS}/{created['id']}", headers=alice.headers)
    assert r.status_code == 204
    assert client.get(ME, headers=bearer).status_code == 401
    assert created["id"] not in [k["id"] for k in client.get(KEYS, headers=alice.headers).json()]
    assert client.delete(f"{KEYS}/{created['id']}", headers=alice.headers).status_code == 404


def test_last_use_is_recorded_for_every_new_key(
    client: TestClient, make_user: Callable[..., Account]
) -> None:
    """Key ids repeat across databases and tests; the record must not depend on process memory."""
    for name in ("carol", "dave"):
        account = make_user(name)
        client.get(ME, headers=account.headers)
        keys = client.get(KEYS, headers=account.headers).json()
        assert keys[0]["last_used_at"] is not None, name


def test_a_key_is_only_created_with_valid_credentials(client: TestClient, alice: Account) -> None:
    assert client.post(KEYS, headers=basic("alice", "wrong-pass")).status_code == 401
    assert client.post(KEYS, headers=basic("nobody", PASSWORD)).status_code == 401
    assert client.post(KEYS).status_code == 401
    assert client.post(KEYS, headers={"Authorization": "Basic !!!"}).status_code == 401
    # The password works for creating a key and nowhere else.
    assert client.get(ME, headers=basic("alice", PASSWORD)).status_code == 401
    csrf = login(client, "alice")
    r = client.post(KEYS, json={"name": "from the browser"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201


def test_expired_keys_stop_working(client: TestClient, alice: Account, engine: Engine) -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = client.post(KEYS, json={"expires_at": soon}, headers=alice.headers)
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["id"]
    bearer = {"Authorization": f"Bearer {key}"}
    assert client.get(ME, headers=bearer).status_code == 200
    with engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(seconds=1)
        conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(expires_at=past))
    r = client.get(ME, headers=bearer)
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_keys_are_per_user(client: TestClient, alice: Account, bob: Account) -> None:
    bob_keys = client.get(KEYS, headers=bob.headers).json()
    assert client.delete(f"{KEYS}/{bob_keys[0]['id']}", headers=alice.headers).status_code == 404
    assert client.get(ME, headers=bob.headers).status_code == 200
    # A key sent as a Basic password must belong to the user named there.
    assert client.get(ME, headers=basic("bob", alice.key)).status_code == 401
    assert client.get(ME, headers=basic("alice", alice.key)).status_code == 200


def test_a_disabled_account_is_locked_out_everywhere(
    client: TestClient, admin: Account, bob: Account
) -> None:
    csrf = login(client, "bob")
    assert client.get(ME).status_code == 200
    cookie = session_cookie(client)
    client.cookies.clear()
    r = client.patch("/api/v1/users/bob", json={"is_active": False}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["is_active"] is False
    assert client.get(ME, headers=bob.headers).status_code == 401
    assert client.get(ME, headers=basic("bob", bob.key)).status_code == 401
    with_cookie(client, cookie)
    assert client.get(ME).status_code == 401
    assert client.post(KEYS, headers={"X-CSRF-Token": csrf}).status_code == 401
    client.cookies.clear()
    r = client.post("/api/v1/auth/login", json={"username": "bob", "password": PASSWORD})
    assert r.status_code == 401
    assert client.post(KEYS, headers=basic("bob", PASSWORD)).status_code == 401
    # Re-enabled, the old key works again (disabling is not revoking).
    client.patch("/api/v1/users/bob", json={"is_active": True}, headers=admin.headers)
    assert client.get(ME, headers=bob.headers).status_code == 200


def test_passwords_are_stored_as_argon2id(alice: Account, engine: Engine) -> None:
    with engine.connect() as conn:
        stored = conn.scalar(select(User.password_hash).where(User.username == "alice"))
    assert stored and stored.startswith("$argon2id$") and PASSWORD not in stored


# ---- throttling ---------------------------------------------------------------------------


@pytest.mark.slow
def test_repeated_failed_logins_are_slowed_and_audited(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    for _ in range(3):
        r = client.post("/api/v1/auth/login", json={"username": "alice", "password": "nope-nope"})
        assert r.status_code == 401
    r = client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 429, "even the right password waits"
    assert r.headers["content-type"] == "application/problem+json"
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 300
    # Creating a key with the password is a login too.
    assert client.post(KEYS, headers=basic("alice", PASSWORD)).status_code == 429
    failures = audit_rows(engine, "auth.login")
    outcomes = sorted(e.outcome for e in failures)
    assert outcomes.count("failure") == 3 and outcomes.count("throttled") == 2
    assert all(e.actor_name == "alice" and e.address for e in failures)

    time.sleep(retry_after + 0.1)
    login(client, "alice")
