"""The metrics a model's code tracks (``cml.metrics_v1``): stored per prediction, read by
time range, pruned after the retention period.

Three writers:

- **the model router**, per call of a ``@cml_model(metrics=True)`` function: the model
  server hands it the call's records (``parse_replica_records``: untrusted bytes from the
  replica, checked here) and it stores one row per prediction UUID with the deployment of
  the replica that answered (``store_predictions``);
- **delayed metrics** (``add_delayed``, the API; operators and up): metrics known later (the
  ground truth) merged into a prediction's row, found by its UUID within the model;
- **aggregate metrics** (``add_aggregate``): a period's metrics, a row without a UUID.

One prediction's metrics are at most ``MAX_METRICS_BYTES`` of JSON (CML's library drops a
call's metrics over it, the API refuses them with 413), so a row stays small; rows older than
``KILN_MODELS_METRICS_RETENTION_DAYS`` are deleted by the runner's reconciler (``prune``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kiln.db.model_metric_models import ModelMetric
from kiln.db.model_models import Model, ModelDeployment, ModelReplica
from kiln.db.models import Project
from kiln.domain.errors import InvalidInput, NotFound, TooLarge
from kiln.domain.pagination import Page, paginate
from kiln.serving.model_server import MAX_DEPTH, too_deep  # the same bound as calls

MAX_METRICS_BYTES = 64 * 1024
MAX_KEY_CHARS = 200
MAX_RECORDS_PER_CALL = 16  # as the model server sends at most
MAX_CALL_BYTES = 80 * 1024  # the model server's budget for one call's records
MAX_MS = 2**53  # JSON's largest exact integer: far beyond any date
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Prediction:
    """One prediction's metrics as a replica reported them."""

    uuid: str
    start_ms: int
    end_ms: int
    metrics: dict[str, Any]


def encoded_size(metrics: dict[str, Any]) -> int:
    return len(json.dumps(metrics, separators=(",", ":"), allow_nan=False).encode())


def check_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise InvalidInput(f"{str(value)[:60]!r} is not a UUID", "prediction_uuid") from None


def check_metrics(metrics: dict[str, Any], field: str = "metrics") -> dict[str, Any]:
    """Keys 1-200 characters; the whole at most ``MAX_METRICS_BYTES`` of JSON (413)."""
    for key in metrics:
        if not 1 <= len(key) <= MAX_KEY_CHARS:
            raise InvalidInput(f"a metric key must be 1-{MAX_KEY_CHARS} characters", field)
    if too_deep(metrics, MAX_DEPTH):
        raise InvalidInput(f"metrics are nested more than {MAX_DEPTH} levels deep", field)
    try:
        size = encoded_size(metrics)
    except ValueError:
        raise InvalidInput("metrics must not hold NaN or infinity", field) from None
    if size > MAX_METRICS_BYTES:
        raise TooLarge(
            f"the metrics are {size} bytes of JSON; one prediction's may be at most "
            f"{MAX_METRICS_BYTES}",
            field,
        )
    return metrics


def check_window(start_ms: int, end_ms: int) -> None:
    for name, value in (("start_timestamp_ms", start_ms), ("end_timestamp_ms", end_ms)):
        if not 0 <= value <= MAX_MS:
            raise InvalidInput(f"{name} must be milliseconds since 1970 (0 to 2**53)", name)
    if end_ms < start_ms:
        raise InvalidInput("end_timestamp_ms is before start_timestamp_ms", "end_timestamp_ms")


def parse_replica_records(payload: bytes) -> list[Prediction]:
    """A replica's records of one call (a JSON array), or ``ValueError`` saying what is
    wrong: the replica runs the user's code, so nothing in it is trusted."""
    if len(payload) > MAX_CALL_BYTES:
        raise ValueError(f"{len(payload)} bytes of metrics, over {MAX_CALL_BYTES}")
    decoded = json.loads(payload.decode("utf-8"))
    if not isinstance(decoded, list) or len(decoded) > MAX_RECORDS_PER_CALL:
        raise ValueError(f"not an array of at most {MAX_RECORDS_PER_CALL} records")
    found: list[Prediction] = []
    for item in decoded:
        if not isinstance(item, dict) or not isinstance(item.get("metrics"), dict):
            raise ValueError("a record is not an object with metrics")
        start, end = item.get("start_ms"), item.get("end_ms")
        if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool):
            raise ValueError("a record's times are not milliseconds")
        if not (0 <= start <= MAX_MS and 0 <= end <= MAX_MS) or isinstance(end, bool):
            raise ValueError("a record's times are not milliseconds")
        name = item.get("uuid")
        if not isinstance(name, str):
            raise ValueError("a record has no prediction UUID")
        metrics = item["metrics"]
        if not all(isinstance(k, str) and 1 <= len(k) <= MAX_KEY_CHARS for k in metrics):
            raise ValueError("a metric key is not 1-200 characters")
        if encoded_size(metrics) > MAX_METRICS_BYTES:
            raise ValueError("a prediction's metrics are over 64 KB")
        found.append(Prediction(str(uuid.UUID(name)), start, end, metrics))
    return found


