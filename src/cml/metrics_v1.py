"""``import cml.metrics_v1 as metrics``: metrics of a model's predictions, CML's functions.

- ``track_metric(key, value)``: inside a call of a ``@cml_model(metrics=True)`` function,
  attaches ``key: value`` to that call's prediction; outside one, in a session or job, it
  records a call of its own in this process's in-memory store.
- ``track_delayed_metrics(metrics, prediction_uuid)``: metrics known later (the ground
  truth), added to the prediction's.
- ``track_aggregate_metrics(metrics, start_timestamp_ms, end_timestamp_ms,
  model_deployment_crn=...)``: metrics of a period (accuracy over a day), of no prediction.
- ``read_metrics(model_deployment_crn, start_timestamp_ms, end_timestamp_ms, ...)``:
  ``{"metrics": [{"predictionUuid", "startTimeStampMs", "endTimeStampMs", "metrics", ...}]}``,
  the records that started in the window, oldest first.

**Development or deployed.** With ``dev=True``, or CML's development deployment (what a
decorated function returns in a session), or a prediction UUID this process made, the
functions use the in-memory store. Otherwise they use Kiln's API for a deployed model named
by a Kiln reference, ``owner/project/model`` or ``owner/project/model/<deployment>``
(``model_deployment_crn=``, ``model_crn=``, or ``KILN_MODEL_CRN`` in the environment), with a
Kiln API key from ``KILN_API_KEY`` (or CML's ``CDSW_APIV2_KEY``) and Kiln's address from
``KILN_API_URL``, which Kiln sets in sessions and jobs.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from cml import _core

__all__ = ["read_metrics", "track_aggregate_metrics", "track_delayed_metrics", "track_metric"]

MAX_READ = 100_000  # records one read_metrics collects over the API's pages
PAGE = 200  # the API's largest page


def track_metric(key: str, value: Any) -> None:
    """Track ``key: value`` for the current prediction (see the module's note)."""
    _core.track(key, value)


def _reference(model_deployment_crn: Any, model_crn: Any = None) -> str | None:
    for given in (model_deployment_crn, model_crn):
        if given is not None:
            if not isinstance(given, str):
                raise TypeError(f"a model reference must be a string, not {type(given).__name__}")
            return given
    return os.environ.get("KILN_MODEL_CRN") or None


def _is_dev(dev: Any, reference: Any) -> bool:
    if not isinstance(dev, bool):
        raise TypeError(f"dev must be True or False, not a {type(dev).__name__}")
    return dev or reference in (_core.DEV_DEPLOYMENT, _core.DEV_MODEL, _core.DEV_BUILD)


def _need_reference(reference: str | None, what: str) -> str:
    if reference is None:
        raise ValueError(
            f"{what} of a deployed model needs the model: model_deployment_crn="
            "'owner/project/model[/deployment]' (or KILN_MODEL_CRN in the environment)"
        )
    return reference


def track_delayed_metrics(
    metrics: dict[str, Any],
    prediction_uuid: str,
    model_deployment_crn: str | None = None,
    dev: bool = False,
) -> None:
    """Add ``metrics`` to those of the prediction ``prediction_uuid`` (known later: the
    ground truth). A key the prediction already has is replaced."""
    checked = _core.check_metrics(metrics)
    uuid = _core.check_uuid(prediction_uuid)
    reference = _reference(model_deployment_crn)
    if _is_dev(dev, reference) or (model_deployment_crn is None and _core.STORE.has(uuid)):
        _core.STORE.add_delayed(uuid, checked)
        return
    path, _ = _core.model_path(_need_reference(reference, "track_delayed_metrics"))
    body = {"prediction_uuid": uuid, "metrics": checked}
    _core.http_json("POST", _core.api_url() + path, body, _core.api_key())


def track_aggregate_metrics(
    metrics: dict[str, Any],
    start_timestamp_ms: int,
    end_timestamp_ms: int,
    model_deployment_crn: str | None = None,
    dev: bool = False,
) -> None:
    """Record ``metrics`` of the period [start, end] (milliseconds since 1970), of no
    single prediction: an accuracy over a day of ground truth, for instance."""
    checked = _core.check_metrics(metrics)
    start = _core.check_timestamp("start_timestamp_ms", start_timestamp_ms)
    end = _core.check_timestamp("end_timestamp_ms", end_timestamp_ms)
    if end < start:
        raise ValueError("end_timestamp_ms is before start_timestamp_ms")
    reference = _reference(model_deployment_crn)
    if _is_dev(dev, reference):
        _core.STORE.add_aggregate(checked, start, end)
        return
    path, deployment = _core.model_path(_need_reference(reference, "track_aggregate_metrics"))
    body: dict[str, Any] = {
        "start_timestamp_ms": start,
        "end_timestamp_ms": end,
        "metrics": checked,
    }
    if deployment is not None:
        body["deployment"] = deployment
    _core.http_json("POST", _core.api_url() + path, body, _core.api_key())


def read_metrics(
    model_deployment_crn: str | None = None,
    start_timestamp_ms: int | None = None,
    end_timestamp_ms: int | None = None,
    model_crn: str | None = None,
    model_build_crn: str | None = None,
    dev: bool = False,
    prediction_uuid: str | None = None,
) -> dict[str, Any]:
    """The metrics records that started in [start, end] (default: all), oldest first, as
    ``{"metrics": [...]}``. ``model_build_crn`` is accepted for CML's signature; Kiln
    reads by model or deployment."""
    start = (
        None
        if start_timestamp_ms is None
        else _core.check_timestamp("start_timestamp_ms", start_timestamp_ms)
    )
    end = (
        None
        if end_timestamp_ms is None
        else _core.check_timestamp("end_timestamp_ms", end_timestamp_ms)
    )
    uuid = None if prediction_uuid is None else _core.check_uuid(prediction_uuid)
    reference = _reference(model_deployment_crn, model_crn)
    if _is_dev(dev, reference) or (reference is None and model_build_crn is None):
        return {"metrics": _core.STORE.read(start, end, uuid)}
    path, deployment = _core.model_path(_need_reference(reference, "read_metrics"))
    query: dict[str, Any] = {"limit": PAGE}
    for name, value in (("start_ms", start), ("end_ms", end), ("prediction_uuid", uuid)):
        if value is not None:
            query[name] = value
    if deployment is not None:
        query["deployment"] = deployment
    key = _core.api_key()
    records: list[dict[str, Any]] = []
    while True:
        url = _core.api_url() + path + "?" + urllib.parse.urlencode(query)
        page = _core.http_json("GET", url, None, key)
        records.extend(page.get("metrics", []))
        cursor = page.get("next_cursor")
        if not cursor or len(records) >= MAX_READ:
            return {"metrics": records[:MAX_READ]}
        query["cursor"] = cursor
