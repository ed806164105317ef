"""What ``cml.models_v1``, ``cml.metrics_v1`` and ``cdsw`` share: where a metric goes, the
in-memory store, and the HTTP calls to Kiln.

Standard library only, Python 3.9+: the builder copies this package into every model image
beside the model server (``/opt/kiln/serving/cml``), whose Python may be any 3.9+ and has no
Kiln installed; the runner shows it to sessions and jobs under ``/run/kiln/python``.

**Where a metric goes.** Inside a call of a function decorated with
``@cml_model(metrics=True)``, ``track_metric`` attaches to that call (a ``contextvars``
record, so concurrent calls on threads never mix). When the call ends:

- in a **replica**, the model server has registered the module ``kiln_replica_calls`` in
  ``sys.modules`` (``kiln.serving.model_server``); the record goes to it, the server hands it
  to the router beside the answer, and the router stores it in Kiln's database;
- anywhere else (a **session** or a **job**), it goes to this process's in-memory store,
  which ``read_metrics`` reads back; it vanishes with the process, as in CML.

``track_metric`` outside a decorated call records a call of its own in the in-memory store
(a session trying things out); in a replica it is dropped with one note in the log.
"""

from __future__ import annotations

import contextvars
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from typing import Any

MAX_METRICS_BYTES = 64 * 1024  # one call's metrics as compact JSON; more is dropped
MAX_KEY_CHARS = 200
MAX_STORED_CALLS = 10_000  # the in-memory store forgets the oldest beyond this
REPLICA_HOOK = "kiln_replica_calls"  # the model server's module in sys.modules
# CML's names for the in-session (development) deployment, build and model.
DEV_DEPLOYMENT = "crn:cdp:ml:::workspace:dev/model-deployment"
DEV_BUILD = "crn:cdp:ml:::workspace:dev/model-build"
DEV_MODEL = "crn:cdp:ml:::workspace:dev/model"
KILN_CRN = "crn:kiln:"  # an optional prefix of Kiln's model references
HTTP_SECONDS = 30.0


class KilnApiError(RuntimeError):
    """Kiln answered with an error: ``status`` and Kiln's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- values ---------------------------------------------------------------------------------


def _convert(value: Any) -> Any:
    """``json.dumps``'s fallback: NumPy arrays and scalars (and the like) by their own
    conversion; anything else is not JSON."""
    for method in ("tolist", "item"):
        convert = getattr(value, method, None)
        if callable(convert):
            return convert()
    raise TypeError(
        f"a {type(value).__name__} is not JSON (use numbers, strings, booleans, None, lists "
        "and dicts)"
    )


def encode(value: Any) -> bytes:
    """Compact JSON, or ``TypeError``/``ValueError`` saying why ``value`` is not JSON."""
    try:
        return json.dumps(value, default=_convert, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        raise ValueError("NaN and infinity are not JSON") from None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (NumPy values converted), checked."""
    return json.loads(encode(value))


def check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a metric key must be a string, not a {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ValueError(f"a metric key must be 1-{MAX_KEY_CHARS} characters")
    return key


def check_metrics(metrics: Any) -> dict[str, Any]:
    """A dict of metrics (keys checked, values converted to JSON)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of key -> value, not a {type(metrics).__name__}")
    checked = {check_key(k): jsonable(v) for k, v in metrics.items()}
    size = len(encode(checked))
    if size > MAX_METRICS_BYTES:
        raise ValueError(f"the metrics are {size} bytes of JSON; the limit is {MAX_METRICS_BYTES}")
    return checked


def check_timestamp(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int (milliseconds since 1970), not a {type(value).__name__}"
        )
    if not 0 <= value <= 2**53:
        raise ValueError(f"{name} must be milliseconds since 1970 (0 to 2**53)")
    return value


def check_uuid(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"prediction_uuid must be a string, not a {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"prediction_uuid {value[:60]!r} is not a UUID") from None


def note(message: str) -> None:
    print(f"[kiln metrics] {message}", file=sys.stderr, flush=True)


# ---- one call's record ----------------------------------------------------------------------


class CallRecord:
    """The metrics of one call of a decorated function (or of one ``track_metric`` outside)."""

    def __init__(self, deployment: str) -> None:
        self.prediction_uuid = str(uuid.uuid4())
        self.deployment = deployment
        self.start_ms = now_ms()
        self.end_ms = self.start_ms
        self.metrics: dict[str, Any] = {}

    def as_dict(self) -> dict[str, Any]:
        """CML's shape of a stored record."""
        return {
            "modelCrn": DEV_MODEL,
            "modelBuildCrn": DEV_BUILD,
            "modelDeploymentCrn": self.deployment,
            "predictionUuid": self.prediction_uuid or None,  # None: an aggregate
            "startTimeStampMs": self.start_ms,
            "endTimeStampMs": self.end_ms,
            "metrics": dict(self.metrics),
        }


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "kiln_metrics_call", default=None
)


