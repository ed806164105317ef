"""Deployments through the API (the desired state; the runner's model keeper acts on it):
deploy the newest or a named build, a newer deploy replacing one not yet ready while the
serving one keeps serving, rollback, scale, stop, the history; roles, strangers and bad
input. The builder's part (a succeeded build with an image) is recorded by the test."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model, ModelDeployment
from kiln.db.workload_models import Workload
from tests.conftest import Account
from tests.integration.test_models_api import create
from tests.integration.test_sessions_support import make_project, share

M = "/models/adder"


def built(client: TestClient, project: str, who: Account, engine: Engine) -> int:
    """A model build that the builder finished (its image recorded)."""
    response = client.post(f"{project}{M}/builds", json={}, headers=who.headers)
    assert response.status_code == 201, response.text
    made = response.json()
    with transaction(make_sessionmaker(engine)) as db:
        workload = db.get(Workload, made["build"]["id"])
        build = db.get(Build, made["build"]["id"])
        assert workload is not None and build is not None
        workload.state = "succeeded"
        build.image_digest = "sha256:" + "e" * 64
    return int(made["number"])


def deploy(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}{M}/deployments", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def mark_serving(engine: Engine, number: int) -> None:
    """What the keeper does once every replica of a deployment is ready."""
    with transaction(make_sessionmaker(engine)) as db:
        deployment = db.scalar(select(ModelDeployment).where(ModelDeployment.number == number))
        model = db.scalar(select(Model))
        assert deployment is not None and model is not None
        deployment.state = "serving"
        model.serving_deployment_id = deployment.id


def states(client: TestClient, project: str, who: Account) -> list[tuple[int, str]]:
    items = client.get(f"{project}{M}/deployments", headers=who.headers).json()["items"]
    return [(d["number"], d["state"]) for d in items]


def problem(response: Any, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert words in response.json()["detail"], response.text


def test_deploy_redeploy_rollback_scale_stop(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    problem(
        client.post(f"{project}{M}/deployments", json={}, headers=alice.headers),
        409,
        "has no successful build yet",
    )
    client.post(f"{project}{M}/builds", json={}, headers=alice.headers)  # still queued
    problem(
        client.post(f"{project}{M}/deployments", json={"build": 1}, headers=alice.headers),
        409,
        "build 1 of model adder is queued, not succeeded",
    )
    two = built(client, project, alice, engine)
    first = deploy(client, project, alice, env={"MODEL_MODE": "fast"})
    assert (first["number"], first["build"], first["state"]) == (1, two, "deploying")
    assert (first["replicas"], first["env"], first["created_by"]) == (
        1,
        {"MODEL_MODE": "fast"},
        "alice",
    )
    assert first["cpu_millis"] > 0 and first["memory_bytes"] > 0
    # A newer deploy replaces one that was not ready yet.
    deploy(client, project, alice, replicas=2)
    assert states(client, project, alice) == [(2, "deploying"), (1, "stopped")]
    mark_serving(engine, 2)
    # A redeploy of a new build leaves the serving deployment serving.
    three = built(client, project, alice, engine)
    third = deploy(client, project, alice)
    assert third["build"] == three
    assert states(client, project, alice) == [(3, "deploying"), (2, "serving"), (1, "stopped")]
    # Rollback before it was ready: deploy the older build; 3 is replaced, 2 keeps serving.
    rollback = deploy(client, project, alice, build=two)
    assert rollback["build"] == two and rollback["number"] == 4
    assert states(client, project, alice)[:3] == [(4, "deploying"), (3, "stopped"), (2, "serving")]
    # Scaling applies to the newest active deployment.
    scaled = client.post(f"{project}{M}/scale", json={"replicas": 3}, headers=alice.headers)
    assert scaled.status_code == 200 and scaled.json()["number"] == 4
    assert scaled.json()["replicas"] == 3
    got = client.get(f"{project}{M}/deployments/4", headers=alice.headers).json()
    assert got["replicas"] == 3
    # Stop: the serving one drains, the deploying one stops; the endpoint has nothing.
    stopped = client.post(f"{project}{M}/stop", headers=alice.headers)
    assert stopped.status_code == 200, stopped.text
    assert sorted((d["number"], d["state"]) for d in stopped.json()) == [
        (2, "draining"),
        (4, "stopped"),
    ]
    with make_sessionmaker(engine)() as db:
        model = db.scalar(select(Model))
        assert model is not None and model.serving_deployment_id is None
    problem(client.post(f"{project}{M}/stop", headers=alice.headers), 409, "is not deployed")
    problem(
        client.post(f"{project}{M}/scale", json={"replicas": 2}, headers=alice.headers),
        409,
        "is not deployed",
    )


def test_roles_and_strangers(
    client: TestClient, alice: Account, bob: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    built(client, project, alice, engine)
    deploy(client, project, alice)
    calls = [
        ("GET", f"{M}/deployments", None),
        ("GET", f"{M}/deployments/1", None),
        ("POST", f"{M}/deployments", {}),
        ("POST", f"{M}/scale", {"replicas": 2}),
        ("POST", f"{M}/stop", None),
    ]
    for method, path, body in calls:
        response = client.request(method, f"{project}{path}", headers=bob.headers, json=body)
        assert response.status_code == 404, (method, path, response.text)
    share(client, project, alice, bob, "viewer")
    for method, path, body in calls:
        response = client.request(method, f"{project}{path}", headers=bob.headers, json=body)
        assert response.status_code == (200 if method == "GET" else 403), (path, response.text)
    share(client, project, alice, bob, "operator")  # operators run what others built
    assert deploy(client, project, bob)["created_by"] == "bob"
    scaled = client.post(f"{project}{M}/scale", json={"replicas": 2}, headers=bob.headers)
    assert scaled.status_code == 200
    assert client.post(f"{project}{M}/stop", headers=bob.headers).status_code == 200
    # ...but not build it.
    response = client.post(f"{project}{M}/builds", json={}, headers=bob.headers)
    assert response.status_code == 403


def test_bad_input_writes_nothing(client: TestClient, alice: Account, engine: Engine) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    built(client, project, alice, engine)
    for body, words in (
        ({"replicas": 0}, "replicas"),
        ({"replicas": 17}, "replicas must be 1 to 16"),
        ({"replicas": "2"}, "replicas"),
        ({"build": 9}, "has no build 9"),
        ({"build": "1"}, "build"),
        ({"profile": "huge"}, "no resource profile named 'huge'"),
        ({"env": {"1BAD": "x"}}, "environment variable '1BAD'"),
        ({"env": {"A": 5}}, "env"),
        ({"env": {f"V{i}": "x" for i in range(101)}}, "at most 100"),
        ({"env": {"A": "x\u0000"}}, "NUL"),
    ):
        response = client.post(f"{project}{M}/deployments", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert words in response.text, (body, response.text)
    with make_sessionmaker(engine)() as db:
        assert db.scalar(select(func.count()).select_from(ModelDeployment)) == 0
    deploy(client, project, alice)
    for body in ({"replicas": 0}, {"replicas": 17}, {}, {"replicas": 1.5}):
        response = client.post(f"{project}{M}/scale", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
    for path, status in (
        (f"{M}/deployments/2", 404),
        (f"{M}/deployments/0", 422),
        ("/models/nope/deployments", 404),
    ):
        assert client.get(f"{project}{path}", headers=alice.headers).status_code == status, path
