"""How KServe V1, Open Inference V2 and MLflow requests reach the user's function and how its
results go back (``kiln.serving.model_protocols``): the mappings, and precise refusals in
each protocol's own error shape."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from kiln.serving.model_protocols import ProtocolError, Request, answer, error_payload, handles
from kiln.serving.model_server import CallFailed

JSON = "application/json"


def ask(
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    content_type: str = JSON,
    function: Any = None,
    ready: bool = True,
    **extra: Any,
) -> tuple[int, Any, list[Any]]:
    """(status, decoded answer, the arguments the function was called with)."""
    calls: list[Any] = []

    def invoke(value: Any) -> Any:
        calls.append(value)
        return (function or echo)(value)

    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    request = Request(method, path, content_type, data, "adder", ready, **extra)
    result = answer(request, invoke)
    return result.status, json.loads(result.body), calls


def echo(value: Any) -> Any:
    return value


def add(value: dict[str, Any]) -> Any:
    return value["a"] + value["b"]


def refused(result: tuple[int, Any, list[Any]], status: int, words: str) -> None:
    got, payload, _ = result
    assert got == status, payload
    message = payload.get("error", payload.get("message"))
    assert isinstance(message, str) and words in message, payload


# -- KServe V1 ------------------------------------------------------------------------------


def test_kserve_v1_calls_the_function_once_per_instance() -> None:
    instances = [{"a": 1, "b": 2}, {"a": 10, "b": 20}]
    status, payload, calls = ask(
        "POST", "/v1/models/adder:predict", {"instances": instances}, function=add
    )
    assert (status, payload) == (200, {"predictions": [3, 30]})
    assert calls == instances
    assert ask("POST", "/v1/models/adder:predict", {"instances": []})[:2] == (
        200,
        {"predictions": []},
    )
    assert ask("GET", "/v1/models/adder")[:2] == (200, {"name": "adder", "ready": True})
    assert ask("GET", "/v1/models/adder", ready=False)[:2] == (
        503,
        {"name": "adder", "ready": False},
    )
    assert ask("GET", "/v1/models")[:2] == (200, {"models": ["adder"]})


def test_kserve_v1_refusals() -> None:
    predict = "/v1/models/adder:predict"
    refused(ask("POST", predict, {"inputs": [1]}), 400, 'no "instances"')
    refused(ask("POST", predict, {"instances": {"a": 1}}), 400, "must be an array, not an object")
    refused(ask("POST", predict, raw=b"{nope"), 400, "not JSON")
    refused(ask("POST", predict, raw=b"[1]"), 400, "must be a JSON object, not an array")
    refused(ask("POST", predict, raw=b"\xff"), 400, "not UTF-8")
    deep = b'{"instances": ' + b"[" * 150 + b"]" * 150 + b"}"
    refused(ask("POST", predict, raw=deep), 400, "nested too deeply")
    refused(ask("POST", "/v1/models/other:predict", {"instances": []}), 404, "no model named")
    refused(ask("GET", "/v1/models/other"), 404, "serves 'adder'")
    refused(ask("GET", predict), 405, "takes POST")
    assert answer(Request("GET", predict, "", b"", "adder", True), echo).allow == "POST"
    refused(ask("POST", "/v1/models/adder:explain", {"instances": []}), 404, "no such endpoint")

    def bad(value: Any) -> Any:
        if value == 2:
            raise CallFailed(422, "two is not allowed", "BadInput")
        return value

    status, payload, calls = ask("POST", predict, {"instances": [1, 2, 3]}, function=bad)
    assert (status, payload) == (422, {"error": "instance 1: two is not allowed (BadInput)"})
    assert calls == [1, 2]  # stops at the first failure
    result = ask("POST", predict, {"instances": [1]}, function=lambda v: Broken())
    refused(result, 500, "cannot be read: ZeroDivisionError")


# -- Open Inference V2 --------------------------------------------------------------------------


def infer(inputs: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    return {"inputs": inputs, **body}


def test_v2_tensors_become_a_dict_of_shaped_lists_and_results_become_tensors() -> None:
    body = infer(
        [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2.5, 3, 4, 5, 6]},
            {"name": "flags", "shape": [2], "datatype": "BOOL", "data": [[True], [False]]},
            {"name": "words", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "k", "shape": [], "datatype": "INT8", "data": [7]},
        ],
        id="req-1",
    )

    def model(tensors: dict[str, Any]) -> Any:
        return {
            "sums": [sum(row) for row in tensors["x"]],
            "count": len(tensors["words"][0]),
            "grid": [[1, 2], [3, 4]],
            "ok": [True, False],
            "labels": ["yes", "no"],
            "empty": [],
        }

    status, payload, calls = ask("POST", "/v2/models/adder/infer", body, function=model)
    assert status == 200, payload
    assert calls == [
        {
            "x": [[1.0, 2.5, 3.0], [4.0, 5.0, 6.0]],
            "flags": [True, False],
            "words": [["a", "b"]],
            "k": 7,
        }
    ]
    assert all(isinstance(v, float) for row in calls[0]["x"] for v in row)
    assert payload["id"] == "req-1" and payload["model_name"] == "adder"
    outputs = {o["name"]: o for o in payload["outputs"]}
    assert outputs["sums"] == {
        "name": "sums",
        "shape": [2],
        "datatype": "FP64",
        "data": [6.5, 15.0],
    }
    assert outputs["count"] == {"name": "count", "shape": [1], "datatype": "INT64", "data": [2]}
    assert outputs["grid"]["shape"] == [2, 2] and outputs["grid"]["data"] == [1, 2, 3, 4]
    assert outputs["ok"]["datatype"] == "BOOL" and outputs["labels"]["datatype"] == "BYTES"
    assert outputs["empty"] == {"name": "empty", "shape": [0], "datatype": "FP64", "data": []}
    # One result that is not a dict is one tensor; "outputs" picks and orders them.
    status, payload, _ = ask(
        "POST",
        "/v2/models/adder/infer",
        infer([{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]),
        function=lambda t: t["x"],
    )
    assert payload["outputs"] == [
        {"name": "output-0", "shape": [2], "datatype": "INT64", "data": [1, 2]}
    ]
    assert "id" not in payload
    status, payload, _ = ask(
        "POST",
        "/v2/models/adder/infer",
        infer(
            [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}],
            outputs=[{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}],
        ),
        function=lambda t: {"a": 1, "b": 2.5, "c": 3},
    )
    assert [o["name"] for o in payload["outputs"]] == ["b", "a"]


class Array:
    """What a NumPy array looks like to the server: ``tolist``."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def tolist(self) -> list[Any]:
        return self.values


