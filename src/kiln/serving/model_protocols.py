"""The model server's other protocols: KServe V1, the Open Inference Protocol V2 and MLflow's
scoring server, each mapped onto the same user function as CML's ``POST /model``.

Like ``model_server`` this module imports **only the standard library**: the builder copies
it beside the server into every model image (``/opt/kiln/serving/model_protocols.py``), so
an image running alone under podman speaks these protocols too. It knows nothing of HTTP
connections: ``model_server`` reads the request and hands over the method, path, content
type and body; this module answers with a status and encoded JSON.

The function takes one JSON value and returns JSON, as for CML. How each protocol reaches it:

- **KServe V1** (``POST /v1/models/{name}:predict``, ``{"instances": [...]}``): the function
  is called **once per instance**, in order; the results are ``{"predictions": [...]}``. A
  CML function written for one request (``{"a": 1, "b": 2}`` → a prediction) serves a batch
  unchanged. ``GET /v1/models/{name}`` says whether the model is ready; ``GET /v1/models``
  lists it.
- **Open Inference V2** (``POST /v2/models/{name}/infer``): the function is called **once**
  with a dict of input name → the tensor's data as nested lists shaped by its ``shape``
  (``[2, 3]`` → two lists of three; ``[]`` → the scalar itself), each element checked
  against its ``datatype`` (``BOOL`` → bool, ``INT*``/``UINT*`` → int within range,
  ``FP*`` → number, ``BYTES`` → string). The result becomes output tensors: a dict gives
  one tensor per key; anything else one tensor named ``output-0``. Each value's shape is
  read from its nesting (a scalar is shape ``[1]``; lists must be rectangular) and its
  datatype from its elements: all bool → ``BOOL``, all int → ``INT64``, numbers with a
  float → ``FP64``, strings → ``BYTES``. ``outputs`` in the request picks some of them;
  ``id`` is echoed. Health (``/v2/health/live``, ``/v2/health/ready``), server and model
  metadata and model readiness are answered by the server. Input tensors may also come in
  Triton's binary extension (``Inference-Header-Content-Length``, ``binary_data_size``:
  little-endian values; ``BYTES`` as 4-byte lengths and UTF-8 text), tritonclient's default;
  outputs are always JSON (a client asking for binary outputs reads JSON ones too).
- **MLflow's scoring server** (``POST /invocations``, ``Content-Type: application/json``
  only): the body holds exactly one of ``dataframe_split`` (``{"columns", "data"}``: each
  row becomes a dict column → value), ``dataframe_records`` (a list of dicts),
  ``instances`` or ``inputs`` (a list; a dict of equal-length columns becomes rows); the
  function is called **once per row** and the results are ``{"predictions": [...]}``.
  ``GET /ping`` and ``/health`` say whether the model is ready. No pandas is needed.

Errors use each protocol's own shape: ``{"error": "..."}`` for V1 and V2, ``{"error_code",
"message"}`` for MLflow, with a 4xx for bad input and the function's own ``status_code``
(when it is a 4xx) or 500 when it raises.

``{name}`` must be the model's name: the router sends the model's current name in the
``X-Kiln-Model-Name`` header (the path's prefix already named the model); alone, the server
answers to ``--model-name`` (default ``$KILN_MODEL``, else ``model``).
"""

from __future__ import annotations

import json
import math
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODEL_NAME_HEADER = "X-Kiln-Model-Name"
SINGLE_OUTPUT = "output-0"
PLATFORM = "kiln-python"
MAX_DEPTH = 100  # arrays and objects inside each other; tensors and data frames need < 10

# Each Open Inference datatype: the Python type of its elements and, for integers, the range.
_INT_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
_FLOATS = ("FP16", "FP32", "FP64")
DATATYPES = ("BOOL", *_INT_RANGES, *_FLOATS, "BYTES")
MAX_TENSOR_ELEMENTS = 10_000_000
MAX_DIMENSIONS = 32  # more than any framework's tensors have
_MAX_FLOAT = 1.7976931348623157e308  # a larger JSON integer is no FP value


