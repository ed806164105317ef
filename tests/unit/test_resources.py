"""Quota arithmetic and the 'larger than every profile' refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from kiln.db.engine import make_sessionmaker
from kiln.db.models import Project, Team, User
from kiln.db.workload_models import Workload
from kiln.domain import resources
from kiln.domain.errors import InvalidInput
from kiln.settings import Settings
from tests.conftest import Account

GIB = 1024**3


def test_a_request_above_every_profile_is_refused(engine: Engine) -> None:
    with make_sessionmaker(engine)() as db:
        resources.check_request_fits_a_profile(db, resources.Resources(64000, 512 * GIB))  # none
        resources.create_profile(db, "small", resources.Resources(1000, 2 * GIB))
        resources.create_profile(db, "large", resources.Resources(4000, 16 * GIB))
        resources.check_request_fits_a_profile(db, resources.Resources(4000, 8 * GIB))
        with pytest.raises(InvalidInput, match="larger than every resource profile"):
            resources.check_request_fits_a_profile(db, resources.Resources(8000, 8 * GIB))
        with pytest.raises(InvalidInput):
            resources.check_request_fits_a_profile(db, resources.Resources(1000, 1 * GIB, gpu=1))


def test_quota_counts_live_workloads_only(
    engine: Engine, settings: Settings, make_user: Callable[..., Account]
) -> None:
    make_user("carol")
    with make_sessionmaker(engine)() as db:
        carol = db.query(User).filter_by(username="carol").one()
        project = Project(
            owner_name="carol", owner_kind="user", owner_user_id=carol.id, name="p", slug="p"
        )
        db.add(project)
        db.flush()
        for i, state in enumerate(["running", "starting", "succeeded", "failed", "waiting"]):
            db.add(
                Workload(
                    id=f"w{i}",
                    kind="session",
                    project_id=project.id,
                    user_id=carol.id,
                    cpu_millis=1000,
                    memory_bytes=2 * GIB,
                    state=state,
                )
            )
        db.flush()
        assert resources.user_usage(db, carol) == resources.Resources(2000, 4 * GIB, 0)
        # The site default (4 vCPU) has room for 0.5 more; 2.5 do not fit.
        assert (
            resources.quota_wait_reason(db, settings, carol, resources.Resources(500, GIB)) is None
        )
        wait = resources.quota_wait(db, settings, carol, resources.Resources(2500, GIB))
        assert wait is not None and wait.reason.startswith("waiting for quota: carol uses 2 of 4")
        assert sorted(w.id for w in resources.quota_holders(db, wait)) == ["w0", "w1"]
        resources.set_quota(db, carol, resources.Resources(2000, 16 * GIB))
        assert resources.quota_wait_reason(db, settings, carol, resources.Resources(500, GIB))
        resources.set_quota(db, carol, resources.Resources(4000, 16 * GIB))
        assert (
            resources.quota_wait_reason(db, settings, carol, resources.Resources(500, GIB)) is None
        )


def test_a_team_quota_bounds_the_team_projects_together(
    engine: Engine, settings: Settings, make_user: Callable[..., Account]
) -> None:
    make_user("carol")
    make_user("dave")
    with make_sessionmaker(engine)() as db:
        carol = db.query(User).filter_by(username="carol").one()
        dave = db.query(User).filter_by(username="dave").one()
        team = Team(name="ml")
        db.add(team)
        db.flush()
        shared = Project(
            owner_name="ml", owner_kind="team", owner_team_id=team.id, name="p", slug="p"
        )
        own = Project(
            owner_name="dave", owner_kind="user", owner_user_id=dave.id, name="q", slug="q"
        )
        db.add_all([shared, own])
        db.flush()
        db.add(
            Workload(
                id="carols", kind="session", project_id=shared.id, user_id=carol.id,
                cpu_millis=1000, memory_bytes=2 * GIB, state="running",
            )
        )  # fmt: skip
        db.flush()
        one = resources.Resources(1000, 2 * GIB)
        # Without a team quota, only dave's own (default: 4 vCPU) applies.
        assert resources.quota_wait_reason(db, settings, dave, one, shared) is None
        resources.set_quota(db, team, resources.Resources(1500, 8 * GIB))
        reason = resources.quota_wait_reason(db, settings, dave, one, shared)
        assert reason is not None and "team ml uses 1 of 1.5 vCPU" in reason
        # dave's own project is not the team's: the team quota does not apply there.
        assert resources.quota_wait_reason(db, settings, dave, one, own) is None


def test_the_builtin_runtime_is_listed_once_when_two_race_to_list_it(engine: Engine) -> None:
    """A new site's first session and its builder registering the base image both list the
    built-in runtime: the one that loses the race reads the winner's row (it answered 500
    with a unique-key error on PostgreSQL in a chaos test)."""
    import threading
    import time

    from sqlalchemy import func, select

    from kiln.db.workload_models import Runtime

    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite takes one writer at a time: the race is PostgreSQL's")
    factory = make_sessionmaker(engine)
    listed = threading.Event()
    with factory() as winner, factory() as loser:
        first = resources.ensure_builtin_runtime(winner)  # inserted, not committed yet

        def commit_soon() -> None:
            listed.wait(10)
            time.sleep(0.5)  # the loser's insert is waiting on the winner's by now
            winner.commit()

        threading.Thread(target=commit_soon, daemon=True).start()
        listed.set()
        second = resources.ensure_builtin_runtime(loser)
        loser.commit()
        assert second.id == first.id and second.is_default
        assert loser.scalar(select(func.count()).select_from(Runtime)) == 1
