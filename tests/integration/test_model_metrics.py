"""Tracked model metrics (``cml.metrics_v1``) end to end, on SQLite and PostgreSQL.

- A real model server run from the model image's own serving layer (``serving_tar``
  extracted, by a Python that cannot see Kiln: ``-I -S``) imports ``cml.models_v1`` from
  beside itself; a call through the router returns CML's ``prediction``/``uuid``, and what
  ``track_metric`` recorded during it is stored per prediction and read back through the
  API; metrics over the size limit are dropped with a note in the replica's log while the
  prediction answers; a KServe V1 batch keeps each instance's metrics.
- The metrics API: delayed and aggregate metrics, reads by window, UUID and deployment;
  strangers, viewers and another project's model are refused; bad input gets precise 4xx;
  retention deletes old rows.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.build.serving_layer import SERVER_PATH, serving_tar
from kiln.db.engine import make_sessionmaker
from kiln.db.model_metric_models import ModelMetric
from kiln.db.model_models import Model
from kiln.domain import model_metrics
from kiln.testing.live import free_port
from tests.conftest import Account
from tests.integration.model_support import Server, serve_from
from tests.integration.test_model_router import call, model_key, new_model
from tests.integration.test_sessions_support import make_project, share

MODEL = "/api/v1/projects/alice/demo/models/adder"
METRICS = MODEL + "/metrics"

PREDICT = """
import cml.models_v1 as models
import cml.metrics_v1 as metrics


@models.cml_model(metrics=True)
def predict(args):
    metrics.track_metric("input", args)
    if args.get("big"):
        metrics.track_metric("blob", "x" * 70000)
    total = args["a"] + args["b"]
    metrics.track_metric("output", total)
    return {"sum": total}