class ProtocolError(Exception):
    """The request cannot be answered: an HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Invoke = Callable[[Any], Any]  # runs the user's function once; raises ProtocolError


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    content_type: str  # "" when the request has none
    body: bytes
    model: str  # the name this model answers to
    ready: bool
    json_length: str | None = None  # Triton's Inference-Header-Content-Length, if sent


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # JSON
    allow: str = ""  # with a 405: the method the path takes


class WrongMethod(ProtocolError):
    def __init__(self, path: str, method: str, wanted: str) -> None:
        super().__init__(405, f"{path[:200]} takes {wanted}, not {method[:10]}")
        self.wanted = wanted


def protocol_of(path: str) -> str:
    """Which protocol a path belongs to (for the shape of its errors): kserve-v1,
    open-inference-v2 or mlflow."""
    if path == "/v1" or path.startswith("/v1/"):
        return "kserve-v1"
    if path == "/v2" or path.startswith("/v2/"):
        return "open-inference-v2"
    return "mlflow"


_MLFLOW_CODES = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    413: "REQUEST_LIMIT_EXCEEDED",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
}


def error_payload(path: str, status: int, message: str) -> dict[str, Any]:
    """The protocol's own error members for a refusal of a request to ``path``."""
    if protocol_of(path) == "mlflow":
        code = _MLFLOW_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
        return {"error_code": code, "message": message}
    return {"error": message}


def handles(path: str) -> bool:
    """Whether ``path`` is one of the protocols' (an unknown one under ``/v1/`` or ``/v2/``
    too: it is refused in that protocol's shape)."""
    return protocol_of(path) != "mlflow" or path in _MLFLOW_PATHS


def answer(request: Request, invoke: Invoke) -> Answer:
    """The answer to one protocol request. It never raises: a caller whose connection closed
    without an answer would be retried on another replica by the router."""
    try:
        status, payload = _dispatch(request, invoke)
    except ProtocolError as failed:
        body = encode(error_payload(request.path, *_parts(failed)))
        return Answer(failed.status, body, getattr(failed, "wanted", ""))
    except RecursionError:
        return _failed(request, "the function's result is nested too deeply")
    except Exception as exc:  # e.g. a result's own tolist() that raises
        traceback.print_exc()
        return _failed(request, f"the function's result cannot be read: {type(exc).__name__}")
    try:
        return Answer(status, encode(payload))
    except (TypeError, ValueError, RecursionError) as exc:
        detail = "NaN or infinity" if isinstance(exc, ValueError) else str(exc)
        return _failed(request, f"the function's result is not JSON: {detail}")
    except Exception as exc:
        traceback.print_exc()
        return _failed(request, f"the function's result cannot be read: {type(exc).__name__}")


def _failed(request: Request, message: str) -> Answer:
    return Answer(500, encode(error_payload(request.path, 500, message)))


def _parts(failed: ProtocolError) -> tuple[int, str]:
    """The status and message; a function's exception is named (``kind`` is set by the
    model server's ``CallFailed``, also when a batch's item failed)."""
    cause = failed.__cause__ if isinstance(failed.__cause__, ProtocolError) else failed
    kind = getattr(cause, "kind", "")
    return failed.status, f"{failed.message} ({kind})" if kind else failed.message


def _dispatch(request: Request, invoke: Invoke) -> tuple[int, Any]:
    path, method = request.path, request.method
    kind = protocol_of(path)
    handlers = _V1 if kind == "kserve-v1" else _V2 if kind == "open-inference-v2" else _MLFLOW
    for matcher, wanted, handler in handlers:
        name = matcher(path)
        if name is None:
            continue
        if method != wanted:
            raise WrongMethod(path, method, wanted)
        if name and name != request.model:
            raise ProtocolError(
                404, f"no model named {name[:80]!r} here: this endpoint serves {request.model!r}"
            )
        return handler(request, invoke)
    raise ProtocolError(404, f"no such endpoint: {path[:200]}")


def _exact(expected: str) -> Callable[[str], str | None]:
    return lambda path: "" if path == expected else None


