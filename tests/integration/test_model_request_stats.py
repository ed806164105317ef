"""The model router's request statistics in the database, on SQLite and PostgreSQL: two web
processes' counts add into the same rows (upserts that add), each call is counted for the
deployment whose replica answered and a refusal for the one serving, the series read back
with their percentiles, old rows pruned; and a real call through the router counted."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model
from kiln.db.model_stats_models import model_request_stats
from kiln.domain import model_stats
from kiln.runner.models import PRUNE_SECONDS, ModelKeeper
from kiln.serving.request_stats import RequestStats
from kiln.serving.router import ROUTE_SECONDS
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.model_support import serve_from
from tests.integration.test_model_router import call, model_key, new_model

NOW = dt.datetime(2026, 12, 3, 12, 30, 20, tzinfo=dt.UTC)


def _clock(moment: dt.datetime) -> Any:
    return lambda: moment.timestamp()


def _rows(engine: Engine) -> list[Any]:
    with make_sessionmaker(engine)() as db:
        table = model_request_stats.c
        query = select(
            table.deployment_id, table.minute, table.calls, table.client_errors, table.refusals
        ).order_by(table.deployment_id, table.minute)
        return [tuple(r) for r in db.execute(query)]


def test_two_processes_add_into_the_same_rows(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    new_model(client, alice)
    deployment = serve_from(engine, "adder", {"r1": "127.0.0.1:1", "r2": "127.0.0.1:2"})
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        model_id = db.scalar(select(Model.id))
    assert model_id is not None
    first = RequestStats(sessions, 60, clock=_clock(NOW))
    second = RequestStats(sessions, 60, clock=_clock(NOW))
    for _ in range(3):
        first.record(model_id, "r1", model_stats.OK, 0.010)
    first.record(model_id, "r2", model_stats.CLIENT_ERROR, 0.002)
    second.record(model_id, "r2", model_stats.OK, 0.300)
    second.record(model_id, "", model_stats.REFUSED, 30.0)  # no replica took it
    assert first.flush() == 1 and second.flush() == 1  # both replicas: one deployment
    assert first.flush() == 0  # nothing new
    minute = model_stats.minute_of(NOW)
    assert _rows(engine) == [(deployment, minute, 6, 1, 1)]
    # Again from both, a minute later: a new row; the first row grows.
    later = RequestStats(sessions, 60, clock=_clock(NOW + dt.timedelta(minutes=1)))
    later.record(model_id, "r1", model_stats.OK, 0.010)
    first.record(model_id, "r1", model_stats.SERVER_ERROR, 0.010)
    later.close()  # a stopping process writes what it holds
    first.close()
    assert _rows(engine) == [(deployment, minute, 7, 1, 1), (deployment, minute + 1, 1, 0, 0)]

    with sessions() as db:
        points = model_stats.series(db, model_id, NOW + dt.timedelta(minutes=1), 60, 1)
        totals = model_stats.by_deployment(db, model_id, NOW + dt.timedelta(minutes=1), 60)
    assert len(points) == 60 and points[-1].at.minute == 31 and points[-2].at.minute == 30
    last_two = points[-2].tally
    assert (last_two.calls, last_two.errors, last_two.server_errors) == (7, 3, 1)
    p50, p95 = last_two.percentile(0.5), last_two.percentile(0.95)
    assert p50 is not None and 7 < p50 < 15  # four calls of 10 ms among seven
    assert p95 is not None and p95 > 10_000  # the 30 s refusal
    assert sum(p.tally.calls for p in points[:-2]) == 0
    assert totals[deployment].calls == 8
    with sessions() as db:  # 15-minute steps over a day: the two minutes fall in one step
        day = model_stats.series(db, model_id, NOW + dt.timedelta(minutes=1), 24 * 60, 15)
    assert len(day) == 96 and sum(p.tally.calls for p in day) == 8


def test_refusals_without_a_deployment_and_deleted_models(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    new_model(client, alice)
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        model_id = db.scalar(select(Model.id))
    assert model_id is not None
    stats = RequestStats(sessions, 60, clock=_clock(NOW))
    stats.record(model_id, "", model_stats.REFUSED, 0.5)
    stats.record(model_id + 1000, "", model_stats.REFUSED, 0.5)  # no such model: skipped
    assert stats.flush() == 1
    assert _rows(engine) == [(model_stats.NO_DEPLOYMENT, model_stats.minute_of(NOW), 1, 0, 1)]
    # Deleting the model's row takes its statistics with it.
    with transaction(sessions) as db:
        model = db.get(Model, model_id)
        assert model is not None
        db.delete(model)
    assert _rows(engine) == []


def test_the_runners_model_keeper_prunes_by_the_setting(
    client: TestClient, alice: Account, engine: Engine, settings: Settings
) -> None:
    new_model(client, alice)
    sessions = make_sessionmaker(engine)
    with sessions() as db:
        model_id = db.scalar(select(Model.id))
    assert model_id is not None
    for days_ago in (0, 2, 4, 30):
        stats = RequestStats(sessions, 60, clock=_clock(NOW - dt.timedelta(days=days_ago)))
        stats.record(model_id, "", model_stats.OK, 0.001)
        stats.flush()
    with transaction(sessions) as db:
        assert model_stats.prune(db, NOW, retention_days=7) == 1  # 30 days old
    settings.models.stats_retention_days = 3
    keeper = ModelKeeper(None, settings, None, sessions)  # type: ignore[arg-type]
    try:
        with sessions() as db:
            keeper.pass_over(db, NOW)  # nothing deployed: the pass only prunes
            assert len(_rows(engine)) == 2
            settings.models.stats_retention_days = 1
            keeper.pass_over(db, NOW + dt.timedelta(minutes=1))  # pruned minutes ago: not yet
            assert len(_rows(engine)) == 2
            keeper.pass_over(db, NOW + dt.timedelta(seconds=PRUNE_SECONDS + 1))
            assert len(_rows(engine)) == 1
    finally:
        keeper.close()


def test_calls_through_the_router_are_counted(
    client: TestClient, alice: Account, engine: Engine, settings: Settings, replicas: Any
) -> None:
    settings.models.queue_seconds = 0.3
    access_key = new_model(client, alice)
    key = model_key(client, alice)
    refused = call(client, {"accessKey": access_key, "request": {}}, key)
    assert refused.status_code == 503  # nothing deployed yet
    router = client.app.model_router  # type: ignore[attr-defined]
    assert router.stats.flush() == 1  # counted for no deployment
    deployment = serve_from(engine, "adder", replicas(1))
    time.sleep(ROUTE_SECONDS + 0.1)  # the router saw no replica: it reads its routes again
    assert (
        call(client, {"accessKey": access_key, "request": {"a": 1, "b": 2}}, key).status_code == 200
    )
    failed = call(client, {"accessKey": access_key, "request": {"a": 1}}, key)
    assert failed.status_code >= 400
    # A call refused before its model is known belongs to no model.
    assert call(client, {"accessKey": "x" * 32, "request": {}}, key).status_code == 401
    router.stats.flush()
    rows = _rows(engine)
    assert [(r[0], r[2], r[4]) for r in rows] == [
        (model_stats.NO_DEPLOYMENT, 1, 1),
        (deployment, 2, 0),
    ]