class Broken:
    def tolist(self) -> list[Any]:
        raise ZeroDivisionError


def test_v2_numpy_like_results_are_read_by_their_own_conversion() -> None:
    body = infer([{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}])
    status, payload, _ = ask(
        "POST", "/v2/models/adder/infer", body, function=lambda t: {"y": Array([[0.5], [1.5]])}
    )
    assert status == 200 and payload["outputs"][0]["shape"] == [2, 1]


def test_v2_refusals() -> None:
    path = "/v2/models/adder/infer"
    good = {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}
    cases: list[tuple[Any, str]] = [
        ({}, 'no "inputs"'),
        (infer([]), "non-empty array"),
        (infer(["x"]), "input 0 must be an object"),
        (infer([{"shape": [1], "datatype": "FP32", "data": [1]}]), 'no "name"'),
        (infer([good, good]), "given twice"),
        (infer([{**good, "shape": [3]}]), "shape [3] needs 3 elements, the data has 2"),
        (infer([{**good, "shape": [-1]}]), "non-negative integers"),
        (infer([{**good, "shape": "2"}]), "non-negative integers"),
        (infer([{**good, "datatype": "FP128"}]), "unknown datatype 'FP128'"),
        (infer([{**good, "data": [1, "2"]}]), '"2" is not of datatype INT32'),
        (infer([{**good, "data": [1, 2**31]}]), "is not of datatype INT32"),
        (infer([{**good, "datatype": "UINT8", "data": [1, -1]}]), "-1 is not of datatype UINT8"),
        (infer([{**good, "datatype": "BOOL", "data": [1, 0]}]), "1 is not of datatype BOOL"),
        (infer([{**good, "datatype": "FP32", "data": [True, 1]}]), "true is not of datatype FP32"),
        (infer([{**good, "datatype": "FP64", "data": [1, 10**400]}]), "is not of datatype FP64"),
        (infer([{**good, "datatype": "BYTES", "data": ["a", 1]}]), "1 is not of datatype BYTES"),
        (infer([{k: v for k, v in good.items() if k != "datatype"}]), 'no "datatype"'),
        (infer([{k: v for k, v in good.items() if k != "data"}]), 'no "data"'),
        (infer([{**good, "parameters": {"binary_data_size": 8}}]), "past the end of the body"),
        (infer([good], id=5), '"id" must be a string'),
        (infer([good], outputs="y"), '"outputs" must be an array'),
        (infer([{**good, "shape": [10**9, 10**9]}]), "more than"),
        (infer([{**good, "shape": [2] + [1] * 40}]), "more than 32 dimensions"),
    ]
    for body, words in cases:
        refused(ask("POST", path, body), 400, words)
    wanted = infer([good], outputs=[{"name": "nope"}])
    refused(ask("POST", path, wanted, function=lambda t: {"y": 1}), 400, "no output named 'nope'")
    refused(ask("POST", "/v2/models/other/infer", infer([good])), 404, "no model named 'other'")
    refused(ask("GET", path), 405, "takes POST")
    refused(ask("GET", "/v2/models/adder/versions/1"), 404, "no such endpoint")
    # Results that are no tensors: a 500 naming the output.
    for result, words in (
        ({"y": [[1, 2], [3]]}, "lists differ in length"),
        ({"y": [1, [2]]}, "mixes lists and values"),
        ({"y": [1, "a"]}, "mixes BYTES and INT64"),
        ({"y": {"nested": 1}}, "holds an object"),
        ({"y": None}, "holds null"),
        ({"y": object()}, "is not JSON"),
        ({"y": float("nan")}, "NaN"),
        ({"y": Broken()}, "cannot be read: ZeroDivisionError"),
    ):
        refused(ask("POST", path, infer([good]), function=lambda t, r=result: r), 500, words)


