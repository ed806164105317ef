"""Bad input to the applications API: a precise problem+json 4xx naming the field, never a
500, never a partial write; other people's applications stay out of reach; site settings
are the admins'."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Account

PROJECT = "/api/v1/projects/alice/shop"
APPS = f"{PROJECT}/applications"
GOOD = {"name": "sales", "subdomain": "sales", "script": "app.py"}


@pytest.fixture
def shop(client: TestClient, alice: Account) -> str:
    made = client.post("/api/v1/projects", json={"name": "shop"}, headers=alice.headers)
    assert made.status_code == 201, made.text
    for path in ("app.py", "run.sh", "notes.txt"):
        written = client.put(
            f"{PROJECT}/files/{path}", content=b"print(1)\n", headers=alice.headers
        )
        assert written.status_code in (200, 201), written.text
    return PROJECT


def refused(response: Any, status: int, field: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert words in body["detail"], body
    if field is not None:
        assert [e["field"] for e in body.get("errors", [])][:1] == [field], body


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"subdomain": "www"}, "subdomain", "reserved for Kiln"),
        ({"subdomain": "api"}, "subdomain", "reserved for Kiln"),
        ({"subdomain": "modelservice"}, "subdomain", "reserved for Kiln"),
        ({"subdomain": "Sales"}, "subdomain", "not valid"),
        ({"subdomain": "a" * 64}, "subdomain", "not valid"),
        ({"subdomain": "a..b"}, "subdomain", "not valid"),
        ({"subdomain": "app-sales"}, "subdomain", "reserved"),
        ({"subdomain": "read-only-sales"}, "subdomain", "reserved"),
        ({"subdomain": "0123456789abcdef"}, "subdomain", "looks like a session id"),
        ({"script": "../etc/passwd"}, "script", "script"),
        ({"script": "/etc/passwd"}, "script", "script"),
        ({"script": "missing.py"}, "script", "does not exist in the project"),
        ({"script": "notes.txt"}, "script", "Kiln runs .py, .sh files"),
        ({"script": ".git/config"}, "script", "script"),
        ({"env": {"1BAD": "x"}}, "env", "environment variable"),
        ({"runtime": "nope"}, "runtime", "no runtime named 'nope'"),
        ({"profile": "huge"}, "profile", "no resource profile named 'huge'"),
        ({"name": "  "}, "name", "must not be empty"),
        ({"name": "a\x07b"}, "name", "control characters"),
    ],
)
def test_bad_fields_are_named_and_nothing_is_written(
    client: TestClient, alice: Account, shop: str, change: dict[str, Any], field: str, words: str
) -> None:
    refused(client.post(APPS, json={**GOOD, **change}, headers=alice.headers), 422, field, words)
    assert client.get(APPS, headers=alice.headers).json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "subdomain": "x"},  # no script
        {**GOOD, "public": "yes"},  # not a boolean
        {**GOOD, "env": {"A": 1}},
        {**GOOD, "name": "n" * 101},
        {**GOOD, "script": "a\x00b.py"},
        [GOOD],
    ],
)
def test_malformed_bodies_are_422(client: TestClient, alice: Account, shop: str, body: Any) -> None:
    response = client.post(APPS, json=body, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert client.get(APPS, headers=alice.headers).json() == []


def test_a_subdomain_is_unique_on_the_whole_site(
    client: TestClient, alice: Account, bob: Account, shop: str
) -> None:
    assert client.post(APPS, json=GOOD, headers=alice.headers).status_code == 201
    again = client.post(APPS, json={**GOOD, "name": "other"}, headers=alice.headers)
    refused(again, 409, "subdomain", "subdomain 'sales' is taken")
    same_name = client.post(APPS, json={**GOOD, "subdomain": "sales2"}, headers=alice.headers)
    refused(same_name, 409, "name", "already has an application named 'sales'")
    # Another user's project: the subdomain is just as taken (and says nothing more).
    assert client.post("/api/v1/projects", json={"name": "b"}, headers=bob.headers).is_success
    assert client.put("/api/v1/projects/bob/b/files/app.py", content=b"1", headers=bob.headers)
    theirs = client.post("/api/v1/projects/bob/b/applications", json=GOOD, headers=bob.headers)
    refused(theirs, 409, "subdomain", "is taken by another application")
    # A rename onto a taken subdomain is refused too, and changes nothing.
    assert client.post(
        APPS, json={**GOOD, "name": "two", "subdomain": "two"}, headers=alice.headers
    )
    renamed = client.patch(f"{APPS}/two", json={"subdomain": "sales"}, headers=alice.headers)
    refused(renamed, 409, "subdomain", "taken")
    assert client.get(f"{APPS}/two", headers=alice.headers).json()["subdomain"] == "two"


def test_a_real_session_id_is_refused(client: TestClient, alice: Account, shop: str) -> None:
    # No runner here: the session fails to start, but its id exists (and names an origin).
    session = client.post(f"{PROJECT}/sessions", json={}, headers=alice.headers).json()
    taken = client.post(APPS, json={**GOOD, "subdomain": session["id"]}, headers=alice.headers)
    refused(taken, 422, "subdomain", "looks like a session id")


def test_other_peoples_applications_are_out_of_reach(
    client: TestClient, alice: Account, bob: Account, make_user: Any, shop: str
) -> None:
    assert client.post(APPS, json=GOOD, headers=alice.headers).status_code == 201
    for method, path in [
        ("GET", f"{APPS}/sales"),
        ("PATCH", f"{APPS}/sales"),
        ("POST", f"{APPS}/sales/stop"),
        ("GET", f"{APPS}/sales/logs"),
        ("GET", f"{APPS}/sales/open"),
        ("DELETE", f"{APPS}/sales"),
        ("GET", "/open/sales"),  # the UI's hand-off
    ]:
        response = client.request(
            method, path, headers=bob.headers, json={} if method == "PATCH" else None
        )
        assert response.status_code == 404, (method, path, response.text)
    assert client.get("/api/v1/applications", headers=bob.headers).json() == []
    # A viewer sees it and may open it, but not stop, change or delete it.
    carol = make_user("carol")
    client.put(f"{PROJECT}/collaborators/carol", json={"role": "viewer"}, headers=alice.headers)
    assert client.get(f"{APPS}/sales", headers=carol.headers).status_code == 200
    for method, path in [
        ("POST", f"{APPS}/sales/stop"),
        ("PATCH", f"{APPS}/sales"),
        ("DELETE", f"{APPS}/sales"),
    ]:
        response = client.request(
            method, path, headers=carol.headers, json={} if method == "PATCH" else None
        )
        assert response.status_code == 403, (method, path, response.text)
    assert client.get(f"{APPS}/sales", headers=alice.headers).json()["desired"] == "running"


def test_site_settings_are_the_admins(client: TestClient, alice: Account, admin: Account) -> None:
    assert client.get("/api/v1/site-settings", headers=alice.headers).json() == {
        "public_applications": False
    }
    refused(
        client.patch(
            "/api/v1/site-settings", json={"public_applications": True}, headers=alice.headers
        ),
        403,
        None,
        "site administrator",
    )
    bad = client.patch(
        "/api/v1/site-settings", json={"public_applications": "yes"}, headers=admin.headers
    )
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert client.get("/api/v1/site-settings", headers=admin.headers).json() == {
        "public_applications": False
    }
    audit = client.get("/api/v1/audit", headers=admin.headers).json()["items"]
    assert not [e for e in audit if e["action"] == "site.settings"]
