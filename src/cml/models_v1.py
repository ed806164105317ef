"""``import cml.models_v1 as models``: the model decorator and calling a deployed model.

- ``@models.cml_model`` marks a model's function and leaves its calls as they are;
  ``@models.cml_model(metrics=True)`` gives each call a prediction UUID and collects what
  ``cml.metrics_v1.track_metric`` records during it. The function then returns, as in CML,
  ``{"prediction": <its result>, "uuid": "<prediction UUID>", "model_deployment_crn": ...}``
  (in a replica the deployment is Kiln's reference ``owner/project/model/<number>``; in a
  session or job CML's development deployment).
- ``models.call_model(model_access_key, ipt, api_key=None)`` calls a deployed model through
  Kiln's model router with CML's body and returns its decoded answer
  (``{"success": true, "response": ..., "ReplicaID": ...}``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from cml import _core

__all__ = ["call_model", "cml_model"]


def cml_model(function: Callable[..., Any] | None = None, *, metrics: bool = False) -> Any:
    """Decorate a model's function: ``@cml_model`` or ``@cml_model(metrics=True)``."""
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be True or False, not a {type(metrics).__name__}")

    def decorate(inner: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(inner):
            raise TypeError(f"cml_model decorates a function, not a {type(inner).__name__}")
        if not metrics:
            return inner

        @functools.wraps(inner)
        def with_metrics(*args: Any, **kwargs: Any) -> dict[str, Any]:
            record, token = _core.begin_call()
            try:
                prediction = inner(*args, **kwargs)
            finally:
                _core.end_call(record, token)
            return {
                "prediction": prediction,
                "uuid": record.prediction_uuid,
                "model_deployment_crn": record.deployment,
            }

        return with_metrics

    if function is None:
        return decorate
    return decorate(function)


def service_url() -> str:
    """Where ``call_model`` sends calls: ``KILN_MODEL_SERVICE_URL`` if set, else the model
    router under Kiln's main host (``$KILN_API_URL/modelservice/model``)."""
    explicit = os.environ.get("KILN_MODEL_SERVICE_URL")
    if explicit:
        return explicit
    return _core.api_url() + "modelservice/model"


def call_model(model_access_key: str, ipt: Any, api_key: str | None = None) -> Any:
    """Call the model whose access key this is with ``ipt`` (any JSON value) and return its
    decoded answer. ``api_key`` is a model API key (``kilnm_...``), by default
    ``KILN_MODEL_API_KEY`` from the environment; a model that allows unauthenticated calls
    takes none. A refusal or a failing function raises ``cml._core.KilnApiError`` (a
    ``RuntimeError``) with the status and Kiln's message."""
    if not isinstance(model_access_key, str) or not model_access_key:
        raise TypeError("model_access_key must be the model's access key (a string)")
    if api_key is not None and not isinstance(api_key, str):
        raise TypeError(f"api_key must be a string, not a {type(api_key).__name__}")
    request = _core.jsonable(ipt)
    bearer = api_key or os.environ.get("KILN_MODEL_API_KEY") or None
    body = {"accessKey": model_access_key, "request": request}
    return _core.http_json("POST", service_url(), body, bearer)
