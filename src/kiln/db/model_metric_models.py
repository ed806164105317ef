"""ORM model of the metrics a model's code tracks (``cml.metrics_v1``): one row per
prediction of a ``@cml_model(metrics=True)`` function (its UUID, times and metrics, with
delayed metrics merged in later), or per aggregate (a period's metrics, no UUID).

Rows are written by the model router (per call) and the metrics API (delayed and
aggregate), read by the API and the model page by time range, and pruned after
``KILN_MODELS_METRICS_RETENTION_DAYS``. Rules live in ``kiln.domain.model_metrics``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from kiln.db.models import Base


class ModelMetric(Base):
    """``start_ms``/``end_ms`` are CML's timestamps (milliseconds since 1970, UTC): when the
    prediction ran, or the period an aggregate covers; reads select on ``start_ms``.
    ``deployment_id`` is the deployment that answered (None for an aggregate of the whole
    model). ``prediction_uuid`` is unique where set."""

    __tablename__ = "model_metrics"
    __table_args__ = (
        Index("ix_model_metrics_model_id_start_ms", "model_id", "start_ms"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    deployment_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_deployments.id", ondelete="CASCADE"), nullable=True
    )
    prediction_uuid: Mapped[str | None] = mapped_column(String(36), nullable=True, unique=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, index=True)  # the retention prune
    end_ms: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
