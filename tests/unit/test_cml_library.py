"""The in-workload CML library (``cml.models_v1``, ``cml.metrics_v1``, ``cdsw``): the
in-memory store of sessions and jobs, the decorator's prediction UUIDs, the hand-over to the
model server in a replica, the size limit, precise refusals of bad input, and the HTTP calls
(``call_model``, delayed/aggregate metrics and reads of a deployed model) against a stand-in
for Kiln that checks what they send."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import cdsw
import cml.metrics_v1 as metrics
import cml.models_v1 as models
from cml import _core
from kiln.serving import model_server


@pytest.fixture(autouse=True)
def _fresh_store() -> Iterator[None]:
    _core.STORE.clear()
    _core._warned_outside.clear()
    yield
    _core.STORE.clear()
    sys.modules.pop(model_server.METRICS_HOOK, None)


@models.cml_model(metrics=True)
def predict(args: dict[str, Any]) -> float:
    metrics.track_metric("input", args)
    metrics.track_metric("output", args["x"] * 2)
    return float(args["x"] * 2)


def test_in_a_session_each_call_gets_a_uuid_and_its_metrics_are_read_back() -> None:
    start = _core.now_ms()
    first, second = predict({"x": 1}), predict({"x": 2})
    assert first["prediction"] == 2.0 and second["prediction"] == 4.0
    assert first["uuid"] != second["uuid"]
    assert first["model_deployment_crn"] == _core.DEV_DEPLOYMENT
    found = metrics.read_metrics(first["model_deployment_crn"], start, _core.now_ms())
    records = found["metrics"]
    assert [r["predictionUuid"] for r in records] == [first["uuid"], second["uuid"]]
    assert records[0]["metrics"] == {"input": {"x": 1}, "output": 2}
    assert records[0]["startTimeStampMs"] <= records[0]["endTimeStampMs"]
    # Ground truth arrives later, by UUID only (it is this process's prediction).
    metrics.track_delayed_metrics({"actual": 2.5}, first["uuid"])
    again = metrics.read_metrics(dev=True, prediction_uuid=first["uuid"])["metrics"]
    assert again[0]["metrics"] == {"input": {"x": 1}, "output": 2, "actual": 2.5}
    metrics.track_aggregate_metrics({"accuracy": 0.5}, start, _core.now_ms(), dev=True)
    aggregate = metrics.read_metrics(dev=True)["metrics"][-1]
    assert aggregate["metrics"] == {"accuracy": 0.5} and aggregate["predictionUuid"] is None
    assert metrics.read_metrics(dev=True, end_timestamp_ms=start - 1) == {"metrics": []}


def test_a_plain_decorator_leaves_calls_alone_and_track_metric_outside_records_alone() -> None:
    @models.cml_model
    def plain(args: Any) -> Any:
        return args

    assert plain({"a": 1}) == {"a": 1}
    metrics.track_metric("loss", 0.25)
    (record,) = metrics.read_metrics()["metrics"]
    assert record["metrics"] == {"loss": 0.25} and record["predictionUuid"]


def test_concurrent_calls_keep_their_own_metrics() -> None:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        out = predict({"x": n})
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_uuid = {r["predictionUuid"]: r for r in metrics.read_metrics()["metrics"]}
    assert len(by_uuid) == 20
    for out in results:
        assert by_uuid[out["uuid"]]["metrics"]["output"] == out["prediction"]


def test_the_cdsw_names_are_the_same_functions() -> None:
    assert cdsw.track_metric is metrics.track_metric
    assert cdsw.read_metrics is metrics.read_metrics
    assert cdsw.call_model is models.call_model

    @cdsw.model_metrics
    def old(args: Any) -> Any:
        cdsw.track_metric("seen", True)
        return "ok"

    out = old({})
    assert out["prediction"] == "ok"
    assert cdsw.read_metrics(prediction_uuid=out["uuid"])["metrics"][0]["metrics"] == {"seen": True}


def test_over_the_size_limit_a_calls_metrics_are_dropped_not_the_prediction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    @models.cml_model(metrics=True)
    def big(args: Any) -> str:
        metrics.track_metric("blob", "x" * (_core.MAX_METRICS_BYTES + 1))
        return "answer"

    out = big({})
    assert out["prediction"] == "answer"
    (record,) = metrics.read_metrics(prediction_uuid=out["uuid"])["metrics"]
    assert record["metrics"] == {}
    assert "over the limit of 65536: they are dropped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit is 65536"):
        metrics.track_delayed_metrics({"blob": "y" * 70_000}, out["uuid"])


def test_bad_input_is_refused_precisely() -> None:
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: metrics.track_metric(3, 1), TypeError, "key must be a string"),
        (lambda: metrics.track_metric("", 1), ValueError, "1-200 characters"),
        (lambda: metrics.track_metric("k", object()), TypeError, "object is not JSON"),
        (lambda: metrics.track_metric("k", float("nan")), ValueError, "NaN"),
        (lambda: metrics.track_delayed_metrics([1], "u"), TypeError, "must be a dict"),
        (lambda: metrics.track_delayed_metrics({}, "nope"), ValueError, "is not a UUID"),
        (lambda: metrics.track_delayed_metrics({}, 5), TypeError, "must be a string"),
        (
            lambda: metrics.track_aggregate_metrics({}, "0", 1, dev=True),
            TypeError,
            "must be an int",
        ),
        (lambda: metrics.track_aggregate_metrics({}, 5, 1, dev=True), ValueError, "before"),
        (lambda: metrics.read_metrics(start_timestamp_ms=1.5), TypeError, "must be an int"),
        (lambda: metrics.read_metrics(dev="yes"), TypeError, "dev must be True or False"),
        (lambda: metrics.read_metrics(model_deployment_crn=7), TypeError, "must be a string"),
        (lambda: metrics.read_metrics("alice/proj"), ValueError, "not a Kiln model reference"),
        (lambda: models.cml_model(metrics="yes"), TypeError, "metrics must be True or False"),
        (lambda: models.cml_model(5), TypeError, "decorates a function"),
        (lambda: models.call_model(None, {}), TypeError, "model_access_key"),
        (lambda: models.call_model("k", {1j}), TypeError, "is not JSON"),
    ]
    for action, kind, words in cases:
        with pytest.raises(kind, match=words):
            action()
    # A UUID nobody in this process made, with no model named: say what is missing.
    with pytest.raises(ValueError, match="needs the model"):
        metrics.track_delayed_metrics({"a": 1}, "0f0e0d0c-0b0a-4909-8807-060504030201")


def test_in_a_replica_the_calls_metrics_go_to_the_model_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KILN_PROJECT", "alice/demo")
    monkeypatch.setenv("KILN_MODEL", "adder")
    monkeypatch.setenv("KILN_MODEL_DEPLOYMENT", "3")
    model_server.install_metrics_hook()
    model_server.open_call_metrics()
    out = predict({"x": 5})
    sent = json.loads(model_server.take_call_metrics())
    assert out["model_deployment_crn"] == "alice/demo/adder/3"
    assert sent == [
        {
            "uuid": out["uuid"],
            "start_ms": sent[0]["start_ms"],
            "end_ms": sent[0]["end_ms"],
            "metrics": {"input": {"x": 5}, "output": 10},
        }
    ]
    assert metrics.read_metrics(dev=True) == {"metrics": []}  # not in the session's store
    assert model_server.take_call_metrics() == b""  # taken once
    metrics.track_metric("stray", 1)  # outside a call: dropped, said once
    metrics.track_metric("stray", 2)
    predict({"x": 1})  # on a thread of its own, outside a call: dropped too
    assert capsys.readouterr().err.count("are dropped in a replica") == 1
    assert metrics.read_metrics(dev=True) == {"metrics": []}


class _Kiln(BaseHTTPRequestHandler):
    """Records each request and answers what the test queued."""

    seen: list[dict[str, Any]]
    answers: list[tuple[int, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append(
            {
                "method": self.command,
                "path": urlsplit(self.path).path,
                "query": parse_qs(urlsplit(self.path).query),
                "auth": self.headers.get("Authorization"),
                "body": body,
            }
        )
        status, answer = self.answers.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle


@pytest.fixture
def kiln(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Kiln]]:
    handler = type("Handler", (_Kiln,), {"seen": [], "answers": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("KILN_API_URL", f"http://127.0.0.1:{server.server_port}/")
    for name in ("KILN_API_KEY", "CDSW_APIV2_KEY", "KILN_MODEL_API_KEY", "KILN_MODEL_CRN"):
        monkeypatch.delenv(name, raising=False)
    yield handler
    server.shutdown()
    server.server_close()


def test_call_model_sends_cmls_body_with_the_model_api_key(
    kiln: type[_Kiln], monkeypatch: pytest.MonkeyPatch
) -> None:
    kiln.answers += [(200, {"success": True, "response": 3}), (401, {"detail": "no key"})]
    monkeypatch.setenv("KILN_MODEL_API_KEY", "kilnm_env")
    answer = models.call_model("a" * 32, {"a": 1, "b": 2})
    assert answer == {"success": True, "response": 3}
    assert kiln.seen[0]["path"] == "/modelservice/model"
    assert kiln.seen[0]["body"] == {"accessKey": "a" * 32, "request": {"a": 1, "b": 2}}
    assert kiln.seen[0]["auth"] == "Bearer kilnm_env"
    with pytest.raises(_core.KilnApiError, match="401: no key"):
        models.call_model("a" * 32, {}, api_key="kilnm_given")
    assert kiln.seen[1]["auth"] == "Bearer kilnm_given"


def test_a_deployed_models_metrics_go_through_kilns_api(
    kiln: type[_Kiln], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="KILN_API_KEY"):
        metrics.read_metrics("alice/demo/adder")
    monkeypatch.setenv("CDSW_APIV2_KEY", "kiln_key")
    uuid = "0f0e0d0c-0b0a-4909-8807-060504030201"
    kiln.answers += [
        (201, {}),
        (201, {}),
        (200, {"metrics": [{"predictionUuid": uuid}], "next_cursor": "c1"}),
        (200, {"metrics": [{"predictionUuid": None}], "next_cursor": None}),
        (404, {"detail": "no prediction"}),
    ]
    metrics.track_delayed_metrics({"truth": 1}, uuid, model_deployment_crn="alice/demo/adder/2")
    metrics.track_aggregate_metrics(
        {"accuracy": 0.9}, 10, 20, model_deployment_crn="crn:kiln:alice/demo/adder/2"
    )
    found = metrics.read_metrics("alice/demo/adder", 0, 99)
    assert found == {"metrics": [{"predictionUuid": uuid}, {"predictionUuid": None}]}
    path = "/api/v1/projects/alice/demo/models/adder/metrics"
    delayed, aggregate, first, second = kiln.seen[:4]
    assert (delayed["method"], delayed["path"], delayed["auth"]) == (
        "POST",
        path,
        "Bearer kiln_key",
    )
    assert delayed["body"] == {"prediction_uuid": uuid, "metrics": {"truth": 1}}
    assert aggregate["body"] == {
        "start_timestamp_ms": 10,
        "end_timestamp_ms": 20,
        "metrics": {"accuracy": 0.9},
        "deployment": 2,
    }
    assert first["query"] == {"limit": ["200"], "start_ms": ["0"], "end_ms": ["99"]}
    assert second["query"]["cursor"] == ["c1"]
    monkeypatch.setenv("KILN_MODEL_CRN", "alice/demo/adder")  # the default model
    with pytest.raises(_core.KilnApiError, match="404: no prediction"):
        metrics.track_delayed_metrics({"truth": 1}, uuid)
    assert kiln.seen[4]["path"] == path
