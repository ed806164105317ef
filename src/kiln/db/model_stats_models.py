"""The model router's request statistics: per model, per deployment and per minute, how many
calls came, how they ended and how long they took (``kiln.domain.model_stats``).

Each web process counts in memory and adds its counts to these rows every few seconds, so
every column is a sum that rows from several processes add into: the latency is a fixed
histogram (``h00`` ... ``h36``, one column per bucket of ``model_stats.BOUNDS_MS``), because
percentiles of two processes cannot be added but their histograms can.

A Core table rather than an ORM class: its 37 histogram columns are generated.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, Table

from kiln.db.models import Base

# Never change without a migration: rows already written count in these buckets.
HISTOGRAM_SIZE = 37
HISTOGRAM_COLUMNS = tuple(f"h{i:02d}" for i in range(HISTOGRAM_SIZE))
COUNT_COLUMNS = ("calls", "client_errors", "server_errors", "refusals")

model_request_stats = Table(
    "model_request_stats",
    Base.metadata,
    Column(
        "model_id", ForeignKey("models.id", ondelete="CASCADE"), primary_key=True, nullable=False
    ),
    # 0: calls the router refused before any deployment served them (nothing deployed).
    Column("deployment_id", Integer, primary_key=True, nullable=False, autoincrement=False),
    Column("minute", BigInteger, primary_key=True, nullable=False, autoincrement=False),
    *(Column(name, Integer, nullable=False) for name in COUNT_COLUMNS),
    Column("latency_ms_sum", Float, nullable=False),
    *(Column(name, Integer, nullable=False) for name in HISTOGRAM_COLUMNS),
    Index("ix_model_request_stats_minute", "minute"),
)
