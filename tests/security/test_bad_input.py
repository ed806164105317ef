"""Bad input to every identity, project and admin endpoint: a precise 4xx, never a 500,
never a partial write.

Each case is one line of ``CASES``: who calls, what, the status wanted and a word the
``detail`` must contain (so the message says what is wrong, not just "bad request").
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.app import create_app
from kiln.db.models import Base
from kiln.settings import Settings
from tests.conftest import PASSWORD, Account

P = "/api/v1/projects/alice/demo"


@dataclass(frozen=True)
class Case:
    method: str
    url: str
    status: int
    says: str  # a word the problem's detail must contain (case-insensitive)
    json: Any = None
    content: bytes | None = None
    as_user: str = "alice"  # alice owns alice/demo and maintains team lab; "admin" is site admin
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        body = self.json if self.content is None else self.content[:40]
        return f"{self.method} {self.url} {body!r}"


def cursor(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


LONG = "x" * 101
CASES = [
    # -- wrong types, missing fields, not JSON
    Case("POST", "/api/v1/projects", 422, "name", json={}),
    Case("POST", "/api/v1/projects", 422, "name", json={"name": 5}),
    Case("POST", "/api/v1/projects", 422, "name", json={"name": ["a"]}),
    Case("POST", "/api/v1/projects", 422, "visibility", json={"name": "x", "visibility": "secret"}),
    Case("POST", "/api/v1/projects", 422, "body", json=["name", "x"]),
    Case(
        "POST",
        "/api/v1/projects",
        422,
        "json",
        content=b'{"name": ',
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "POST",
        "/api/v1/projects",
        422,
        "body",
        content=b"name=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("PATCH", P, 422, "visibility", json={"visibility": 1}),
    Case("PATCH", P, 422, "name", json={"name": ""}),
    Case("PUT", f"{P}/collaborators/bob", 422, "role", json={}),
    Case("PUT", f"{P}/collaborators/bob", 422, "role", json={"role": "owner"}),
    Case("PUT", f"{P}/env/FOO", 422, "value", json={}),
    Case("PUT", f"{P}/env/FOO", 422, "value", json={"value": 1}),
    Case("PUT", f"{P}/env/FOO", 422, "secret", json={"value": "1", "secret": "maybe"}),
    Case("POST", "/api/v1/auth/login", 422, "password", json={"username": "alice"}),
    Case("POST", "/api/v1/auth/api-keys", 422, "expires_at", json={"expires_at": "soon"}),
    Case("POST", "/api/v1/users", 422, "password", json={"username": "zed"}, as_user="admin"),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "is_site_admin",
        json={"username": "zed", "password": PASSWORD, "is_site_admin": "yes please"},
        as_user="admin",
    ),
    Case(
        "PATCH", "/api/v1/users/alice", 422, "is_active", json={"is_active": "no"}, as_user="admin"
    ),
    Case("POST", "/api/v1/teams", 422, "name", json={"description": "x"}),
    Case("PUT", "/api/v1/teams/lab/members/bob", 422, "role", json={"role": "boss"}),
    # -- too long
    Case("POST", "/api/v1/projects", 422, "name", json={"name": LONG}),
    Case(
        "POST",
        "/api/v1/projects",
        422,
        "description",
        json={"name": "x", "description": "d" * 2001},
    ),
    Case("PUT", f"{P}/env/FOO", 422, "value", json={"value": "v" * (32 * 1024 + 1)}),
    Case("POST", "/api/v1/auth/api-keys", 422, "name", json={"name": LONG}),
    # -- names that cannot be URLs, variables or owners
    Case("POST", "/api/v1/projects", 422, "slug", json={"name": "x", "slug": "Bad Slug"}),
    Case("POST", "/api/v1/projects", 422, "slug", json={"name": "x", "slug": "-x"}),
    Case("POST", "/api/v1/projects", 422, "slug", json={"name": "x", "slug": "a..b"}),
    Case("POST", "/api/v1/projects", 422, "slug", json={"name": "x", "slug": "x.git"}),
    Case("POST", "/api/v1/projects", 422, "reserved", json={"name": "x", "slug": "api"}),
    Case("POST", "/api/v1/projects", 422, "slug", json={"name": "x", "slug": "s" * 65}),
    Case("POST", "/api/v1/projects", 422, "control", json={"name": "a\nb"}),
    Case("POST", "/api/v1/projects", 422, "template", json={"name": "x", "template": "../../etc"}),
    Case("PUT", f"{P}/env/1X", 422, "name", json={"value": "1"}),
    Case("PUT", f"{P}/env/A-B", 422, "name", json={"value": "1"}),
    Case("PUT", f"{P}/env/{'A' * 129}", 422, "name", json={"value": "1"}),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "username",
        json={"username": "Zed", "password": PASSWORD},
        as_user="admin",
    ),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "username",
        json={"username": "z d", "password": PASSWORD},
        as_user="admin",
    ),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "username",
        json={"username": "", "password": PASSWORD},
        as_user="admin",
    ),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "reserved",
        json={"username": "git", "password": PASSWORD},
        as_user="admin",
    ),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "password",
        json={"username": "zed", "password": "short"},
        as_user="admin",
    ),
    Case("POST", "/api/v1/teams", 422, "team name", json={"name": "Lab Two"}),
    # -- NUL characters (PostgreSQL cannot store them; nobody needs them)
    Case("POST", "/api/v1/projects", 422, "nul", json={"name": "x", "description": "a\x00b"}),
    Case("PATCH", P, 422, "nul", json={"description": "a\x00b"}),
    Case(
        "POST",
        "/api/v1/auth/login",
        422,
        "nul",
        json={"username": "al\x00ice", "password": PASSWORD},
    ),
    Case("POST", "/api/v1/auth/api-keys", 422, "nul", json={"name": "k\x00"}),
    Case(
        "POST",
        "/api/v1/users",
        422,
        "nul",
        json={"username": "zed", "password": PASSWORD, "full_name": "Z\x00"},
        as_user="admin",
    ),
    Case("POST", "/api/v1/teams", 422, "nul", json={"name": "lab2", "description": "\x00"}),
    Case("GET", "/api/v1/projects/al%00ice/demo", 400, "nul"),
    Case("GET", "/api/v1/projects?q=a%00b", 400, "nul"),
    Case("GET", "/api/v1/users/al%00ice", 400, "nul"),
    Case("GET", "/api/v1/audit?actor=%00", 400, "nul", as_user="admin"),
    # -- naive, past and malformed datetimes
    Case(
        "POST",
        "/api/v1/auth/api-keys",
        422,
        "time zone",
        json={"expires_at": "2030-01-01T00:00:00"},
    ),
    Case(
        "POST", "/api/v1/auth/api-keys", 422, "future", json={"expires_at": "2001-01-01T00:00:00Z"}
    ),
    Case(
        "POST",
        "/api/v1/auth/api-keys",
        422,
        "expires_at",
        json={"expires_at": "2030-02-30T00:00:00Z"},
    ),
    # -- unknown things
    Case("GET", "/api/v1/projects/alice/nope", 404, "not found"),
    Case("DELETE", "/api/v1/auth/api-keys/999999", 404, "not found"),
    Case("DELETE", "/api/v1/auth/api-keys/abc", 422, "key_id"),
    Case("DELETE", "/api/v1/auth/api-keys/0", 422, "key_id"),
    Case("DELETE", f"/api/v1/auth/api-keys/{10**30}", 422, "key_id"),
    Case("DELETE", f"/api/v1/auth/api-keys/{2**31}", 422, "key_id"),
    Case("DELETE", f"/api/v1/auth/api-keys/{2**31 - 1}", 404, "not found"),
    Case("PUT", f"{P}/collaborators/nobody", 404, "nobody", json={"role": "viewer"}),
    Case("PUT", f"{P}/collaborators/alice", 422, "owns", json={"role": "viewer"}),
    Case("DELETE", f"{P}/collaborators/bob", 404, "not a collaborator"),
    Case("DELETE", f"{P}/env/NOPE", 404, "NOPE"),
    Case("GET", "/api/v1/users/nobody", 404, "nobody"),
    Case("PATCH", "/api/v1/users/nobody", 404, "nobody", json={}, as_user="admin"),
    Case("GET", "/api/v1/teams/nobody", 404, "nobody"),
    Case("PUT", "/api/v1/teams/lab/members/nobody", 404, "nobody", json={}),
    Case("DELETE", "/api/v1/teams/lab/members/bob", 404, "not a member"),
    Case(
        "POST", "/api/v1/projects", 403, "not a member", json={"name": "x", "owner": "other-team"}
    ),
    Case("POST", "/api/v1/projects", 403, "bob", json={"name": "x", "owner": "bob"}),
    Case(
        "POST",
        "/api/v1/projects",
        404,
        "nobody",
        json={"name": "x", "owner": "nobody"},
        as_user="admin",
    ),
    # -- cursors and limits
    Case("GET", "/api/v1/projects?cursor=garbage!", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={cursor({'after': 'x'})}", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={cursor([1])}", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={cursor({'after': 10**30})}", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={cursor({'after': -(10**30)})}", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={cursor({'after': 1.5})}", 422, "cursor"),
    Case("GET", f"/api/v1/projects?cursor={'A' * 5000}", 422, "cursor"),
    Case("GET", f"/api/v1/users?cursor={cursor({'after': 10**30})}", 422, "cursor"),
    Case("GET", f"/api/v1/teams?cursor={cursor({'after': 2**63})}", 422, "cursor"),
    Case("GET", f"/api/v1/teams?cursor={cursor({'after': 2**31})}", 422, "cursor"),
    Case(
        "GET", f"/api/v1/audit?cursor={cursor({'after': 10**30})}", 422, "cursor", as_user="admin"
    ),
    Case("GET", "/api/v1/projects?limit=0", 422, "limit"),
    Case("GET", "/api/v1/projects?limit=100000", 422, "limit"),
    Case("GET", "/api/v1/projects?limit=ten", 422, "limit"),
    Case("GET", f"/api/v1/projects?q={'q' * 101}", 422, "q"),
    # -- duplicates and the shared user/team namespace
    Case("POST", "/api/v1/projects", 409, "already exists", json={"name": "demo"}),
    Case("POST", "/api/v1/projects", 409, "already exists", json={"name": "Demo!"}),
    Case(
        "POST",
        "/api/v1/users",
        409,
        "taken",
        json={"username": "bob", "password": PASSWORD},
        as_user="admin",
    ),
    Case(
        "POST",
        "/api/v1/users",
        409,
        "taken",
        json={"username": "lab", "password": PASSWORD},
        as_user="admin",
    ),
    Case("POST", "/api/v1/teams", 409, "taken", json={"name": "lab"}),
    Case("POST", "/api/v1/teams", 409, "taken", json={"name": "bob"}),
    # -- auth headers
    Case("GET", "/api/v1/auth/me", 401, "scheme", headers={"Authorization": "Digest abc"}),
    Case("GET", "/api/v1/auth/me", 401, "not valid", headers={"Authorization": "Bearer "}),
    Case("GET", "/api/v1/auth/me", 401, "malformed", headers={"Authorization": "Basic %%%"}),
    Case(
        "GET",
        "/api/v1/auth/me",
        401,
        "malformed",
        headers={"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()},
    ),
    Case("GET", "/api/v1/auth/me", 401, "not valid", headers={"Authorization": "Bearer kiln_\x7f"}),
    # -- methods
    Case("PUT", "/api/v1/projects", 405, "method"),
]


def counts(engine: Engine) -> dict[str, int]:
    """Rows in every table but the audit log (refused logins are rightly recorded there)."""
    with engine.connect() as conn:
        return {
            t.name: conn.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
            if t.name != "audit_events"
        }


@pytest.fixture
def accounts(make_user: Callable[..., Account], client: TestClient) -> dict[str, Account]:
    alice, bob, other = make_user("alice"), make_user("bob"), make_user("carol")
    admin = make_user("admin-user", site_admin=True)
    assert client.post("/api/v1/projects", json={"name": "demo"}, headers=alice.headers).is_success
    assert client.post("/api/v1/teams", json={"name": "lab"}, headers=alice.headers).is_success
    team = {"name": "other-team"}
    assert client.post("/api/v1/teams", json=team, headers=other.headers).is_success
    return {"alice": alice, "bob": bob, "admin": admin}


def test_bad_input_gets_a_precise_4xx_and_changes_nothing(
    app: Any, accounts: dict[str, Account], engine: Engine, settings: Settings
) -> None:
    # A 500 must come back as a response here, so that every case gets reported.
    client = TestClient(app, base_url="https://testserver", raise_server_exceptions=False)
    before = counts(engine)
    project_dirs = sorted(p.name for p in settings.projects_dir.iterdir())
    wrong: list[str] = []
    for case in CASES:
        headers = {**accounts[case.as_user].headers, **(case.headers or {})}
        r = client.request(
            case.method, case.url, json=case.json, content=case.content, headers=headers
        )
        problem = r.json() if r.headers.get("content-type") == "application/problem+json" else {}
        if r.status_code != case.status or not problem:
            wrong.append(f"{case}: want {case.status}, got {r.status_code} {r.text[:200]}")
        elif case.says.lower() not in problem.get("detail", "").lower():
            wrong.append(f"{case}: detail {problem.get('detail')!r} does not say {case.says!r}")
    assert not wrong, "\n".join(wrong)
    assert counts(engine) == before, "a refused request changed the database"
    assert sorted(p.name for p in settings.projects_dir.iterdir()) == project_dirs


@pytest.fixture
def small_limit_client(settings: Settings, engine: Engine, tmp_path: Path) -> TestClient:
    small = settings.model_copy(
        update={"web": settings.web.model_copy(update={"max_request_bytes": 4096})}
    )
    small.data_dir.mkdir(parents=True, exist_ok=True)
    return TestClient(create_app(small, engine), base_url="https://testserver")


def test_oversized_bodies_are_refused_with_413(
    small_limit_client: TestClient, alice: Account, engine: Engine
) -> None:
    client = small_limit_client
    big = json.dumps({"name": "x", "description": "d" * 5000}).encode()
    headers = {**alice.headers, "Content-Type": "application/json"}
    r = client.post("/api/v1/projects", content=big, headers=headers)
    assert r.status_code == 413 and "4096" in r.json()["detail"]

    def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post("/api/v1/projects", content=chunks(), headers=headers)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"
    r = client.post("/api/v1/auth/login", content=chunks(), headers=headers)
    assert r.status_code == 413, r.text
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Base.metadata.tables["projects"])) == 0
    small = json.dumps({"name": "fits"}).encode()
    assert client.post("/api/v1/projects", content=small, headers=headers).status_code == 201
    r = client.post("/api/v1/projects", content=b"{}", headers={**headers, "Content-Length": "1x"})
    assert r.status_code == 400


def test_the_site_keeps_an_administrator(
    client: TestClient, admin: Account, make_user: Callable[..., Account]
) -> None:
    me = "/api/v1/users/root-admin"
    r = client.patch(me, json={"is_active": False}, headers=admin.headers)
    assert r.status_code == 403 and "own account" in r.json()["detail"]
    r = client.patch(me, json={"is_site_admin": False}, headers=admin.headers)
    assert r.status_code == 403 and "last" in r.json()["detail"]
    assert client.get(me, headers=admin.headers).json()["is_site_admin"] is True
    second = make_user("second-admin", site_admin=True)
    r = client.patch(me, json={"is_site_admin": False}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["is_site_admin"] is False
    r = client.patch(
        "/api/v1/users/second-admin", json={"is_site_admin": False}, headers=second.headers
    )
    assert r.status_code == 403 and "last" in r.json()["detail"]
