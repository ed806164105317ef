"""Runtimes, resource profiles and quotas through the API."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import Account


def test_the_builtin_runtime_is_always_listed(client: TestClient, alice: Account) -> None:
    r = client.get("/api/v1/runtimes", headers=alice.headers)
    assert r.status_code == 200
    (builtin,) = r.json()
    assert builtin["name"] == "builtin" and builtin["source"] == "builtin"
    assert builtin["is_default"] is True and "terminal" in builtin["editors"]
    assert builtin["python_version"].startswith("3.")
    # Listing again does not duplicate it.
    assert len(client.get("/api/v1/runtimes", headers=alice.headers).json()) == 1


def test_admins_define_profiles_users_list_them(
    client: TestClient, alice: Account, admin: Account
) -> None:
    small = {"name": "small", "cpu": 0.5, "memory_mib": 1024, "is_default": True}
    assert (
        client.post("/api/v1/resource-profiles", json=small, headers=alice.headers).status_code
        == 403
    )
    r = client.post("/api/v1/resource-profiles", json=small, headers=admin.headers)
    assert r.status_code == 201 and r.json() == {
        "name": "small",
        "cpu": 0.5,
        "memory_mib": 1024,
        "gpu": 0,
        "is_default": True,
    }
    large = {"name": "large", "cpu": 4, "memory_mib": 16384, "is_default": True}
    assert (
        client.post("/api/v1/resource-profiles", json=large, headers=admin.headers).status_code
        == 201
    )
    listed = client.get("/api/v1/resource-profiles", headers=alice.headers).json()
    assert [(p["name"], p["is_default"]) for p in listed] == [("small", False), ("large", True)]
    dup = client.post("/api/v1/resource-profiles", json=small, headers=admin.headers)
    assert dup.status_code == 409
    assert (
        client.delete("/api/v1/resource-profiles/small", headers=alice.headers).status_code == 403
    )
    assert (
        client.delete("/api/v1/resource-profiles/small", headers=admin.headers).status_code == 204
    )
    assert (
        client.delete("/api/v1/resource-profiles/small", headers=admin.headers).status_code == 404
    )


def test_bad_profiles_are_refused_and_nothing_is_written(
    client: TestClient, admin: Account
) -> None:
    bad = [
        {"name": "zero", "cpu": 0, "memory_mib": 1024},
        {"name": "tiny", "cpu": 1, "memory_mib": 8},
        {"name": "Bad Name", "cpu": 1, "memory_mib": 1024},
        {"name": "gpus", "cpu": 1, "memory_mib": 1024, "gpu": -1},
        {"name": "typed", "cpu": "lots", "memory_mib": 1024},
        {"cpu": 1, "memory_mib": 1024},
    ]
    for body in bad:
        r = client.post("/api/v1/resource-profiles", json=body, headers=admin.headers)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/api/v1/resource-profiles", headers=admin.headers).json() == []


def test_quotas_have_a_site_default_and_admins_change_them(
    client: TestClient, alice: Account, bob: Account, admin: Account
) -> None:
    r = client.get("/api/v1/quotas/users/alice", headers=alice.headers)
    assert r.status_code == 200
    assert r.json() == {
        "cpu": 4.0,
        "memory_mib": 8192,
        "gpu": 0,
        "used_cpu": 0.0,
        "used_memory_mib": 0,
    }
    assert client.get("/api/v1/quotas/users/alice", headers=bob.headers).status_code == 403
    change = {"cpu": 8, "memory_mib": 32768}
    assert (
        client.put("/api/v1/quotas/users/alice", json=change, headers=alice.headers).status_code
        == 403
    )
    r = client.put("/api/v1/quotas/users/alice", json=change, headers=admin.headers)
    assert r.status_code == 200 and r.json()["cpu"] == 8.0
    assert (
        client.get("/api/v1/quotas/users/alice", headers=admin.headers).json()["memory_mib"]
        == 32768
    )
    assert (
        client.put("/api/v1/quotas/users/nobody", json=change, headers=admin.headers).status_code
        == 404
    )
    bad = client.put(
        "/api/v1/quotas/users/alice", json={"cpu": -1, "memory_mib": 1}, headers=admin.headers
    )
    assert bad.status_code == 422
    audit = client.get("/api/v1/audit?action=quota.set", headers=admin.headers).json()["items"]
    assert len(audit) == 1 and audit[0]["target"] == "user:alice"


def test_team_quotas_are_for_admins(client: TestClient, alice: Account, admin: Account) -> None:
    assert (
        client.post("/api/v1/teams", json={"name": "ml"}, headers=alice.headers).status_code == 201
    )
    change = {"cpu": 16, "memory_mib": 65536, "gpu": 1}
    assert (
        client.put("/api/v1/quotas/teams/ml", json=change, headers=alice.headers).status_code == 403
    )
    r = client.put("/api/v1/quotas/teams/ml", json=change, headers=admin.headers)
    assert r.status_code == 200 and r.json()["gpu"] == 1
    assert (
        client.put("/api/v1/quotas/teams/nope", json=change, headers=admin.headers).status_code
        == 404
    )
