"""A model's replicas through the API (what the runner's model keeper records, written here
by the test): one per slot with readiness, restarts and why the slot's last replica ended;
a deployment's replicas; one replica; its log. The model's endpoint URLs; the audit trail of
builds, deployments, scaling and stops. Roles, strangers, other projects and bad input.
SQLite and PostgreSQL (a replica's real log is read in ``test_model_keeper.py``)."""

from __future__ import annotations

import datetime as dt

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import ModelDeployment
from kiln.db.models import AuditEvent
from kiln.db.workload_models import Workload
from kiln.domain.model_replicas import queue_replica
from tests.conftest import Account
from tests.integration.test_model_deploys_api import M, built, deploy, mark_serving, problem
from tests.integration.test_models_api import create
from tests.integration.test_sessions_support import make_project, share

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


def record_replicas(engine: Engine, number: int) -> dict[str, str]:
    """What the keeper records for deployment ``number`` (2 replicas): slot 0 crashed once
    and its new replica serves; slot 1 waits for quota. Returns the replicas' ids."""
    with transaction(make_sessionmaker(engine)) as db:
        deployment = db.scalar(select(ModelDeployment).where(ModelDeployment.number == number))
        assert deployment is not None
        deployment.replicas = 2
        project_id = db.scalar(select(Workload.project_id).where(Workload.kind == "build"))
        assert project_id is not None
        crashed, _ = queue_replica(db, deployment, project_id, slot=0, restarts=0)
        crashed.created_at, crashed.started_at, crashed.ended_at = T0, T0, T0 + dt.timedelta(1)
        crashed.state, crashed.reason, crashed.exit_code = "failed", "exited with code 3", 3
        serving, row = queue_replica(db, deployment, project_id, slot=0, restarts=1)
        serving.created_at = T0 + dt.timedelta(days=1, seconds=2)
        serving.started_at = serving.created_at
        serving.state, serving.endpoint = "running", "127.0.0.1:9"
        row.ready, row.ready_at = True, T0 + dt.timedelta(days=1, seconds=3)
        waiting, _ = queue_replica(db, deployment, project_id, slot=1, restarts=0)
        waiting.state, waiting.reason = "waiting", "waiting for quota: alice uses 4 of 4 CPUs"
        return {"crashed": crashed.id, "serving": serving.id, "waiting": waiting.id}


def served_model(client: TestClient, alice: Account, engine: Engine) -> tuple[str, dict[str, str]]:
    project = make_project(client, alice)
    create(client, project, alice)
    built(client, project, alice, engine)
    deploy(client, project, alice, replicas=2)
    mark_serving(engine, 1)
    return project, record_replicas(engine, 1)


