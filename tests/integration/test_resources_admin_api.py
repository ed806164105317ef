"""The API behind the admin resource pages: the default runtime, profile changes, the list of
quotas and removing one."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.workload_models import Runtime
from tests.conftest import Account


def test_admins_pick_the_default_runtime(
    client: TestClient, alice: Account, admin: Account, engine: Engine
) -> None:
    assert client.get("/api/v1/runtimes", headers=alice.headers).status_code == 200
    with transaction(make_sessionmaker(engine)) as db:
        db.add(Runtime(name="lab", source="oci-archive", digest="sha256:" + "0" * 64))
    make = {"is_default": True}
    r = client.patch("/api/v1/runtimes/lab", json=make, headers=alice.headers)
    assert r.status_code == 403
    for body in ({"is_default": False}, {}, {"is_default": "yes"}):
        r = client.patch("/api/v1/runtimes/lab", json=body, headers=admin.headers)
        assert r.status_code == 422, (body, r.text)
    assert (
        client.patch("/api/v1/runtimes/nope", json=make, headers=admin.headers).status_code == 404
    )
    r = client.patch("/api/v1/runtimes/lab", json=make, headers=admin.headers)
    assert r.status_code == 200 and r.json()["is_default"] is True
    listed = client.get("/api/v1/runtimes", headers=alice.headers).json()
    assert [(x["name"], x["is_default"]) for x in listed] == [("builtin", False), ("lab", True)]
    # Making the default the default again changes nothing.
    assert client.patch("/api/v1/runtimes/lab", json=make, headers=admin.headers).is_success
    assert (
        sum(x["is_default"] for x in client.get("/api/v1/runtimes", headers=alice.headers).json())
        == 1
    )


def test_admins_change_a_profile_in_part(
    client: TestClient, alice: Account, admin: Account
) -> None:
    for body in (
        {"name": "small", "cpu": 1, "memory_mib": 2048, "is_default": True},
        {"name": "large", "cpu": 4, "memory_mib": 16384},
    ):
        r = client.post("/api/v1/resource-profiles", json=body, headers=admin.headers)
        assert r.status_code == 201
    r = client.get("/api/v1/resource-profiles/small", headers=alice.headers)
    assert r.status_code == 200 and r.json()["memory_mib"] == 2048
    assert client.get("/api/v1/resource-profiles/nope", headers=alice.headers).status_code == 404

    r = client.patch("/api/v1/resource-profiles/large", json={"cpu": 8}, headers=alice.headers)
    assert r.status_code == 403
    r = client.patch("/api/v1/resource-profiles/large", json={"cpu": 8}, headers=admin.headers)
    assert r.status_code == 200
    assert r.json() == {
        "name": "large",
        "cpu": 8.0,
        "memory_mib": 16384,  # not given: kept
        "gpu": 0,
        "is_default": False,
    }
    r = client.patch(
        "/api/v1/resource-profiles/large", json={"is_default": True}, headers=admin.headers
    )
    assert r.status_code == 200 and r.json()["cpu"] == 8.0
    listed = client.get("/api/v1/resource-profiles", headers=alice.headers).json()
    assert [(p["name"], p["is_default"]) for p in listed] == [("small", False), ("large", True)]
    r = client.patch(
        "/api/v1/resource-profiles/large", json={"is_default": False}, headers=admin.headers
    )
    assert r.status_code == 200
    assert not any(
        p["is_default"]
        for p in client.get("/api/v1/resource-profiles", headers=alice.headers).json()
    )
    missing = client.patch("/api/v1/resource-profiles/nope", json={"cpu": 1}, headers=admin.headers)
    assert missing.status_code == 404


def test_bad_profile_changes_are_refused_and_nothing_is_written(
    client: TestClient, admin: Account
) -> None:
    body = {"name": "small", "cpu": 1, "memory_mib": 2048}
    assert client.post("/api/v1/resource-profiles", json=body, headers=admin.headers).is_success
    before = client.get("/api/v1/resource-profiles/small", headers=admin.headers).json()
    bad: list[object] = [
        {"cpu": 0},
        {"cpu": 0.0001},  # rounds to no vCPU at all
        {"cpu": 1000},
        {"memory_mib": 8},
        {"gpu": -1},
        {"gpu": 65},
        {"is_default": "no"},
        {"name": "renamed"},  # profiles are not renamed: nothing here to change
        {},
    ]
    for change in bad:
        r = client.patch("/api/v1/resource-profiles/small", json=change, headers=admin.headers)
        assert r.status_code == 422, (change, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    # JSON as Python reads it allows NaN; a size must be a real number.
    r = client.patch(
        "/api/v1/resource-profiles/small",
        content=b'{"cpu": NaN}',
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert client.get("/api/v1/resource-profiles/small", headers=admin.headers).json() == before
    audit = client.get("/api/v1/audit?action=profile.update", headers=admin.headers).json()
    assert audit["items"] == []


def test_quotas_are_listed_and_removed_by_admins(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    r = client.get("/api/v1/quotas/default", headers=alice.headers)
    assert r.status_code == 200 and (r.json()["cpu"], r.json()["memory_mib"]) == (4.0, 8192)
    assert client.get("/api/v1/quotas", headers=alice.headers).status_code == 403
    assert client.post("/api/v1/teams", json={"name": "ml"}, headers=alice.headers).is_success
    size = {"cpu": 4, "memory_mib": 16384, "gpu": 1}
    for path in ("users/alice", "teams/ml", "users/bob"):
        assert client.put(f"/api/v1/quotas/{path}", json=size, headers=admin.headers).is_success

    r = client.get("/api/v1/quotas?limit=2", headers=admin.headers)
    assert r.status_code == 200
    first = r.json()
    assert [(q["kind"], q["name"]) for q in first["items"]] == [("user", "alice"), ("team", "ml")]
    assert first["items"][0] == {
        "kind": "user",
        "name": "alice",
        "cpu": 4.0,
        "memory_mib": 16384,
        "gpu": 1,
    }
    rest = client.get(
        f"/api/v1/quotas?limit=2&cursor={first['next_cursor']}", headers=admin.headers
    ).json()
    assert [q["name"] for q in rest["items"]] == ["bob"] and rest["next_cursor"] is None
    assert client.get("/api/v1/quotas?cursor=garbage", headers=admin.headers).status_code == 422

    assert client.delete("/api/v1/quotas/users/alice", headers=alice.headers).status_code == 403
    assert client.delete("/api/v1/quotas/teams/ml", headers=alice.headers).status_code == 403
    assert client.delete("/api/v1/quotas/users/alice", headers=admin.headers).status_code == 204
    r = client.delete("/api/v1/quotas/users/alice", headers=admin.headers)
    assert r.status_code == 404 and r.json()["detail"] == "user 'alice' has no quota of its own"
    assert client.delete("/api/v1/quotas/users/nobody", headers=admin.headers).status_code == 404
    assert client.delete("/api/v1/quotas/teams/ml", headers=admin.headers).status_code == 204
    assert client.delete("/api/v1/quotas/teams/nope", headers=admin.headers).status_code == 404
    left = client.get("/api/v1/quotas", headers=admin.headers).json()["items"]
    assert [q["name"] for q in left] == ["bob"]
    mine = client.get("/api/v1/quotas/users/alice", headers=alice.headers).json()
    assert mine["cpu"] == 4.0  # the site default again
    audit = client.get("/api/v1/audit?action=quota.remove", headers=admin.headers).json()
    assert [e["target"] for e in audit["items"]] == ["team:ml", "user:alice"]