"""


@pytest.fixture
def image_replica(tmp_path: Path) -> Iterator[Any]:
    """A model server started from the serving layer as an image holds it, by a Python that
    sees only the standard library (no site-packages: no Kiln)."""
    root = tmp_path / "image"
    with tarfile.open(fileobj=io.BytesIO(serving_tar())) as tar:
        tar.extractall(root, filter="data")
    home = tmp_path / "home"
    home.mkdir()
    (home / "model.py").write_text(PREDICT)
    started: list[Server] = []

    def start(deployment: int) -> Server:
        port = free_port()
        argv = [sys.executable, "-I", "-S", str(root / SERVER_PATH.lstrip("/"))]
        argv += ["--file", "model.py", "--function", "predict", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--replica-id", "replica-m"]
        env = {  # what kiln.domain.model_replicas.replica_env gives a replica
            "PATH": os.environ["PATH"],
            "KILN_PROJECT": "alice/demo",
            "KILN_MODEL": "adder",
            "KILN_MODEL_DEPLOYMENT": str(deployment),
        }
        process = subprocess.Popen(
            argv, cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        server = Server(process, port)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.process.kill()
        server.process.wait(timeout=10)
        if server.process.stderr:
            server.process.stderr.close()


def test_metrics_tracked_in_a_replica_are_stored_per_prediction(
    client: TestClient, alice: Account, engine: Engine, image_replica: Any
) -> None:
    access_key = new_model(client, alice)
    replica = image_replica(deployment=1)
    serve_from(engine, "adder", {"replica-m": f"127.0.0.1:{replica.port}"})
    key = model_key(client, alice)
    response = call(client, {"accessKey": access_key, "request": {"a": 2, "b": 3}}, key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["ReplicaID"] == "replica-m"
    answer = body["response"]  # CML's shape of a model with metrics
    assert answer["prediction"] == {"sum": 5}
    assert answer["model_deployment_crn"] == "alice/demo/adder/1"
    uuid = answer["uuid"]
    assert "x-kiln-metrics-length" not in response.headers  # taken off by the router

    found = client.get(METRICS, params={"prediction_uuid": uuid}, headers=alice.headers)
    assert found.status_code == 200, found.text
    (record,) = found.json()["metrics"]
    assert record["metrics"] == {"input": {"a": 2, "b": 3}, "output": 5}
    assert record["modelDeploymentCrn"] == "alice/demo/adder/1" and record["deployment"] == 1
    assert record["modelCrn"] == "alice/demo/adder"
    assert record["startTimeStampMs"] <= record["endTimeStampMs"]

    # The ground truth arrives later (a job with cml.metrics_v1 posts this).
    delayed = {"prediction_uuid": uuid, "metrics": {"actual": 6}}
    assert client.post(METRICS, json=delayed, headers=alice.headers).status_code == 201
    (record,) = client.get(METRICS, headers=alice.headers).json()["metrics"]
    assert record["metrics"] == {"input": {"a": 2, "b": 3}, "output": 5, "actual": 6}

    # KServe V1 calls the function once per instance: each prediction's metrics are kept.
    batch = {"instances": [{"a": 10, "b": 1}, {"a": 20, "b": 2}]}
    path = "/alice/demo/adder/v1/models/adder:predict"
    predicted = call(client, batch, key, path=path)
    assert predicted.status_code == 200, predicted.text
    assert "x-kiln-metrics-length" not in predicted.headers
    uuids = [p["uuid"] for p in predicted.json()["predictions"]]
    outputs = []
    for one in uuids:
        (record,) = client.get(
            METRICS, params={"prediction_uuid": one}, headers=alice.headers
        ).json()["metrics"]
        outputs.append(record["metrics"]["output"])
    assert outputs == [11, 22]

    # Over 64 KB: the call answers, its metrics are dropped, the replica's log says so.
    big = call(client, {"accessKey": access_key, "request": {"a": 1, "b": 1, "big": True}}, key)
    assert big.status_code == 200 and big.json()["response"]["prediction"] == {"sum": 2}
    big_uuid = big.json()["response"]["uuid"]
    (kept,) = client.get(
        METRICS, params={"prediction_uuid": big_uuid}, headers=alice.headers
    ).json()["metrics"]
    assert kept["metrics"] == {}
    assert "are dropped (the prediction is not)" in replica.output()


def _seed(engine: Engine, client: TestClient, who: Account) -> list[str]:
    """Three predictions of alice/demo/adder at 1000, 2000 and 3000 ms."""
    new_model(client, who)
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        model = db.scalar(select(Model).where(Model.name == "adder"))
        assert model is not None
        found = [
            model_metrics.Prediction(f"00000000-0000-4000-8000-00000000000{i}", ms, ms + 5, m)
            for i, (ms, m) in enumerate(((1000, {"x": 1}), (2000, {"x": 2}), (3000, {"x": 3})))
        ]
        assert model_metrics.store_predictions(db, model.id, "no-such-replica", found) == 3
        assert model_metrics.store_predictions(db, model.id, "no-such-replica", found) == 0
    return [p.uuid for p in found]


def test_the_metrics_api_reads_windows_and_takes_delayed_and_aggregate_metrics(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    uuids = _seed(engine, client, alice)
    h = alice.headers
    window = client.get(METRICS, params={"start_ms": 1500, "end_ms": 3000}, headers=h).json()
    assert [r["predictionUuid"] for r in window["metrics"]] == uuids[1:]
    page = client.get(METRICS, params={"limit": 2}, headers=h).json()
    assert len(page["metrics"]) == 2 and page["next_cursor"]
    rest = client.get(METRICS, params={"cursor": page["next_cursor"]}, headers=h).json()
    assert [r["predictionUuid"] for r in rest["metrics"]] == uuids[2:]

    aggregate = {"start_timestamp_ms": 1000, "end_timestamp_ms": 3000, "metrics": {"acc": 0.5}}
    made = client.post(METRICS, json=aggregate, headers=h)
    assert made.status_code == 201, made.text
    assert made.json()["predictionUuid"] is None and made.json()["deployment"] is None
    everything = client.get(METRICS, headers=h).json()["metrics"]
    assert everything[-1]["metrics"] == {"acc": 0.5}

    delayed = {"prediction_uuid": uuids[0], "metrics": {"x": 10, "truth": 1}}
    assert client.post(METRICS, json=delayed, headers=h).json()["metrics"] == {
        "x": 10,
        "truth": 1,
    }

    # Retention: rows that started before the cut are deleted.
    with make_sessionmaker(engine)() as db:
        day = model_metrics.DAY_MS
        assert model_metrics.prune(db, 1, now_ms=day + 1500) == 2  # 1000 and the aggregate
        assert db.scalar(select(func.count()).select_from(ModelMetric)) == 2


def test_bad_input_to_the_metrics_api_is_refused_precisely(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    uuids = _seed(engine, client, alice)
    h = alice.headers
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"metrics": {"a": 1}}, 422, "give prediction_uuid"),
        ({"metrics": {"a": 1}, "start_timestamp_ms": 5}, 422, "both start_timestamp_ms"),
        (
            {"metrics": {}, "prediction_uuid": uuids[0], "start_timestamp_ms": 1},
            422,
            "name their prediction only",
        ),
        ({"metrics": {}, "prediction_uuid": "nope"}, 422, "is not a UUID"),
        (
            {"metrics": {}, "prediction_uuid": "00000000-0000-4000-8000-0000000000ff"},
            404,
            "has no prediction",
        ),
        ({"metrics": {"a": "x" * 70_000}, "prediction_uuid": uuids[0]}, 413, "65536"),
        ({"metrics": [1], "prediction_uuid": uuids[0]}, 422, ""),
        ({"metrics": {"a": deep}, "prediction_uuid": uuids[0]}, 422, "nested more than 100"),
        ({"metrics": {"": 1}, "prediction_uuid": uuids[0]}, 422, ""),
        (
            {"metrics": {}, "start_timestamp_ms": 9, "end_timestamp_ms": 3},
            422,
            "before start_timestamp_ms",
        ),
        (
            {"metrics": {}, "start_timestamp_ms": "1", "end_timestamp_ms": 3},
            422,
            "",
        ),
        (
            {"metrics": {}, "start_timestamp_ms": 1, "end_timestamp_ms": 3, "deployment": 9},
            404,
            "has no deployment 9",
        ),
    ]
    for body, status, words in refusals:
        response = client.post(METRICS, json=body, headers=h)
        assert response.status_code == status, (body, response.text)
        assert words in response.text, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    raw = b'{"metrics": {"a": Infinity}, "prediction_uuid": "%s"}' % uuids[0].encode()
    infinite = client.post(METRICS, content=raw, headers={**h, "Content-Type": "application/json"})
    assert infinite.status_code == 422, infinite.text
    for params, status in (
        ({"start_ms": -1}, 422),
        ({"limit": 0}, 422),
        ({"prediction_uuid": "nope"}, 422),
        ({"deployment": 9}, 404),
        ({"cursor": "garbage"}, 422),
    ):
        response = client.get(METRICS, params=params, headers=h)
        assert response.status_code == status, (params, response.text)
    missing = client.get("/api/v1/projects/alice/demo/models/nope/metrics", headers=h)
    assert missing.status_code == 404
    # Nothing was written by the refusals.
    rows = client.get(METRICS, headers=h).json()["metrics"]
    assert [r["metrics"] for r in rows] == [{"x": 1}, {"x": 2}, {"x": 3}]


def test_strangers_viewers_and_other_projects_are_refused(
    client: TestClient, alice: Account, bob: Account, engine: Engine
) -> None:
    uuids = _seed(engine, client, alice)
    delayed = {"prediction_uuid": uuids[0], "metrics": {"truth": 1}}
    assert client.get(METRICS, headers=bob.headers).status_code == 404
    assert client.post(METRICS, json=delayed, headers=bob.headers).status_code == 404
    assert client.get(METRICS).status_code == 401
    share(client, "/api/v1/projects/alice/demo", alice, bob, "viewer")
    assert len(client.get(METRICS, headers=bob.headers).json()["metrics"]) == 3
    assert client.post(METRICS, json=delayed, headers=bob.headers).status_code == 403
    # Bob's own model of the same name cannot reach alice's predictions, nor read them.
    project = make_project(client, bob)
    body = {"name": "adder", "file": "model.py", "function": "predict"}
    assert client.post(f"{project}/models", json=body, headers=bob.headers).status_code == 201
    his = f"{project}/models/adder/metrics"
    assert client.post(his, json=delayed, headers=bob.headers).status_code == 404
    assert client.get(his, headers=bob.headers).json()["metrics"] == []
    (first, *_) = client.get(METRICS, headers=alice.headers).json()["metrics"]
    assert first["metrics"] == {"x": 1}  # untouched
