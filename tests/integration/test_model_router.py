"""The model router end to end: CML's POST /model through Kiln's app to real model-server
processes standing in as replicas (the runner's part — starting them and recording them
ready — is done by the test: ``model_support.serve_from``). Auth, bad bodies, balancing,
a dead replica, no replica, the call timeout. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kiln.settings import Settings
from kiln.testing.live import free_port
from tests.conftest import Account
from tests.integration.model_support import serve_from
from tests.integration.test_sessions_support import make_project, share

HOST = {"Host": "modelservice.kiln.localhost"}
KEYS = "/api/v1/auth/model-api-keys"


def model_key(client: TestClient, who: Account) -> str:
    response = client.post(KEYS, json={"name": "calls"}, headers=who.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def new_model(client: TestClient, who: Account, function: str = "predict") -> str:
    project = make_project(client, who)
    body = {"name": "adder", "file": "model.py", "function": function}
    response = client.post(f"{project}/models", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["access_key"])


def call(
    client: TestClient,
    body: Any,
    key: str | None,
    path: str = "/model",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    sent = {**(headers if headers is not None else HOST)}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    return client.post(path, json=body, headers=sent, **kwargs)


def refused(response: Any, status: int, words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["success"] is False and words in body["detail"], body
    assert body["response"] == {"message": body["detail"]}
    return body


def test_a_call_with_cmls_contract(
    client: TestClient, alice: Account, engine: Engine, replicas: Any
) -> None:
    access_key = new_model(client, alice)
    serve_from(engine, "adder", replicas(1))
    key = model_key(client, alice)
    response = call(client, {"accessKey": access_key, "request": {"a": 2, "b": 3}}, key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["response"]["sum"] == 5
    assert body["ReplicaID"] == "replica0"
    # The access key in the query, and the main host's path for set-ups without wildcard DNS.
    response = client.post(
        f"/modelservice/model?accessKey={access_key}",
        json={"request": {"a": 1, "b": 1}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200 and response.json()["response"]["sum"] == 2


def test_who_may_call(
    client: TestClient, alice: Account, bob: Account, engine: Engine, replicas: Any
) -> None:
    access_key = new_model(client, alice)
    serve_from(engine, "adder", replicas(1))
    body = {"accessKey": access_key, "request": {"a": 1, "b": 2}}
    no_key = refused(call(client, body, None), 401, "this model needs authentication")
    assert "kilnm_" in no_key["detail"]
    response = call(client, body, None)
    assert response.headers["www-authenticate"] == "Bearer"
    refused(call(client, body, alice.key), 401, "that is not a model API key")
    refused(call(client, body, "kilnm_nonsense"), 401, "the model API key is not valid")
    bobs = model_key(client, bob)
    refused(call(client, body, bobs), 403, "bob may not call models of alice/demo")
    wrong = {"accessKey": "x" * 32, "request": {}}
    refused(call(client, wrong, model_key(client, alice)), 401, "names no model")
    refused(call(client, {"request": {}}, bobs), 401, "names its model by its access key")
    # Bob becomes a viewer: his key calls at once (refusals are never cached).
    share(client, "/api/v1/projects/alice/demo", alice, bob, "viewer")
    assert call(client, body, bobs).status_code == 200
    # Revoked: refused once the router's short cache of decisions lapsed (seconds).
    key_id = client.get(KEYS, headers=bob.headers).json()[0]["id"]
    assert client.delete(f"{KEYS}/{key_id}", headers=bob.headers).status_code == 204
    time.sleep(2.1)
    refused(call(client, body, bobs), 401, "revoked")


def test_bad_bodies_are_refused_before_any_replica(
    client: TestClient, alice: Account, engine: Engine, settings: Settings, replicas: Any
) -> None:
    access_key = new_model(client, alice)
    serve_from(engine, "adder", replicas(1))
    key = model_key(client, alice)
    auth = {**HOST, "Authorization": f"Bearer {key}"}
    for raw, status, words in (
        (b"nope", 400, "not JSON"),
        (b"[1]", 400, "must be a JSON object"),
        (b'{"accessKey": "k"}', 400, 'no "request"'),
        (b'{"accessKey": 5, "request": 1}', 400, "accessKey must be a string"),
        (b'{"request": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "nested too deeply"),
        (b"\xff\xfe", 400, "not UTF-8"),
    ):
        refused(client.post("/model", content=raw, headers=auth), status, words)
    settings.models.max_body_bytes = 1000
    big = {"accessKey": access_key, "request": "x" * 2000}
    refused(call(client, big, key), 413, "the limit is 1000")
    refused(client.get("/model", headers=HOST), 405, "POST /model")
    refused(call(client, {}, key, path="/elsewhere"), 404, "no such endpoint")


def test_calls_spread_over_replicas_and_skip_a_dead_one(
    client: TestClient, alice: Account, engine: Engine, replicas: Any
) -> None:
    access_key = new_model(client, alice)
    endpoints = replicas(2)
    endpoints["replica-gone"] = f"127.0.0.1:{free_port()}"  # recorded ready, refuses
    serve_from(engine, "adder", endpoints)
    key = model_key(client, alice)
    body = {"accessKey": access_key, "request": {"a": 1, "b": 1}}
    seen = set()
    for _ in range(12):
        response = call(client, body, key)
        assert response.status_code == 200, response.text
        seen.add(response.json()["ReplicaID"])
    assert seen == {"replica0", "replica1"}


def test_errors_of_the_function_pass_through(
    client: TestClient, alice: Account, engine: Engine, replicas: Any
) -> None:
    access_key = new_model(client, alice, function="refuse")
    serve_from(engine, "adder", replicas(1, "refuse"))
    response = call(client, {"accessKey": access_key, "request": {}}, model_key(client, alice))
    assert response.status_code == 422
    assert response.json() == {
        "success": False,
        "response": {"message": "a must be positive", "type": "BadInput"},
        "ReplicaID": "replica0",
    }


def test_no_ready_replica_is_a_503_after_the_queue_time(
    client: TestClient, alice: Account, engine: Engine, settings: Settings
) -> None:
    access_key = new_model(client, alice)
    settings.models.queue_seconds = 0.5
    key = model_key(client, alice)
    began = time.monotonic()
    body = refused(
        call(client, {"accessKey": access_key, "request": {}}, key), 503, "no ready replica"
    )
    assert time.monotonic() - began >= 0.5 and body["status"] == 503
    response = call(client, {"accessKey": access_key, "request": {}}, key)
    assert response.headers["retry-after"] == "5"


def test_a_call_past_the_timeout_is_a_504(
    client: TestClient, alice: Account, engine: Engine, settings: Settings, replicas: Any
) -> None:
    access_key = new_model(client, alice, function="slow")
    serve_from(engine, "adder", replicas(1, "slow"))
    settings.models.call_timeout_seconds = 0.5
    key = model_key(client, alice)
    response = call(client, {"accessKey": access_key, "request": {"seconds": 2}}, key)
    refused(response, 504, "longer than 0.5 s")
    fast = call(client, {"accessKey": access_key, "request": {"seconds": 0}}, key)
    assert fast.status_code == 200, fast.text