def _named(prefix: str, suffix: str = "") -> Callable[[str], str | None]:
    """Matches ``{prefix}{name}{suffix}`` with a name of one path segment; returns it."""

    def match(path: str) -> str | None:
        if not (path.startswith(prefix) and path.endswith(suffix)):
            return None
        name = path[len(prefix) : len(path) - len(suffix)]
        if not name or "/" in name or (not suffix and ":" in name):
            return None
        return name

    return match


# -- readiness and metadata ---------------------------------------------------------------


def _ready_or_503(request: Request, payload: dict[str, Any]) -> tuple[int, Any]:
    if not request.ready:
        raise ProtocolError(503, "the model is not ready (loading or stopping)")
    return 200, payload


def _v1_list(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return 200, {"models": [request.model]}


def _v1_status(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return (200 if request.ready else 503), {"name": request.model, "ready": request.ready}


def _v2_server(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return 200, {"name": "kiln-model-server", "version": "1", "extensions": []}


def _v2_live(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return 200, {"live": True}


def _v2_ready(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return _ready_or_503(request, {"ready": True})


def _v2_metadata(request: Request, invoke: Invoke) -> tuple[int, Any]:
    # A Python function declares no tensors: the inputs and outputs are whatever it takes.
    return 200, {
        "name": request.model,
        "versions": [],
        "platform": PLATFORM,
        "inputs": [],
        "outputs": [],
    }


def _mlflow_ping(request: Request, invoke: Invoke) -> tuple[int, Any]:
    return _ready_or_503(request, {"status": "ready"})


# -- calls ----------------------------------------------------------------------------------


def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or ``ProtocolError(400)`` saying what is wrong."""
    return json_object(request.body)


def json_object(body: bytes, shape: str = "") -> dict[str, Any]:
    """``body`` decoded as a JSON object, or ``ProtocolError(400)`` saying what is wrong:
    not UTF-8, not JSON, nested deeper than ``MAX_DEPTH``, or not an object (``shape``
    shows the object expected, e.g. ``{"request": ...}``). Every protocol and CML's body
    are read by this one function, in the replica and in the router."""
    try:
        decoded = json.loads(body.decode("utf-8"))  # JSON on the wire is UTF-8 (RFC 8259)
    except UnicodeDecodeError:
        raise ProtocolError(400, "the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(400, "the body is nested too deeply") from None
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and too_deep(decoded, MAX_DEPTH):
        raise ProtocolError(400, f"the body is nested too deeply (more than {MAX_DEPTH} levels)")
    if not isinstance(decoded, dict):
        shown = f" {shape}" if shape else ""
        raise ProtocolError(400, f"the body must be a JSON object{shown}, not {_kind(decoded)}")
    return decoded


def too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels (walked without recursion,
    container by container: a wide body costs its containers, never its characters)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _kind(value: Any) -> str:
    names = {list: "an array", dict: "an object", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


def _each(invoke: Invoke, items: list[Any], what: str) -> list[Any]:
    """The function on every item, in order; a failure names the item."""
    results = []
    for index, item in enumerate(items):
        try:
            results.append(invoke(item))
        except ProtocolError as failed:
            prefix = f"{what} {index}: " if len(items) > 1 else ""
            raise ProtocolError(failed.status, prefix + failed.message) from failed
    return results


def _v1_predict(request: Request, invoke: Invoke) -> tuple[int, Any]:
    body = _json_body(request)
    instances = body.get("instances")
    if instances is None:
        raise ProtocolError(400, 'the body has no "instances": {"instances": [...]}')
    if not isinstance(instances, list):
        raise ProtocolError(400, f'"instances" must be an array, not {_kind(instances)}')
    return 200, {"predictions": _each(invoke, instances, "instance")}


# -- Open Inference V2 tensors ---------------------------------------------------------------


def _v2_infer(request: Request, invoke: Invoke) -> tuple[int, Any]:
    binary = b""
    if request.json_length is None:
        body = _json_body(request)
    else:  # Triton's binary extension: the JSON, then the tensors' bytes in input order
        length = request.json_length.strip()
        if not length.isdigit() or int(length) > len(request.body):
            raise ProtocolError(
                400, "Inference-Header-Content-Length must be the JSON's length in the body"
            )
        body = json_object(request.body[: int(length)])
        binary = request.body[int(length) :]
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, f'"id" must be a string, not {_kind(request_id)}')
    inputs = read_inputs(body.get("inputs"), binary)
    wanted = _requested_outputs(body.get("outputs"))
    result = invoke(inputs)
    outputs = to_outputs(result)
    if wanted is not None:
        produced = {output["name"]: output for output in outputs}
        missing = [name for name in wanted if name not in produced]
        if missing:
            raise ProtocolError(
                400,
                f"the model produced no output named {missing[0]!r} "
                f"(it produced {', '.join(repr(n) for n in produced) or 'none'})",
            )
        outputs = [produced[name] for name in wanted]
    payload: dict[str, Any] = {"model_name": request.model, "outputs": outputs}
    if request_id is not None:
        payload["id"] = request_id
    return 200, payload


def read_inputs(inputs: Any, binary: bytes = b"") -> dict[str, Any]:
    """V2 input tensors as the function's argument: name → data shaped by ``shape``. A
    tensor with ``parameters.binary_data_size`` takes that many of the ``binary`` bytes
    (Triton's extension), in input order."""
    if inputs is None:
        raise ProtocolError(
            400, 'the body has no "inputs": [{"name", "shape", "datatype", "data"}]'
        )
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, '"inputs" must be a non-empty array of tensors')
    found: dict[str, Any] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise ProtocolError(400, f"input {index} must be an object, not {_kind(tensor)}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(400, f'input {index} has no "name"')
        if name in found:
            raise ProtocolError(400, f"input {name!r} is given twice")
        parameters = tensor.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            found[name] = read_tensor(name, tensor)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(400, f"input {name!r}: binary_data_size must be a byte count")
        if offset + size > len(binary):
            raise ProtocolError(
                400, f"input {name!r}: binary_data_size {size} is past the end of the body"
            )
        found[name] = read_tensor(name, tensor, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return found


def read_tensor(name: str, tensor: dict[str, Any], raw: bytes | None = None) -> Any:
    """One input tensor's data (JSON ``data``, or ``raw`` bytes of the binary extension),
    checked against its shape and datatype, shaped."""
    what = f"input {name[:80]!r}"
    for member in ("shape", "datatype") if raw is not None else ("shape", "datatype", "data"):
        if member not in tensor:
            raise ProtocolError(400, f'{what} has no "{member}"')
    shape, datatype, data = tensor["shape"], tensor["datatype"], tensor.get("data")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(400, f'{what}: "shape" must be an array of non-negative integers')
    if len(shape) > MAX_DIMENSIONS:
        raise ProtocolError(400, f"{what}: more than {MAX_DIMENSIONS} dimensions")
    if datatype not in DATATYPES:
        raise ProtocolError(
            400, f"{what}: unknown datatype {str(datatype)[:20]!r} (one of {', '.join(DATATYPES)})"
        )
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(
            400, f"{what}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements"
        )
    if raw is not None:
        flat = _from_binary(what, datatype, raw, count)
    else:
        flat = _flatten(data if isinstance(data, list) else [data])
    if len(flat) != count:
        raise ProtocolError(
            400, f"{what}: shape {shape} needs {count} elements, the data has {len(flat)}"
        )
    for value in flat:
        _check_element(what, datatype, value)
    if datatype in _FLOATS:  # JSON writes 1.0 as 1: the function gets floats either way
        flat = [float(value) for value in flat]
    return _reshape(flat, shape)


_STRUCT_CODES = {  # little-endian, as Triton's binary extension lays tensors out
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}


def _from_binary(what: str, datatype: str, raw: bytes, count: int) -> list[Any]:
    """A binary tensor's elements: fixed-size little-endian values, or for ``BYTES`` each
    element's 4-byte little-endian length and then its bytes (UTF-8: the function gets
    strings, as from JSON)."""
    if datatype != "BYTES":
        code = _STRUCT_CODES[datatype]
        size = struct.calcsize("<" + code)
        if len(raw) != count * size:
            raise ProtocolError(
                400, f"{what}: {count} {datatype} elements are {count * size} bytes, not {len(raw)}"
            )
        return list(struct.unpack(f"<{count}{code}", raw))
    values: list[Any] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ProtocolError(400, f"{what}: the binary BYTES data ends inside a length")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise ProtocolError(400, f"{what}: the binary BYTES data ends inside an element")
        try:
            values.append(raw[at : at + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(400, f"{what}: a BYTES element is not UTF-8 text") from None
        at += length
    return values


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of nested lists (the protocol allows flat or nested ``data``)."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _check_element(what: str, datatype: str, value: Any) -> None:
    if datatype == "BOOL":
        ok = isinstance(value, bool)
    elif datatype == "BYTES":
        ok = isinstance(value, str)
    elif datatype in _FLOATS:
        ok = isinstance(value, float) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_FLOAT
        )
    else:
        low, high = _INT_RANGES[datatype]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        shown = json.dumps(value)[:40] if not isinstance(value, dict) else "an object"
        raise ProtocolError(400, f"{what}: {shown} is not of datatype {datatype}")


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _requested_outputs(outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise ProtocolError(400, '"outputs" must be an array of {"name": ...}')
    # A request for binary outputs (Triton's extension) gets JSON ones, which its clients read.
    return [o["name"] for o in outputs]


def to_outputs(result: Any) -> list[dict[str, Any]]:
    """The function's result as V2 output tensors (see the module's description)."""
    result = plain(result)
    named = result if isinstance(result, dict) else {SINGLE_OUTPUT: result}
    return [to_tensor(str(name), value) for name, value in named.items()]


def to_tensor(name: str, value: Any) -> dict[str, Any]:
    """One output tensor: shape from the nesting, datatype from the elements."""
    what = f"output {name[:80]!r}"
    shape = _shape_of(what, value)
    flat = _flatten(value) if isinstance(value, list) else [value]
    if not isinstance(value, list):
        shape = [1]
    return {"name": name, "shape": shape, "datatype": _datatype_of(what, flat), "data": flat}


def _shape_of(what: str, value: Any) -> list[int]:
    """The shape of rectangular nested lists; ``ProtocolError(500)`` for ragged ones."""
    shape: list[int] = []
    level = [value]
    while level and all(isinstance(item, list) for item in level):
        lengths = {len(item) for item in level}
        if len(lengths) > 1:
            raise ProtocolError(500, f"{what} is not a tensor: its lists differ in length")
        shape.append(lengths.pop())
        level = [child for item in level for child in item]
    if any(isinstance(item, list) for item in level):
        raise ProtocolError(500, f"{what} is not a tensor: it mixes lists and values")
    return shape


def _datatype_of(what: str, flat: list[Any]) -> str:
    if any(isinstance(v, dict) for v in flat):
        raise ProtocolError(500, f"{what} is not a tensor: it holds an object")
    if any(v is None for v in flat):
        raise ProtocolError(500, f"{what} is not a tensor: it holds null")
    kinds = {_element_kind(v) for v in flat}
    if not kinds or kinds <= {"INT64", "FP64"}:
        return "FP64" if "FP64" in kinds or not kinds else "INT64"
    if len(kinds) == 1:
        return kinds.pop()
    raise ProtocolError(500, f"{what} is not a tensor: it mixes {' and '.join(sorted(kinds))}")


def _element_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FP64"
    if isinstance(value, str):
        return "BYTES"
    raise ProtocolError(500, f"a {type(value).__name__} is not JSON")


def plain(value: Any) -> Any:
    """``value`` with NumPy-like arrays and scalars (``tolist``/``item``) turned into lists
    and numbers, and tuples into lists, so their shape and type can be read."""
    for method in ("tolist", "item"):
        convert = getattr(value, method, None)
        if callable(convert) and not isinstance(value, (list, dict, str, bytes)):
            return plain(convert())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


# -- MLflow's scoring server ------------------------------------------------------------------

_MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def _mlflow_invocations(request: Request, invoke: Invoke) -> tuple[int, Any]:
    media = request.content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = media[:60] or "none"
        raise ProtocolError(
            415, f"send Content-Type: application/json (got {shown}); CSV is not supported"
        )
    body = _json_body(request)
    given = [key for key in _MLFLOW_FORMATS if key in body]
    if len(given) != 1:
        raise ProtocolError(
            400,
            "the body must hold exactly one of "
            + ", ".join(_MLFLOW_FORMATS)
            + (f" (it holds {', '.join(given)})" if given else ""),
        )
    if body.get("params") is not None:
        raise ProtocolError(400, '"params" are not supported: the function takes one argument')
    rows = mlflow_rows(given[0], body[given[0]])
    return 200, {"predictions": _each(invoke, rows, "row")}


def mlflow_rows(form: str, value: Any) -> list[Any]:
    """The rows an MLflow body holds, each one argument of the function."""
    if form == "dataframe_split":
        if not isinstance(value, dict):
            raise ProtocolError(400, f'"dataframe_split" must be an object, not {_kind(value)}')
        columns, data = value.get("columns"), value.get("data")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise ProtocolError(400, '"dataframe_split" needs "columns": an array of names')
        if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
            raise ProtocolError(400, '"dataframe_split" needs "data": an array of rows (arrays)')
        for index, row in enumerate(data):
            if len(row) != len(columns):
                raise ProtocolError(
                    400, f"row {index} has {len(row)} values for {len(columns)} columns"
                )
        return [{column: row[i] for i, column in enumerate(columns)} for row in data]
    if form == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
            raise ProtocolError(400, '"dataframe_records" must be an array of objects')
        return value
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(isinstance(c, list) for c in value.values()):
        lengths = {len(column) for column in value.values()}
        if len(lengths) > 1:
            raise ProtocolError(400, f'the columns of "{form}" differ in length')
        count = lengths.pop()
        return [{name: column[i] for name, column in value.items()} for i in range(count)]
    raise ProtocolError(
        400, f'"{form}" must be an array, or an object of equal-length arrays (columns)'
    )


_Handler = Callable[[Request, Invoke], "tuple[int, Any]"]
_Route = tuple[Callable[[str], "str | None"], str, _Handler]

_V1: list[_Route] = [
    (_exact("/v1/models"), "GET", _v1_list),
    (_named("/v1/models/", ":predict"), "POST", _v1_predict),
    (_named("/v1/models/"), "GET", _v1_status),
]
_V2: list[_Route] = [
    (_exact("/v2"), "GET", _v2_server),
    (_exact("/v2/health/live"), "GET", _v2_live),
    (_exact("/v2/health/ready"), "GET", _v2_ready),
    (_named("/v2/models/", "/infer"), "POST", _v2_infer),
    (_named("/v2/models/", "/ready"), "GET", _v2_ready),
    (_named("/v2/models/"), "GET", _v2_metadata),
]
_MLFLOW: list[_Route] = [
    (_exact("/ping"), "GET", _mlflow_ping),
    (_exact("/health"), "GET", _mlflow_ping),
    (_exact("/invocations"), "POST", _mlflow_invocations),
]
_MLFLOW_PATHS = frozenset(("/ping", "/health", "/invocations"))


def encode(payload: Any) -> bytes:
    """Compact JSON (NumPy values converted; NaN and infinity refused with ``ValueError``)."""
    return json.dumps(payload, default=jsonable, allow_nan=False, separators=(",", ":")).encode()


def jsonable(value: Any) -> Any:
    """``json.dumps``'s fallback: NumPy arrays and scalars (and the like) by their own
    conversion; anything else is not JSON."""
    for method in ("tolist", "item"):
        convert = getattr(value, method, None)
        if callable(convert):
            return convert()
    raise TypeError(f"a {type(value).__name__} is not JSON")
