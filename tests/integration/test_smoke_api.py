from fastapi.testclient import TestClient

from tests.conftest import Account


def test_create_and_get_project(client: TestClient, alice: Account, bob: Account) -> None:
    r = client.post("/api/v1/projects", json={"name": "demo"}, headers=alice.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["owner"], body["name"], body["slug"]) == ("alice", "demo", "demo")
    r = client.get("/api/v1/projects/alice/demo", headers=alice.headers)
    assert r.status_code == 200 and r.json()["role"] == "admin"
    r = client.get("/api/v1/projects/alice/demo", headers=bob.headers)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
