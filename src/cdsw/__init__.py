"""CDSW-era names for Kiln's CML library (``import cdsw``): ``cdsw.track_metric``,
``cdsw.read_metrics``, ``cdsw.track_delayed_metrics``, ``cdsw.track_aggregate_metrics``,
``cdsw.call_model`` and the decorator ``@cdsw.model_metrics`` (``@cml_model(metrics=True)``).
They are the same functions as ``cml.metrics_v1`` and ``cml.models_v1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cml.metrics_v1 import (
    read_metrics,
    track_aggregate_metrics,
    track_delayed_metrics,
    track_metric,
)
from cml.models_v1 import call_model, cml_model

__all__ = [
    "call_model",
    "model_metrics",
    "read_metrics",
    "track_aggregate_metrics",
    "track_delayed_metrics",
    "track_metric",
]


def model_metrics(function: Callable[..., Any]) -> Callable[..., Any]:
    """``@cdsw.model_metrics``: CDSW's name for ``@cml_model(metrics=True)``."""
    decorated: Callable[..., Any] = cml_model(function, metrics=True)
    return decorated
