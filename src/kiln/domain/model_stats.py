"""Request statistics of models: what the model router counts per call, how the counts are
added to the database, read back as series for the model page, and pruned.

A call ends one of four ways: **ok** (the replica answered 1xx-3xx), a **client error** (the
replica answered 4xx: the caller's input, as the function or the model server judged it), a
**server error** (the replica answered 5xx: the function raised or its answer was not JSON),
or a **refusal** (the router answered itself: no replica within the queue time 503, past the
call timeout 504, a replica that died 502). Calls refused before the model is known (a wrong
access key, a bad body) belong to no model and are not counted.

Latency is kept as a histogram over fixed, log-spaced bounds (``BOUNDS_MS``: 0.5 ms to 93 s,
each √2 times the last), one counter per bucket: counts from several web processes and
several minutes add up, and p50/p95 are read from the sum. A percentile is interpolated
geometrically inside its bucket, so it is within the bucket's width (±41 %) of the truth and
usually much closer; a call slower than the top bound counts as the top bound.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from kiln.db.model_models import Model, ModelReplica
from kiln.db.model_stats_models import (
    COUNT_COLUMNS,
    HISTOGRAM_COLUMNS,
    HISTOGRAM_SIZE,
    model_request_stats,
)

log = logging.getLogger("kiln.domain.model_stats")

BOUNDS_MS: tuple[float, ...] = tuple(0.5 * 2 ** (k / 2) for k in range(HISTOGRAM_SIZE - 1))
OK, CLIENT_ERROR, SERVER_ERROR, REFUSED = "ok", "client_error", "server_error", "refused"
_OUTCOME_COLUMN = {
    CLIENT_ERROR: "client_errors",
    SERVER_ERROR: "server_errors",
    REFUSED: "refusals",
}
NO_DEPLOYMENT = 0
BATCH = 500  # rows per upsert statement


def outcome(status: int, answered_by_replica: bool) -> str:
    if not answered_by_replica:
        return REFUSED
    if status >= 500:
        return SERVER_ERROR
    if status >= 400:
        return CLIENT_ERROR
    return OK


def bucket(latency_ms: float) -> int:
    """The histogram bucket of a latency: the first whose upper bound it does not pass."""
    return bisect_left(BOUNDS_MS, latency_ms)


@dataclass
class Tally:
    """Counts of some calls: what one row holds, and what rows add up to."""

    calls: int = 0
    client_errors: int = 0
    server_errors: int = 0
    refusals: int = 0
    latency_ms_sum: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_SIZE)

    def count(self, result: str, latency_ms: float) -> None:
        """One call (the router's hot path: a few additions)."""
        self.calls += 1
        if result != OK:
            column = _OUTCOME_COLUMN[result]
            setattr(self, column, getattr(self, column) + 1)
        self.latency_ms_sum += latency_ms
        self.histogram[bucket(latency_ms)] += 1

    def add(self, other: Tally) -> None:
        self.calls += other.calls
        self.client_errors += other.client_errors
        self.server_errors += other.server_errors
        self.refusals += other.refusals
        self.latency_ms_sum += other.latency_ms_sum
        for i, n in enumerate(other.histogram):
            self.histogram[i] += n

    @property
    def errors(self) -> int:
        return self.client_errors + self.server_errors + self.refusals

    def percentile(self, q: float) -> float | None:
        return percentile(self.histogram, q)

    @property
    def mean_ms(self) -> float | None:
        return self.latency_ms_sum / self.calls if self.calls else None


def percentile(histogram: list[int], q: float) -> float | None:
    """The ``q``-quantile (0 < q <= 1) in ms of the calls counted in ``histogram``; None for
    no calls. Inside its bucket the value is placed geometrically (the bounds are)."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(histogram):
        if n and seen + n >= rank:
            if i >= len(BOUNDS_MS):
                return BOUNDS_MS[-1]  # beyond the top bound: at least that
            high = BOUNDS_MS[i]
            low = BOUNDS_MS[i - 1] if i else high / math.sqrt(2)
            share = max(0.0, min(1.0, (rank - seen) / n))
            return low * (high / low) ** share
        seen += n
    return BOUNDS_MS[-1]


def minute_of(moment: dt.datetime | float) -> int:
    """The Unix minute of a moment (datetime or Unix seconds): the rows' time key."""
    seconds = moment.timestamp() if isinstance(moment, dt.datetime) else moment
    return int(seconds // 60)


# ---- writing ------------------------------------------------------------------------------


def add_counts(db: Session, counts: Mapping[tuple[int, str, int], Tally]) -> int:
    """Add what one web process counted, keyed by (model id, replica workload id or "",
    minute), to the rows of (model, deployment, minute): an upsert that adds, so processes
    never overwrite each other. The replica names the deployment that answered; a call the
    router refused before any replica took it counts for the model's serving deployment
    then (or ``NO_DEPLOYMENT``). Models deleted meanwhile are skipped. Returns the number of
    rows written; the caller commits."""
    if not counts:
        return 0
    model_ids = {model_id for model_id, _, _ in counts}
    query = select(Model.id, Model.serving_deployment_id).where(Model.id.in_(model_ids))
    serving = {model_id: deployment for model_id, deployment in db.execute(query)}
    replica_ids = {replica for _, replica, _ in counts if replica}
    deployments: dict[str, int] = {}
    if replica_ids:
        rows = db.execute(
            select(ModelReplica.workload_id, ModelReplica.deployment_id).where(
                ModelReplica.workload_id.in_(replica_ids)
            )
        )
        deployments = {workload: deployment for workload, deployment in rows}
    merged: dict[tuple[int, int, int], Tally] = {}
    for (model_id, replica, minute), tally in counts.items():
        if model_id not in serving:
            continue  # the model is gone (its rows went with it)
        deployment = deployments.get(replica) if replica else None
        if deployment is None:
            deployment = serving[model_id] or NO_DEPLOYMENT
        merged.setdefault((model_id, deployment, minute), Tally()).add(tally)
    values = [_row(key, tally) for key, tally in merged.items()]
    for start in range(0, len(values), BATCH):
        _upsert(db, values[start : start + BATCH])
    return len(values)


def _row(key: tuple[int, int, int], tally: Tally) -> dict[str, int | float]:
    model_id, deployment_id, minute = key
    row: dict[str, int | float] = {
        "model_id": model_id,
        "deployment_id": deployment_id,
        "minute": minute,
        "calls": tally.calls,
        "client_errors": tally.client_errors,
        "server_errors": tally.server_errors,
        "refusals": tally.refusals,
        "latency_ms_sum": tally.latency_ms_sum,
    }
    row.update(zip(HISTOGRAM_COLUMNS, tally.histogram, strict=True))
    return row


def _upsert(db: Session, values: list[dict[str, int | float]]) -> None:
    dialect = db.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(model_request_stats).values(values)
    table = model_request_stats.c
    added = (*COUNT_COLUMNS, "latency_ms_sum", *HISTOGRAM_COLUMNS)
    db.execute(
        statement.on_conflict_do_update(
            index_elements=[table.model_id, table.deployment_id, table.minute],
            set_={name: table[name] + statement.excluded[name] for name in added},
        )
    )


def prune(db: Session, now: dt.datetime, retention_days: int) -> int:
    """Delete the rows older than ``retention_days``; the caller commits."""
    oldest = minute_of(now) - retention_days * 24 * 60
    result = db.execute(delete(model_request_stats).where(model_request_stats.c.minute < oldest))
    return int(getattr(result, "rowcount", 0) or 0)


# ---- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One step of a series: its first minute (as a datetime) and the calls in it."""

    at: dt.datetime
    tally: Tally


def _tally_of(row: Sequence[Any]) -> Tally:
    """A ``Tally`` of the count, latency-sum and histogram columns, in that order."""
    counted = len(COUNT_COLUMNS)
    calls, client_errors, server_errors, refusals = (int(v) for v in row[:counted])
    return Tally(
        calls=calls,
        client_errors=client_errors,
        server_errors=server_errors,
        refusals=refusals,
        latency_ms_sum=float(row[counted]),
        histogram=[int(v) for v in row[counted + 1 :]],
    )


def _rows(db: Session, model_id: int, first_minute: int) -> list[tuple[int, int, Tally]]:
    table = model_request_stats.c
    columns = [table[name] for name in (*COUNT_COLUMNS, "latency_ms_sum", *HISTOGRAM_COLUMNS)]
    rows = db.execute(
        select(table.deployment_id, table.minute, *columns).where(
            table.model_id == model_id, table.minute >= first_minute
        )
    )
    return [(int(r[0]), int(r[1]), _tally_of(r[2:])) for r in rows]


def series(
    db: Session, model_id: int, now: dt.datetime, minutes: int, step_minutes: int
) -> list[Point]:
    """The model's calls over the last ``minutes`` (all deployments), in steps of
    ``step_minutes``, oldest first; steps without calls are present and empty."""
    last = minute_of(now)
    steps = max(1, minutes // step_minutes)
    first = last - steps * step_minutes + 1
    points = [Tally() for _ in range(steps)]
    for _, minute, tally in _rows(db, model_id, first):
        index = (minute - first) // step_minutes
        if 0 <= index < steps:
            points[index].add(tally)
    return [
        Point(dt.datetime.fromtimestamp((first + i * step_minutes) * 60, dt.UTC), tally)
        for i, tally in enumerate(points)
    ]


def by_deployment(db: Session, model_id: int, now: dt.datetime, minutes: int) -> dict[int, Tally]:
    """The model's calls over the last ``minutes`` per deployment id."""
    totals: dict[int, Tally] = {}
    for deployment, _, tally in _rows(db, model_id, minute_of(now) - minutes + 1):
        totals.setdefault(deployment, Tally()).add(tally)
    return totals