def test_replicas_with_readiness_restarts_and_the_last_exit(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project, ids = served_model(client, alice, engine)
    listed = client.get(f"{project}{M}/replicas", headers=alice.headers)
    assert listed.status_code == 200, listed.text
    first, second = listed.json()
    assert first == {
        "id": ids["serving"],
        "deployment": 1,
        "build": 1,
        "slot": 0,
        "state": "running",
        "reason": "",
        "ready": True,
        "ready_since": "2026-12-02T09:00:03Z",
        "restarts": 1,
        "exit_code": None,
        "last_exit_reason": "exited with code 3",
        "last_exit_at": "2026-12-02T09:00:00Z",
        "previous": ids["crashed"],
        "created_at": "2026-12-02T09:00:02Z",
        "started_at": "2026-12-02T09:00:02Z",
        "ended_at": None,
    }
    assert (second["id"], second["slot"], second["state"]) == (ids["waiting"], 1, "waiting")
    assert second["ready"] is False and second["ready_since"] is None
    assert second["reason"].startswith("waiting for quota")
    assert second["last_exit_reason"] is None and second["previous"] is None
    # A deployment's own list is the same here; the crashed one is read by its id.
    of_deployment = client.get(f"{project}{M}/deployments/1/replicas", headers=alice.headers)
    assert of_deployment.json() == listed.json()
    old = client.get(f"{project}{M}/replicas/{ids['crashed']}", headers=alice.headers).json()
    assert (old["state"], old["exit_code"], old["last_exit_reason"]) == (
        "failed",
        3,
        "exited with code 3",
    )
    # Never started: an empty log (nothing to ask the runner for).
    log = client.get(f"{project}{M}/replicas/{ids['waiting']}/logs", headers=alice.headers)
    assert (log.status_code, log.text) == (200, "")
    assert log.headers["content-type"].startswith("text/plain")

    # Scaled down to one: slot 1's replica leaves the list once it ended.
    client.post(f"{project}{M}/scale", json={"replicas": 1}, headers=alice.headers)
    with transaction(make_sessionmaker(engine)) as db:
        waiting = db.get(Workload, ids["waiting"])
        assert waiting is not None
        waiting.state, waiting.reason = "stopped", "not needed any more"
    listed = client.get(f"{project}{M}/replicas", headers=alice.headers).json()
    assert [r["id"] for r in listed] == [ids["serving"]]
    # Stopped and ended: the model has no replicas now; its deployment still shows its last.
    client.post(f"{project}{M}/stop", headers=alice.headers)
    with transaction(make_sessionmaker(engine)) as db:
        serving = db.get(Workload, ids["serving"])
        assert serving is not None
        serving.state, serving.reason = "stopped", "drained"
        stopped = db.scalar(select(ModelDeployment))  # what the keeper does once drained
        assert stopped is not None and stopped.state == "draining"
        stopped.state = "stopped"
    assert client.get(f"{project}{M}/replicas", headers=alice.headers).json() == []
    last = client.get(f"{project}{M}/deployments/1/replicas", headers=alice.headers).json()
    assert [(r["id"], r["last_exit_reason"]) for r in last] == [
        (ids["serving"], "drained"),
        (ids["waiting"], "not needed any more"),
    ]


def test_the_models_urls_and_serving_deployment(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    got = client.get(f"{project}{M}", headers=alice.headers).json()
    assert got["endpoint_url"] == "https://modelservice.kiln.localhost/model"
    assert got["protocols_url"] == "https://modelservice.kiln.localhost/alice/demo/adder/"
    assert got["serving_deployment"] is None
    built(client, project, alice, engine)
    deploy(client, project, alice)
    mark_serving(engine, 1)
    listed = client.get(f"{project}/models", headers=alice.headers).json()["items"]
    assert listed[0]["serving_deployment"] == 1


def test_the_audit_log_records_builds_deployments_scaling_and_stops(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    built(client, project, alice, engine)
    built(client, project, alice, engine)
    deploy(client, project, alice, build=2)
    mark_serving(engine, 1)
    deploy(client, project, alice, build=1, replicas=2)  # a rollback
    client.post(f"{project}{M}/scale", json={"replicas": 3}, headers=alice.headers)
    client.post(f"{project}{M}/stop", headers=alice.headers)
    with make_sessionmaker(engine)() as db:
        events = list(
            db.scalars(
                select(AuditEvent)
                .where(AuditEvent.action.like("model.%"), AuditEvent.action != "model.create")
                .order_by(AuditEvent.id)
            )
        )
    assert {e.actor_name for e in events} == {"alice"}
    assert {e.target for e in events} == {"project:alice/demo"}
    assert [(e.action, e.details) for e in events] == [
        ("model.build", {"model": "adder", "build": 1}),
        ("model.build", {"model": "adder", "build": 2}),
        ("model.deploy", {"model": "adder", "deployment": 1, "build": 2, "replicas": 1}),
        ("model.deploy", {"model": "adder", "deployment": 2, "build": 1, "replicas": 2}),
        ("model.scale", {"model": "adder", "replicas": 3}),
        ("model.stop", {"model": "adder"}),
    ]


def test_strangers_viewers_other_projects_and_bad_input(
    client: TestClient, alice: Account, bob: Account, engine: Engine
) -> None:
    project, ids = served_model(client, alice, engine)
    paths = [
        f"{M}/replicas",
        f"{M}/deployments/1/replicas",
        f"{M}/replicas/{ids['serving']}",
        f"{M}/replicas/{ids['waiting']}/logs",
    ]
    for path in paths:  # a stranger cannot tell the model or its replicas exist
        problem(client.get(f"{project}{path}", headers=bob.headers), 404, "not found")
    share(client, project, alice, bob, "viewer")
    for path in paths:  # viewers read replicas and their logs...
        assert client.get(f"{project}{path}", headers=bob.headers).status_code == 200, path
    # ...but change nothing of the model.
    for method, path, body in (
        ("POST", f"{M}/scale", {"replicas": 1}),
        ("POST", f"{M}/stop", None),
        ("POST", f"{M}/deployments", {}),
    ):
        response = client.request(method, f"{project}{path}", json=body, headers=bob.headers)
        assert response.status_code == 403, (path, response.text)
    # Bob's own project, with a model of the same name, does not reach alice's replicas.
    mine = make_project(client, bob, "mine")
    create(client, mine, bob)
    for path in paths[2:]:
        problem(client.get(f"{mine}{path}", headers=bob.headers), 404, "has no replica")
    problem(client.get(f"{mine}{paths[1]}", headers=bob.headers), 404, "has no deployment 1")
    # Unknown ids and wrong types.
    unknown: list[tuple[str, int, str]] = [
        (f"{M}/replicas/0123456789abcdef", 404, "has no replica '0123456789abcdef'"),
        (f"{M}/replicas/not%20an%20id", 404, "has no replica"),
        (f"{M}/replicas/{'a' * 65}", 422, ""),
        (f"{M}/replicas/0123456789abcdef/logs", 404, "has no replica"),
        (f"{M}/deployments/7/replicas", 404, "has no deployment 7"),
        (f"{M}/deployments/0/replicas", 422, ""),
        (f"{M}/deployments/one/replicas", 422, ""),
        ("/models/nope/replicas", 404, "no model 'nope'"),
        (f"{M}/replicas/{ids['waiting']}/logs?offset=-1", 422, ""),
        (f"{M}/replicas/{ids['waiting']}/logs?follow=maybe", 422, ""),
    ]
    for path, status, words in unknown:
        problem(client.get(f"{project}{path}", headers=alice.headers), status, words)
