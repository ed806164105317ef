"""KServe V1, Open Inference V2 and MLflow's scoring server through the model router to real
model-server processes (``model_support``), under ``/{owner}/{project}/{model}/`` on the
model host and under ``/modelservice/`` on the main host: the same function, the same keys,
balancing and limits as CML's ``POST /model``. The last test calls over HTTPS with a real
Open Inference client (``tritonclient``) and MLflow's and KServe's documented examples."""

from __future__ import annotations

import json
import ssl
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from tritonclient import http as triton
from tritonclient.utils import InferenceServerException

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model
from kiln.settings import Settings
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.model_support import serve_from
from tests.integration.test_model_router import HOST, model_key, new_model
from tests.integration.test_sessions_support import share

PREFIX = "/alice/demo/adder"
PREDICT = f"{PREFIX}/v1/models/adder:predict"
INFER = f"{PREFIX}/v2/models/adder/infer"
INVOCATIONS = f"{PREFIX}/invocations"
# The function the replicas serve: {"a", "b"} → {"sum"}, numbers or lists (model_support.add).
TENSORS = {
    "id": "call-1",
    "inputs": [
        {"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 2]},
        {"name": "b", "shape": [2], "datatype": "INT64", "data": [10, 20]},
    ],
}


def auth(key: str | None) -> dict[str, str]:
    return {**HOST, **({"Authorization": f"Bearer {key}"} if key else {})}


def refused(response: Any, status: int, words: str) -> dict[str, Any]:
    """A router's refusal of a protocol call: problem+json with the protocol's members."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert words in body["detail"], body
    return body


@pytest.fixture
def adder(client: TestClient, alice: Account, engine: Engine, replicas: Any) -> str:
    """alice/demo/adder served by two replicas; alice's model API key."""
    new_model(client, alice, function="add")
    serve_from(engine, "adder", replicas(2, "add"))
    return model_key(client, alice)


def test_each_protocol_reaches_the_function(client: TestClient, adder: str) -> None:
    instances = [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    response = client.post(PREDICT, json={"instances": instances}, headers=auth(adder))
    assert response.status_code == 200, response.text
    assert [p["sum"] for p in response.json()["predictions"]] == [3, 7]
    # The main host's path, for set-ups without wildcard DNS.
    main = {"Authorization": f"Bearer {adder}"}
    response = client.post(f"/modelservice{PREDICT}", json={"instances": instances}, headers=main)
    assert response.status_code == 200, response.text

    response = client.post(INFER, json=TENSORS, headers=auth(adder))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "call-1" and answer["model_name"] == "adder"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["sum"] == {"name": "sum", "shape": [2], "datatype": "INT64", "data": [11, 22]}

    split = {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [5, 5]]}}
    response = client.post(INVOCATIONS, json=split, headers=auth(adder))
    assert response.status_code == 200, response.text
    assert [p["sum"] for p in response.json()["predictions"]] == [3, 10]

    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/adder/ready", "/ping"):
        assert client.get(PREFIX + path, headers=auth(adder)).status_code == 200, path
    metadata = client.get(f"{PREFIX}/v2/models/adder", headers=auth(adder)).json()
    assert metadata["name"] == "adder"
    status = client.get(f"{PREFIX}/v1/models/adder", headers=auth(adder))
    assert status.json() == {"name": "adder", "ready": True}