def binary_request(inputs: list[tuple[dict[str, Any], bytes]], **body: Any) -> tuple[bytes, str]:
    """A body in Triton's binary extension, and its Inference-Header-Content-Length."""
    header = json.dumps(
        {
            "inputs": [{**t, "parameters": {"binary_data_size": len(raw)}} for t, raw in inputs],
            **body,
        }
    ).encode()
    return header + b"".join(raw for _, raw in inputs), str(len(header))


def test_v2_binary_input_tensors() -> None:
    words = b"".join(struct.pack("<I", len(w)) + w for w in ("héllo".encode(), b"", b"x"))
    raw, length = binary_request(
        [
            ({"name": "x", "shape": [2, 2], "datatype": "FP32"}, struct.pack("<4f", 1, 2, 3, 0.5)),
            ({"name": "n", "shape": [3], "datatype": "UINT16"}, struct.pack("<3H", 1, 2, 65535)),
            ({"name": "b", "shape": [2], "datatype": "BOOL"}, b"\x01\x00"),
            ({"name": "w", "shape": [3], "datatype": "BYTES"}, words),
        ],
        id="bin",
    )
    status, payload, calls = ask(
        "POST", "/v2/models/adder/infer", raw=raw, content_type="", json_length=length
    )
    assert status == 200, payload
    assert calls == [
        {
            "x": [[1.0, 2.0], [3.0, 0.5]],
            "n": [1, 2, 65535],
            "b": [True, False],
            "w": ["héllo", "", "x"],
        }
    ]
    assert payload["id"] == "bin"
    # JSON and binary inputs mixed in one request.
    header = json.dumps(
        {
            "inputs": [
                {"name": "j", "shape": [1], "datatype": "INT8", "data": [4]},
                {
                    "name": "k",
                    "shape": [1],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": 8},
                },
            ]
        }
    ).encode()
    status, _, calls = ask(
        "POST",
        "/v2/models/adder/infer",
        raw=header + struct.pack("<q", -5),
        json_length=str(len(header)),
    )
    assert status == 200 and calls == [{"j": [4], "k": [-5]}]
    fp32 = {"name": "x", "shape": [2], "datatype": "FP32"}
    for inputs, extra, length_given, words_in in (
        ([(fp32, b"\x00" * 7)], b"", None, "2 FP32 elements are 8 bytes, not 7"),
        ([(fp32, b"\x00" * 8)], b"\x00", None, "1 bytes of binary data belong to no input"),
        ([(fp32, b"\x00" * 8)], b"", "x", "Inference-Header-Content-Length"),
        ([(fp32, b"\x00" * 8)], b"", "99999", "Inference-Header-Content-Length"),
        ([(fp32, b"\x00" * 8)], b"", "3", "not JSON"),
        (
            [({"name": "w", "shape": [1], "datatype": "BYTES"}, b"\x05\x00")],
            b"",
            None,
            "inside a length",
        ),
        (
            [({"name": "w", "shape": [1], "datatype": "BYTES"}, b"\x05\x00\x00\x00ab")],
            b"",
            None,
            "inside an element",
        ),
        (
            [({"name": "w", "shape": [1], "datatype": "BYTES"}, b"\x01\x00\x00\x00\xff")],
            b"",
            None,
            "not UTF-8",
        ),
        (
            [({"name": "w", "shape": [2], "datatype": "BYTES"}, b"\x01\x00\x00\x00a")],
            b"",
            None,
            "needs 2 elements",
        ),
    ):
        raw, length = binary_request(inputs)
        result = ask(
            "POST",
            "/v2/models/adder/infer",
            raw=raw + extra,
            json_length=length_given if length_given is not None else length,
        )
        refused(result, 400, words_in)