def replica_hook() -> Any:
    """The model server's hook when this process is a replica serving calls, else None."""
    return sys.modules.get(REPLICA_HOOK)


def deployment_reference() -> str:
    """The deployment this process serves, as a Kiln reference (``owner/project/model/N``),
    or CML's development deployment outside a replica."""
    project, model = os.environ.get("KILN_PROJECT"), os.environ.get("KILN_MODEL")
    number = os.environ.get("KILN_MODEL_DEPLOYMENT")
    if replica_hook() is not None and project and model and number:
        return f"{project}/{model}/{number}"
    return DEV_DEPLOYMENT


def begin_call() -> tuple[CallRecord, contextvars.Token[CallRecord | None]]:
    record = CallRecord(deployment_reference())
    return record, _current.set(record)


def end_call(record: CallRecord, token: contextvars.Token[CallRecord | None]) -> None:
    """The call is over: its metrics go to the model server (a replica) or the store."""
    _current.reset(token)
    record.end_ms = now_ms()
    size = len(encode(record.metrics))
    if size > MAX_METRICS_BYTES:
        note(
            f"the metrics of prediction {record.prediction_uuid} are {size} bytes of JSON, "
            f"over the limit of {MAX_METRICS_BYTES}: they are dropped (the prediction is not)"
        )
        record.metrics = {}
    hook = replica_hook()
    if hook is None:
        STORE.add(record)
    elif hook.active():
        hook.record(record.prediction_uuid, record.start_ms, record.end_ms, record.metrics)
    else:  # a replica's own thread, outside any call: nothing would ever read it
        _note_outside_once("a decorated function called outside a model call")


def _note_outside_once(what: str) -> None:
    if not _warned_outside.is_set():
        _warned_outside.set()
        note(
            f"metrics of {what} are dropped in a replica: only those of calls of a function "
            "decorated with @cml_model(metrics=True) are kept (noted once)"
        )


_warned_outside = threading.Event()


def track(key: Any, value: Any) -> None:
    key = check_key(key)
    value = jsonable(value)
    record = _current.get()
    if record is not None:
        record.metrics[key] = value
        return
    if replica_hook() is not None:
        _note_outside_once(f"track_metric({key!r}, ...) outside a model call")
        return
    standalone = CallRecord(DEV_DEPLOYMENT)
    standalone.metrics[key] = value
    STORE.add(standalone)


# ---- the in-memory store ----------------------------------------------------------------------


