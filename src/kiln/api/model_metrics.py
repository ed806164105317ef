"""The metrics a model's code tracks (``kiln.domain.model_metrics``; ``cml.metrics_v1``).

``GET .../models/{name}/metrics`` reads them by time range (viewers and up), in CML's shape;
``POST`` adds delayed metrics to a prediction (with ``prediction_uuid``) or records a period's
aggregate metrics (with ``start_timestamp_ms``/``end_timestamp_ms``) — operators and up, as
they run the model. Per-prediction metrics are written by the model router, not here.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, StrictInt

from kiln.api.deps import Db, OperateProject, ViewProject
from kiln.api.models import MODEL, Name
from kiln.api.schemas import InputModel
from kiln.domain import model_metrics as domain
from kiln.domain.errors import InvalidInput
from kiln.domain.models import get_model

router = APIRouter(tags=["models"])

METRICS = MODEL + "/metrics"
Millis = Annotated[int, Query(ge=0, le=domain.MAX_MS, description="Milliseconds since 1970.")]


class MetricsCreate(InputModel):
    metrics: dict[Annotated[str, Field(min_length=1, max_length=domain.MAX_KEY_CHARS)], Any] = (
        Field(description="Metric names and JSON values.")
    )
    prediction_uuid: str | None = Field(
        None,
        max_length=36,
        description="Delayed metrics: the prediction they belong to (merged into its metrics).",
    )
    start_timestamp_ms: StrictInt | None = Field(
        None, ge=0, le=domain.MAX_MS, description="Aggregate metrics: the period's start."
    )
    end_timestamp_ms: StrictInt | None = Field(
        None, ge=0, le=domain.MAX_MS, description="Aggregate metrics: the period's end."
    )
    deployment: StrictInt | None = Field(
        None, ge=1, description="Aggregate metrics: of this deployment (default: the model)."
    )


class MetricRecord(BaseModel):
    modelCrn: str  # CML's names
    modelDeploymentCrn: str | None
    deployment: int | None
    predictionUuid: str | None
    startTimeStampMs: int
    endTimeStampMs: int
    metrics: dict[str, Any]


class MetricsPage(BaseModel):
    metrics: list[MetricRecord]
    next_cursor: str | None


@router.get(METRICS, response_model=MetricsPage)
def read_metrics(
    name: Name,
    access: ViewProject,
    db: Db,
    start_ms: Millis | None = None,
    end_ms: Millis | None = None,
    prediction_uuid: Annotated[str | None, Query(max_length=36)] = None,
    deployment: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 200,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> MetricsPage:
    """The records that started in [start_ms, end_ms] (each end optional), in the order
    they were recorded; ``prediction_uuid`` or ``deployment`` narrow them."""
    model = get_model(db, access.project, name)
    page = domain.read(
        db,
        model,
        start_ms=start_ms,
        end_ms=end_ms,
        prediction_uuid=prediction_uuid,
        deployment=deployment,
        limit=limit,
        cursor=cursor,
    )
    records = domain.publish(db, access.project, model, page.items)
    return MetricsPage(metrics=[MetricRecord(**r) for r in records], next_cursor=page.next_cursor)


@router.post(METRICS, status_code=201, response_model=MetricRecord)
def track_metrics(name: Name, body: MetricsCreate, access: OperateProject, db: Db) -> MetricRecord:
    """Delayed metrics of a prediction (``prediction_uuid``) or a period's aggregate
    metrics (``start_timestamp_ms`` and ``end_timestamp_ms``), operators and up."""
    model = get_model(db, access.project, name)
    window = (body.start_timestamp_ms, body.end_timestamp_ms)
    if body.prediction_uuid is not None:
        if window != (None, None) or body.deployment is not None:
            raise InvalidInput(
                "delayed metrics name their prediction only: give prediction_uuid, or the "
                "period (start_timestamp_ms, end_timestamp_ms) of aggregate metrics",
                "prediction_uuid",
            )
        row = domain.add_delayed(db, model, body.prediction_uuid, body.metrics)
    else:
        start, end = window
        if start is None or end is None:
            raise InvalidInput(
                "give prediction_uuid (delayed metrics) or both start_timestamp_ms and "
                "end_timestamp_ms (aggregate metrics)",
                "start_timestamp_ms" if start is None else "end_timestamp_ms",
            )
        row = domain.add_aggregate(db, model, start, end, body.metrics, body.deployment)
    record = domain.publish(db, access.project, model, [row])[0]
    db.commit()  # data of the model, not a change to it: not in the audit log (a job may
    # send thousands of ground truths)
    return MetricRecord(**record)