def test_v2_health_and_metadata() -> None:
    assert ask("GET", "/v2/health/live", ready=False)[:2] == (200, {"live": True})
    assert ask("GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    refused(ask("GET", "/v2/health/ready", ready=False), 503, "not ready")
    assert ask("GET", "/v2/models/adder/ready")[0] == 200
    refused(ask("GET", "/v2/models/other/ready"), 404, "no model named")
    status, metadata, _ = ask("GET", "/v2/models/adder")
    assert status == 200 and metadata["name"] == "adder" and metadata["platform"] == "kiln-python"
    assert ask("GET", "/v2")[1]["name"] == "kiln-model-server"


# -- MLflow's scoring server ----------------------------------------------------------------------


def test_mlflow_formats_become_rows_the_function_gets_one_at_a_time() -> None:
    rows = [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    for body in (
        {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]], "index": [7, 8]}},
        {"dataframe_records": rows},
        {"instances": rows},
        {"inputs": {"a": [1, 3], "b": [2, 4]}},
    ):
        status, payload, calls = ask("POST", "/invocations", body, function=add)
        assert (status, payload, calls) == (200, {"predictions": [3, 7]}, rows), body
    status, payload, calls = ask("POST", "/invocations", {"inputs": [[1, 2], [3, 4]]})
    assert payload == {"predictions": [[1, 2], [3, 4]]} and calls == [[1, 2], [3, 4]]
    charset = ask("POST", "/invocations", {"instances": [1]}, content_type=JSON + "; charset=utf-8")
    assert charset[:2] == (200, {"predictions": [1]})
    assert ask("GET", "/ping")[0] == ask("GET", "/health")[0] == 200
    assert ask("GET", "/ping", ready=False)[0] == 503


def test_mlflow_refusals() -> None:
    status, payload, _ = ask("POST", "/invocations", raw=b"a,b\n1,2", content_type="text/csv")
    assert status == 415
    assert payload == {
        "error_code": "BAD_REQUEST",
        "message": "send Content-Type: application/json (got text/csv); CSV is not supported",
    }
    refused(ask("POST", "/invocations", {"instances": []}, content_type=""), 415, "got none")
    for body, words in (
        ({}, "exactly one of dataframe_split"),
        ({"instances": [], "inputs": []}, "(it holds instances, inputs)"),
        ({"instances": [1], "params": {"k": 1}}, '"params" are not supported'),
        ({"dataframe_split": [1]}, "must be an object"),
        ({"dataframe_split": {"data": [[1]]}}, '"columns"'),
        ({"dataframe_split": {"columns": ["a"], "data": [1]}}, '"data"'),
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1]]}}, "1 values for 2 columns"),
        ({"dataframe_records": [1, 2]}, "array of objects"),
        ({"inputs": {"a": [1], "b": [1, 2]}}, "differ in length"),
        ({"instances": "x"}, "must be an array, or an object"),
    ):
        refused(ask("POST", "/invocations", body), 400, words)
    refused(ask("POST", "/invocations", raw=b"{"), 400, "not JSON")
    refused(ask("GET", "/invocations"), 405, "takes POST")

    def broken(value: Any) -> Any:
        raise CallFailed(500, "the model broke", "RuntimeError")

    status, payload, _ = ask("POST", "/invocations", {"instances": [1]}, function=broken)
    assert status == 500
    assert payload == {"error_code": "INTERNAL_ERROR", "message": "the model broke (RuntimeError)"}


def test_paths_and_error_shapes() -> None:
    assert handles("/v2/anything") and handles("/v1/x") and handles("/invocations")
    assert not handles("/model") and not handles("/other")
    assert error_payload("/v2/models/x/infer", 401, "key") == {"error": "key"}
    assert error_payload("/invocations", 401, "key") == {
        "error_code": "UNAUTHENTICATED",
        "message": "key",
    }
    assert error_payload("/ping", 503, "busy")["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert issubclass(CallFailed, ProtocolError)


@pytest.mark.parametrize("path", ["/v1/models/adder:predict", "/v2/models/adder/infer"])
def test_a_function_that_is_still_loading_is_a_503(path: str) -> None:
    def loading(value: Any) -> Any:
        raise CallFailed(503, "the model is still loading")

    body = (
        {"instances": [1]}
        if "v1" in path
        else infer([{"name": "x", "shape": [], "datatype": "BOOL", "data": True}])
    )
    refused(ask("POST", path, body, function=loading), 503, "still loading")