class MemoryStore:
    """This process's metrics (sessions and jobs): gone when the process ends, as in CML."""

    def __init__(self, limit: int = MAX_STORED_CALLS) -> None:
        self._calls: deque[CallRecord] = deque(maxlen=limit)
        self._by_uuid: dict[str, CallRecord] = {}
        self._lock = threading.Lock()

    def add(self, record: CallRecord) -> None:
        with self._lock:
            if len(self._calls) == self._calls.maxlen:
                self._by_uuid.pop(self._calls[0].prediction_uuid, None)
            self._calls.append(record)
            if record.prediction_uuid:
                self._by_uuid[record.prediction_uuid] = record

    def has(self, prediction_uuid: str) -> bool:
        with self._lock:
            return prediction_uuid in self._by_uuid

    def add_delayed(self, prediction_uuid: str, metrics: dict[str, Any]) -> None:
        with self._lock:
            record = self._by_uuid.get(prediction_uuid)
            if record is None:
                raise ValueError(f"no prediction {prediction_uuid} in this process's metrics")
            merged = {**record.metrics, **metrics}
            size = len(encode(merged))
            if size > MAX_METRICS_BYTES:
                raise ValueError(
                    f"the prediction's metrics would be {size} bytes of JSON; the limit is "
                    f"{MAX_METRICS_BYTES}"
                )
            record.metrics = merged

    def add_aggregate(self, metrics: dict[str, Any], start_ms: int, end_ms: int) -> None:
        record = CallRecord(DEV_DEPLOYMENT)
        record.prediction_uuid = ""  # not a prediction's
        record.start_ms, record.end_ms, record.metrics = start_ms, end_ms, metrics
        self.add(record)

    def read(
        self, start_ms: int | None, end_ms: int | None, prediction_uuid: str | None = None
    ) -> list[dict[str, Any]]:
        """Records that started in [start_ms, end_ms], oldest first."""
        with self._lock:
            calls = list(self._calls)
        return [
            c.as_dict()
            for c in calls
            if (start_ms is None or c.start_ms >= start_ms)
            and (end_ms is None or c.start_ms <= end_ms)
            and (prediction_uuid is None or c.prediction_uuid == prediction_uuid)
        ]

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
            self._by_uuid.clear()


STORE = MemoryStore()


# ---- Kiln's API ---------------------------------------------------------------------------------


def model_path(reference: Any) -> tuple[str, int | None]:
    """``owner/project/model[/deployment]`` (optionally ``crn:kiln:``-prefixed) as the API
    path of the model's metrics and the deployment number, if one is named."""
    if not isinstance(reference, str):
        raise TypeError(f"a model reference must be a string, not a {type(reference).__name__}")
    text = reference[len(KILN_CRN) :] if reference.startswith(KILN_CRN) else reference
    parts = text.strip("/").split("/")
    if len(parts) not in (3, 4) or not all(parts) or (len(parts) == 4 and not parts[3].isdigit()):
        raise ValueError(
            f"{reference[:200]!r} is not a Kiln model reference: use 'owner/project/model' or "
            "'owner/project/model/<deployment number>' (the model page shows it)"
        )
    quoted = "/".join(urllib.parse.quote(p, safe="") for p in parts[:3])
    owner_project_model = quoted.split("/")
    path = "api/v1/projects/{}/{}/models/{}/metrics".format(*owner_project_model)
    return path, int(parts[3]) if len(parts) == 4 else None


def api_url() -> str:
    url = os.environ.get("KILN_API_URL", "")
    if not url:
        raise RuntimeError(
            "KILN_API_URL is not set: Kiln sets it in sessions and jobs; elsewhere set it to "
            "Kiln's address (https://kiln.example.com/)"
        )
    return url if url.endswith("/") else url + "/"


def api_key(given: str | None = None) -> str:
    """A Kiln API key (``kiln_...``): the argument, else ``KILN_API_KEY``, else CML's name
    ``CDSW_APIV2_KEY`` (set either as a project or user environment variable)."""
    key = given or os.environ.get("KILN_API_KEY") or os.environ.get("CDSW_APIV2_KEY")
    if not key:
        raise RuntimeError(
            "reading and writing a deployed model's metrics takes a Kiln API key: create one "
            "(Settings > API keys) and set it as KILN_API_KEY in the project's environment"
        )
    return key


def _tls() -> ssl.SSLContext:
    bundle = os.environ.get("KILN_CA_BUNDLE")
    if bundle and os.path.isfile(bundle):
        return ssl.create_default_context(cafile=bundle)
    return ssl.create_default_context()


def http_json(method: str, url: str, body: Any = None, bearer: str | None = None) -> Any:
    """One JSON call; the decoded answer, or ``KilnApiError`` with Kiln's message."""
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"{url[:200]!r} is not an http(s) URL")
    data = None if body is None else encode(body)
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (checked)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    context = _tls() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(  # noqa: S310 (http(s) only, checked above)
            request, timeout=HTTP_SECONDS, context=context
        ) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as failed:
        raw = failed.read()
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        message = raw.decode("utf-8", "replace")[:500]
        if isinstance(decoded, dict):
            message = str(decoded.get("detail") or decoded.get("response") or decoded)
        raise KilnApiError(failed.code, message) from None
