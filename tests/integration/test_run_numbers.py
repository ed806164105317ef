"""Runs are numbered per job (#1, #2, ... as in CML and Airflow) while the site-wide id keeps
naming them in URLs: the migration numbers existing runs, and concurrent writers never get
the same number."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from kiln.db.engine import make_engine, make_sessionmaker
from kiln.db.migrate import upgrade
from kiln.db.models import Project, User
from kiln.db.workload_models import Job, JobRun
from kiln.domain.jobs import queue_run
from tests.conftest import _postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of its own: the test migrates it step by step."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'kiln.db'}")
        yield engine
        engine.dispose()
        return
    for url in _postgres_database():
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def _seed_at_0004(engine: Engine) -> None:
    """Two jobs whose runs interleave, written with the 0004 schema (no numbers yet)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, full_name, email, password_hash, "
                "is_site_admin, is_active, created_at) VALUES "
                "(1, 'alice', '', '', 'x', false, true, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO projects (id, owner_name, owner_kind, owner_user_id, name, slug, "
                "description, visibility, created_at, updated_at) VALUES (1, 'alice', 'user', 1,"
                " 'demo', 'demo', '', 'private', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        for job_id, name in ((1, "prepare"), (2, "train")):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, project_id, name, script, arguments, env, timezone, "
                    "catch_up, max_retries, retry_backoff_seconds, max_concurrent_runs, "
                    "notify_on, enabled, created_at, updated_at) VALUES (:id, 1, :name, "
                    "'main.py', '[]', '{}', 'UTC', 'once', 0, 30, 1, '[]', true, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"id": job_id, "name": name},
            )
        for job_id in (1, 2, 1, 1, 2):  # ids come from the database, in this order
            conn.execute(
                text(
                    'INSERT INTO job_runs (job_id, "trigger", attempt, state, reason, '
                    "stop_cause, created_at) VALUES (:job, 'manual', 1, 'succeeded', '', '', "
                    "CURRENT_TIMESTAMP)"
                ),
                {"job": job_id},
            )


def test_the_migration_numbers_existing_runs_per_job(fresh_engine: Engine) -> None:
    upgrade(fresh_engine, "0004")
    _seed_at_0004(fresh_engine)
    upgrade(fresh_engine)
    maker = make_sessionmaker(fresh_engine)
    with maker() as db:
        numbered = db.execute(select(JobRun.job_id, JobRun.number).order_by(JobRun.id)).all()
        assert [tuple(r) for r in numbered] == [(1, 1), (2, 1), (1, 2), (1, 3), (2, 2)]
        newest_id = db.scalar(select(JobRun.id).order_by(JobRun.id.desc()).limit(1))
        counters = dict(db.execute(select(Job.name, Job.last_run_number)).all())
        assert counters == {"prepare": 3, "train": 2}
        # The next run of each job continues its own count; the id stays site-wide.
        train = db.scalars(select(Job).where(Job.name == "train")).one()
        run = queue_run(db, train, "manual")
        db.commit()
        assert run.number == 3 and run.id == newest_id + 1  # type: ignore[operator]


def test_concurrent_runs_of_one_job_get_distinct_numbers(engine: Engine) -> None:
    maker = make_sessionmaker(engine)
    with maker() as db:
        user = User(username="alice", password_hash="x")
        db.add(user)
        db.flush()
        project = Project(
            owner_name="alice", owner_kind="user", owner_user_id=user.id, name="d", slug="d"
        )
        db.add(project)
        db.flush()
        job = Job(project_id=project.id, name="train", script="main.py")
        db.add(job)
        db.commit()
        job_id = job.id

    errors: list[BaseException] = []

    def queue_some() -> None:
        try:
            for _ in range(5):
                with maker() as db:
                    found = db.get(Job, job_id)
                    assert found is not None
                    queue_run(db, found, "manual")
                    db.commit()
        except BaseException as exc:  # reported below, with the numbers
            errors.append(exc)

    threads = [threading.Thread(target=queue_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with maker() as db:
        numbers = sorted(db.scalars(select(JobRun.number).where(JobRun.job_id == job_id)))
        assert numbers == list(range(1, 21))
        assert db.get(Job, job_id).last_run_number == 20  # type: ignore[union-attr]