def test_the_replicas_refuse_bad_calls_in_the_protocols_shape(
    client: TestClient, adder: str
) -> None:
    response = client.post(
        INVOCATIONS, content=b"a,b\n1,2", headers={**auth(adder), "Content-Type": "text/csv"}
    )
    assert response.status_code == 415
    assert response.json()["error_code"] == "BAD_REQUEST"
    response = client.post(INFER, json={"inputs": [{"name": "a"}]}, headers=auth(adder))
    assert response.status_code == 400 and 'no "shape"' in response.json()["error"]
    wrong_name = f"{PREFIX}/v1/models/other:predict"
    response = client.post(wrong_name, json={"instances": []}, headers=auth(adder))
    assert response.status_code == 404 and "no model named 'other'" in response.json()["error"]
    response = client.post(PREDICT, content=b"{nope", headers=auth(adder))
    assert response.status_code == 400 and "not JSON" in response.json()["error"]
    # Triton's binary tensors: their header is passed on, so the replica reads them.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": [1],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 4},
                }
                for n in ("a", "b")
            ]
        }
    ).encode()
    binary = {
        **auth(adder),
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    body = header + struct.pack("<2i", 40, 2)
    response = client.post(INFER, content=body, headers=binary)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [42]
    response = client.post(INFER, content=body[:-1], headers=binary)
    assert response.status_code == 400 and "past the end" in response.json()["error"]
    # The function's own errors: {"a", "b"} missing is a KeyError in the function, a 500.
    response = client.post(PREDICT, json={"instances": [{"a": 1}]}, headers=auth(adder))
    assert response.status_code == 500 and "KeyError" in response.json()["error"]


def test_the_router_refuses_in_the_protocols_shape(
    client: TestClient, adder: str, settings: Settings
) -> None:
    body = refused(client.get(f"{PREFIX}", headers=auth(adder)), 404, "no such endpoint")
    assert "error" not in body  # not a protocol's path: CML's problem
    response = client.put(INVOCATIONS, json={}, headers=auth(adder))
    refused(response, 405, "GET and POST")
    assert response.headers["allow"] == "GET, POST"
    response = client.get(INVOCATIONS, headers=auth(adder))  # the replica's own 405
    assert response.status_code == 405 and response.json()["error_code"] == "BAD_REQUEST"
    settings.models.max_body_bytes = 100
    big = {"instances": ["x" * 200]}
    body = refused(client.post(PREDICT, json=big, headers=auth(adder)), 413, "the limit is 100")
    assert body["error"] == body["detail"]
    body = refused(client.post(INVOCATIONS, json=big, headers=auth(adder)), 413, "limit")
    assert body["error_code"] == "REQUEST_LIMIT_EXCEEDED" and body["message"] == body["detail"]


def test_who_may_call_by_path(
    client: TestClient, alice: Account, bob: Account, engine: Engine, adder: str
) -> None:
    instances = {"instances": [{"a": 1, "b": 1}]}
    no_key = refused(client.post(PREDICT, json=instances, headers=auth(None)), 401, "kilnm_")
    assert no_key["error"] == no_key["detail"]
    response = client.post(PREDICT, json=instances, headers=auth(None))
    assert response.headers["www-authenticate"] == "Bearer"
    refused(
        client.post(PREDICT, json=instances, headers=auth(alice.key)),
        401,
        "that is not a model API key",
    )
    refused(client.post(PREDICT, json=instances, headers=auth("kilnm_x")), 401, "not valid")
    # A stranger's key, and unknown owners, projects and models: one answer, so a stranger
    # learns nothing of what exists.
    bobs = model_key(client, bob)
    answers = set()
    for path in (
        PREDICT,
        "/alice/demo/nothing/v1/models/nothing:predict",
        "/alice/nothing/adder/v1/models/adder:predict",
        "/nobody/demo/adder/v1/models/adder:predict",
    ):
        response = client.post(path, json=instances, headers=auth(bobs))
        body = refused(response, 404, "there is no model")
        answers.add(body["title"])
    assert answers == {"Not found"}
    without_key = client.post(
        "/alice/demo/nothing/v1/models/x:predict", json=instances, headers=HOST
    )
    assert without_key.status_code == 401  # the same as for a model that exists
    # Bob becomes a viewer of the project: his key calls at once (refusals are not cached).
    share(client, "/api/v1/projects/alice/demo", alice, bob, "viewer")
    assert client.post(PREDICT, json=instances, headers=auth(bobs)).status_code == 200


def test_unauthenticated_models_by_path(
    client: TestClient, engine: Engine, settings: Settings, adder: str
) -> None:
    with transaction(make_sessionmaker(engine)) as db:
        model = db.scalar(select(Model).where(Model.name == "adder"))
        assert model is not None
        model.allow_unauthenticated = True
    response = client.post(INVOCATIONS, json={"instances": [{"a": 1, "b": 2}]}, headers=HOST)
    assert response.status_code == 401  # the site does not allow it
    assert response.json()["error_code"] == "UNAUTHENTICATED"
    settings.models.allow_unauthenticated = True
    response = client.post(INVOCATIONS, json={"instances": [{"a": 1, "b": 2}]}, headers=HOST)
    assert response.status_code == 200 and response.json()["predictions"][0]["sum"] == 3


def test_a_renamed_model_answers_to_its_new_name(
    client: TestClient, alice: Account, adder: str
) -> None:
    project = "/api/v1/projects/alice/demo"
    response = client.patch(
        f"{project}/models/adder", json={"name": "summer"}, headers=alice.headers
    )
    assert response.status_code == 200, response.text
    path = "/alice/demo/summer/v1/models/summer:predict"
    response = client.post(path, json={"instances": [{"a": 2, "b": 2}]}, headers=auth(adder))
    assert response.status_code == 200, response.text
    refused(client.post(PREDICT, json={"instances": []}, headers=auth(adder)), 404, "no model")


@pytest.mark.one_database  # real clients over HTTPS; the rules are tested on both above
def test_real_clients_over_https(live: LiveServer, adder: str) -> None:
    host = live.url.removeprefix("https://").rstrip("/")
    url = f"{host}/modelservice{PREFIX}"  # the client's base path
    bearer = {"Authorization": f"Bearer {adder}"}
    ca = {"ca_certs": str(live.ca_file)}
    with triton.InferenceServerClient(url, ssl=True, ssl_options=ca) as client:
        assert client.is_server_live(headers=bearer) and client.is_server_ready(headers=bearer)
        assert client.is_model_ready("adder", headers=bearer)
        assert client.get_model_metadata("adder", headers=bearer)["name"] == "adder"
        # One tensor as JSON, one in the client's default binary encoding.
        inputs = []
        for name, values, binary in (("a", [1.5, 2.0], False), ("b", [0.5, 1.0], True)):
            tensor = triton.InferInput(name, [2], "FP32")
            tensor.set_data_from_numpy(np.array(values, dtype=np.float32), binary_data=binary)
            inputs.append(tensor)
        # A copy: the client adds its Inference-Header-Content-Length to the dict it is given.
        result = client.infer("adder", inputs, request_id="r-7", headers=dict(bearer))
        assert result.as_numpy("sum").tolist() == [2.0, 3.0]
        assert result.get_response()["id"] == "r-7"
        with pytest.raises(InferenceServerException) as refusal:
            client.infer("adder", inputs, headers={"Authorization": "Bearer kilnm_wrong"})
        assert "not valid" in str(refusal.value) and refusal.value.status() == "401"

    base = f"{live.url}modelservice{PREFIX}"
    with httpx.Client(
        verify=ssl.create_default_context(cafile=live.ca_file), headers=bearer, timeout=30
    ) as web:
        # MLflow's documented request shapes (`mlflow models serve`, /invocations).
        for body in (
            {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}},
            {"dataframe_records": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]},
            {"instances": [{"a": 1, "b": 2}, {"a": 3, "b": 4}]},
            {"inputs": {"a": [1, 3], "b": [2, 4]}},
        ):
            response = web.post(
                f"{base}/invocations",
                content=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 200, response.text
            assert [p["sum"] for p in response.json()["predictions"]] == [3, 7]
        assert web.get(f"{base}/ping").status_code == 200
        # KServe V1's documented predict request.
        response = web.post(
            f"{base}/v1/models/adder:predict", json={"instances": [{"a": 5, "b": 5}]}
        )
        assert response.status_code == 200 and response.json()["predictions"][0]["sum"] == 10