def store_predictions(
    db: Session, model_id: int, replica_id: str, predictions: list[Prediction]
) -> int:
    """Rows for the predictions a replica answered (committed); a UUID already stored (a
    replica that repeats one) is skipped. Returns how many were stored."""
    deployment_id = db.scalar(
        select(ModelReplica.deployment_id).where(ModelReplica.workload_id == replica_id)
    )
    uuids = [p.uuid for p in predictions]
    known = set(
        db.scalars(
            select(ModelMetric.prediction_uuid).where(ModelMetric.prediction_uuid.in_(uuids))
        )
    )
    stored = 0
    for prediction in predictions:
        if prediction.uuid in known:
            continue
        known.add(prediction.uuid)
        db.add(
            ModelMetric(
                model_id=model_id,
                deployment_id=deployment_id,
                prediction_uuid=prediction.uuid,
                start_ms=prediction.start_ms,
                end_ms=prediction.end_ms,
                metrics=prediction.metrics,
            )
        )
        stored += 1
    db.commit()
    return stored


def _deployment(db: Session, model: Model, number: int) -> ModelDeployment:
    found = db.scalar(
        select(ModelDeployment).where(
            ModelDeployment.model_id == model.id, ModelDeployment.number == number
        )
    )
    if found is None:
        raise NotFound(f"model {model.name} has no deployment {number}", "deployment")
    return found


def add_delayed(
    db: Session, model: Model, prediction_uuid: str, metrics: dict[str, Any]
) -> ModelMetric:
    """Merge ``metrics`` into the prediction's (a key it has is replaced; flushed)."""
    name = check_uuid(prediction_uuid)
    check_metrics(metrics)
    row = db.scalar(
        select(ModelMetric).where(
            ModelMetric.model_id == model.id, ModelMetric.prediction_uuid == name
        )
    )
    if row is None:
        raise NotFound(f"model {model.name} has no prediction {name} (or it is past retention)")
    merged = {**row.metrics, **metrics}
    size = encoded_size(merged)
    if size > MAX_METRICS_BYTES:
        raise TooLarge(
            f"the prediction's metrics would be {size} bytes of JSON; the limit is "
            f"{MAX_METRICS_BYTES}",
            "metrics",
        )
    row.metrics = merged
    db.flush()
    return row


def add_aggregate(
    db: Session,
    model: Model,
    start_ms: int,
    end_ms: int,
    metrics: dict[str, Any],
    deployment: int | None = None,
) -> ModelMetric:
    """A period's metrics, of the model or of one of its deployments (flushed)."""
    check_window(start_ms, end_ms)
    check_metrics(metrics)
    deployment_id = _deployment(db, model, deployment).id if deployment is not None else None
    row = ModelMetric(
        model_id=model.id,
        deployment_id=deployment_id,
        prediction_uuid=None,
        start_ms=start_ms,
        end_ms=end_ms,
        metrics=metrics,
    )
    db.add(row)
    db.flush()
    return row


def read(
    db: Session,
    model: Model,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    prediction_uuid: str | None = None,
    deployment: int | None = None,
    limit: int = 200,
    cursor: str | None = None,
) -> Page[ModelMetric]:
    """The model's records that started in [start_ms, end_ms], in the order recorded."""
    query = select(ModelMetric).where(ModelMetric.model_id == model.id)
    if start_ms is not None:
        query = query.where(ModelMetric.start_ms >= start_ms)
    if end_ms is not None:
        query = query.where(ModelMetric.start_ms <= end_ms)
    if prediction_uuid is not None:
        query = query.where(ModelMetric.prediction_uuid == check_uuid(prediction_uuid))
    if deployment is not None:
        query = query.where(ModelMetric.deployment_id == _deployment(db, model, deployment).id)
    return paginate(db, query, ModelMetric.id, limit, cursor)


def latest(db: Session, model: Model, limit: int = 20) -> list[ModelMetric]:
    """The model's most recent records, newest first (the model page's table)."""
    query = (
        select(ModelMetric)
        .where(ModelMetric.model_id == model.id)
        .order_by(ModelMetric.id.desc())
        .limit(limit)
    )
    return list(db.scalars(query))


def reference(project: Project, model: Model) -> str:
    """Kiln's name for a model in ``cml.metrics_v1`` (CML's CRN): ``owner/project/model``."""
    return f"{project.owner_name}/{project.slug}/{model.name}"


def publish(
    db: Session, project: Project, model: Model, rows: list[ModelMetric]
) -> list[dict[str, Any]]:
    """Rows in CML's shape (``predictionUuid``, ``startTimeStampMs`` ...) with Kiln's
    deployment number beside."""
    ids = {r.deployment_id for r in rows if r.deployment_id is not None}
    numbers: dict[int, int] = {}
    if ids:
        query = select(ModelDeployment.id, ModelDeployment.number).where(
            ModelDeployment.id.in_(ids)
        )
        numbers = {deployment_id: number for deployment_id, number in db.execute(query)}
    base = reference(project, model)
    published = []
    for row in rows:
        number = numbers.get(row.deployment_id) if row.deployment_id is not None else None
        published.append(
            {
                "modelCrn": base,
                "modelDeploymentCrn": f"{base}/{number}" if number is not None else None,
                "deployment": number,
                "predictionUuid": row.prediction_uuid,
                "startTimeStampMs": row.start_ms,
                "endTimeStampMs": row.end_ms,
                "metrics": row.metrics,
            }
        )
    return published


def prune(db: Session, retention_days: int, now_ms: int | None = None) -> int:
    """Delete the records that started more than ``retention_days`` ago (committed)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    result = db.execute(
        delete(ModelMetric).where(ModelMetric.start_ms < now - retention_days * DAY_MS)
    )
    db.commit()
    return int(getattr(result, "rowcount", 0) or 0)
