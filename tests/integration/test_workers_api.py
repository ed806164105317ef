"""The Workers API with a session's token, on real sandboxes: launch, list, await and stop;
workers end with their session; the token works only on /api/v1/workers, only for its own
session's workers, only while the session runs; bad requests are 4xx and start nothing."""

from __future__ import annotations

import datetime as dt
import os
import signal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import utcnow
from kiln.db.workload_models import Workload
from kiln.domain import workers
from kiln.domain.identity import get_user
from kiln.domain.resources import Resources, create_profile, set_quota
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_sessions_support import (
    RunnerHandle,
    make_project,
    runner,  # noqa: F401  (fixture)
    share,
    start_session,
    wait_for,
)
from tests.integration.test_workers_support import WORKERS, bearer, token_of

pytestmark = pytest.mark.timeout(120)
SMALL = {"cpu": 0.25, "memory": 0.25}


def launch(client: TestClient, token: str, **body: Any) -> list[dict[str, Any]]:
    response = client.post(WORKERS, json={**SMALL, **body}, headers=bearer(token))
    assert response.status_code == 201, response.text
    workers: list[dict[str, Any]] = response.json()["workers"]
    return workers


def listed(client: TestClient, token: str, *ids: str) -> list[dict[str, Any]]:
    response = client.get(WORKERS, params=[("id", i) for i in ids], headers=bearer(token))
    assert response.status_code == 200, response.text
    workers: list[dict[str, Any]] = response.json()["workers"]
    return workers


def all_in(client: TestClient, token: str, ids: list[str], state: str) -> bool:
    return all(w["state"] == state for w in listed(client, token, *ids))


@pytest.fixture
def session_token(
    client: TestClient,
    alice: Account,
    settings: Settings,
    runner: RunnerHandle,  # noqa: F811
) -> tuple[str, dict[str, Any], str]:
    """(project path, running session, its workers token)."""
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    assert session["state"] == "running", session
    return project, session, token_of(settings, session["id"])


def test_launch_list_await_and_stop(
    client: TestClient, session_token: tuple[str, dict[str, Any], str]
) -> None:
    _, session, token = session_token
    quick = launch(client, token, n=2, code="print(42)")
    assert len(quick) == 2 and quick[0]["id"] != quick[1]["id"]
    for worker in quick:
        assert worker["state"] in ("running", "succeeded"), worker
        assert worker["session"] == session["id"] and worker["ip_address"] is None
        assert worker["command"] == ["python3", "-c", "print(42)"]
        assert (worker["cpu"], worker["memory"]) == (0.25, 0.25)
    ids = [w["id"] for w in quick]
    wait_for(lambda: all_in(client, token, ids, "succeeded"), timeout=60, what="succeeded")
    assert [w["exit_code"] for w in listed(client, token, *ids)] == [0, 0]
    one = client.get(f"{WORKERS}/{ids[0]}", headers=bearer(token)).json()
    assert one["state"] == "succeeded" and one["ended_at"] is not None

    failing = launch(client, token, n=1, code="raise SystemExit(3)")[0]
    wait_for(lambda: all_in(client, token, [failing["id"]], "failed"), timeout=60, what="fail")
    assert listed(client, token, failing["id"])[0]["exit_code"] == 3

    slow = launch(client, token, n=1, code="import time; time.sleep(300)")[0]
    assert slow["state"] == "running"
    stopped = client.delete(f"{WORKERS}/{slow['id']}", headers=bearer(token))
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "stopped"
    # Stopping again (or all: nothing is live) changes nothing.
    assert client.delete(f"{WORKERS}/{slow['id']}", headers=bearer(token)).json()["state"] == (
        "stopped"
    )
    assert client.delete(WORKERS, headers=bearer(token)).json() == {"workers": []}
    everything = listed(client, token)
    # Oldest first (workers of one launch share their time: then by id).
    assert [w["id"] for w in everything] == [*sorted(ids), failing["id"], slow["id"]]
    assert all(w.get("session") == session["id"] for w in everything)


def test_a_script_with_args_and_env(
    client: TestClient, session_token: tuple[str, dict[str, Any], str], alice: Account
) -> None:
    project, _, token = session_token
    script = (
        "import os, sys\n"
        "open('out-' + sys.argv[1], 'w').write(os.environ['MINE'] + os.environ['CDSW_MASTER_ID'])\n"
    )
    client.put(f"{project}/files/work.py", content=script.encode(), headers=alice.headers)
    worker = launch(client, token, n=1, script="work.py", args=["a"], env={"MINE": "m-"})[0]
    assert worker["command"] == ["python3", "work.py", "a"]
    wait_for(lambda: all_in(client, token, [worker["id"]], "succeeded"), timeout=60, what="done")
    written = client.get(f"{project}/files/out-a", headers=alice.headers)
    assert written.text == f"m-{worker['session']}"


def test_workers_end_with_their_session(
    client: TestClient,
    engine: Engine,
    session_token: tuple[str, dict[str, Any], str],
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    project, session, token = session_token
    done = launch(client, token, n=1, code="pass")[0]
    wait_for(lambda: all_in(client, token, [done["id"]], "succeeded"), timeout=60, what="done")
    slow = launch(client, token, n=2, code="import time; time.sleep(300)")
    stopped = client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text

    servicer = runner.current.servicer
    for worker in slow:
        status = servicer.runtime.status(f"worker-{worker['id']}")
        assert not status.running  # the sandbox is gone, not just the row
    # The token died with the session: the rows are read from the database instead.
    assert client.get(WORKERS, headers=bearer(token)).status_code == 401
    with make_sessionmaker(engine)() as db:
        rows = {r.id: r for r in db.scalars(select(Workload).where(Workload.kind == "worker"))}
    assert rows[done["id"]].state == "succeeded"  # ended by itself before: keeps its outcome
    for worker in slow:
        row = rows[worker["id"]]
        assert (row.state, row.reason) == ("stopped", "its parent session ended"), row.reason


def test_the_token_works_nowhere_else_and_nothing_else_works_here(
    client: TestClient, session_token: tuple[str, dict[str, Any], str], alice: Account
) -> None:
    project, session, token = session_token
    for method, url in [
        ("GET", "/api/v1/projects"),
        ("GET", f"{project}/sessions"),
        ("DELETE", f"{project}/sessions/{session['id']}"),
        ("GET", "/api/v1/auth/me"),
    ]:
        response = client.request(method, url, headers=bearer(token))
        assert response.status_code == 401, (url, response.text)
        assert "only on /api/v1/workers" in response.json()["detail"]
    git = client.get(
        f"/git/alice/{project.rsplit('/', 1)[1]}.git/info/refs?service=git-upload-pack",
        auth=("alice", token),
    )
    assert git.status_code == 401
    for headers in ({}, alice.headers, {"Authorization": "Bearer kwt_forged"}):
        response = client.get(WORKERS, headers=headers)
        assert response.status_code == 401, response.text
    still = client.get(f"{project}/sessions/{session['id']}", headers=alice.headers).json()
    assert still["state"] == "running"


def test_another_sessions_workers_are_not_found(
    client: TestClient,
    session_token: tuple[str, dict[str, Any], str],
    bob: Account,
    settings: Settings,
) -> None:
    _, _, token = session_token
    bobs_project = make_project(client, bob, "bobs")
    bobs_session = start_session(client, bobs_project, bob)
    bobs_token = token_of(settings, bobs_session["id"])
    bobs_worker = launch(client, bobs_token, n=1, code="import time; time.sleep(300)")[0]
    for method in ("GET", "DELETE"):
        response = client.request(method, f"{WORKERS}/{bobs_worker['id']}", headers=bearer(token))
        assert response.status_code == 404, response.text
    for method in ("GET", "DELETE"):
        by_query = client.request(
            method, WORKERS, params={"id": bobs_worker["id"]}, headers=bearer(token)
        )
        assert by_query.status_code == 404, by_query.text
    assert listed(client, token) == []
    assert listed(client, bobs_token, bobs_worker["id"])[0]["state"] == "running"


@pytest.mark.usefixtures("runner")
def test_the_token_follows_the_users_current_role(
    client: TestClient, alice: Account, make_user: Any, settings: Settings
) -> None:
    carol = make_user("carol")
    project = make_project(client, alice)
    share(client, project, alice, carol, "contributor")
    session = start_session(client, project, carol)
    token = token_of(settings, session["id"])
    assert len(launch(client, token, n=1, code="pass")) == 1
    share(client, project, alice, carol, "viewer")
    refused = client.post(WORKERS, json={**SMALL, "n": 1, "code": "pass"}, headers=bearer(token))
    assert refused.status_code == 403, refused.text
    client.delete(f"{project}/collaborators/carol", headers=alice.headers)
    assert client.get(WORKERS, headers=bearer(token)).status_code == 404  # cannot see it


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"n": 0, "code": "pass"}, 422, "n must be between 1 and 32"),
        ({"n": 33, "code": "pass"}, 422, "n must be between 1 and 32"),
        ({"n": "2", "code": "pass"}, 422, "valid integer"),
        ({"n": 1, "code": "pass", "cpu": 3}, 422, "larger than every resource profile"),
        ({"n": 1, "code": "pass", "memory": 64}, 422, "larger than every resource profile"),
        ({"n": 1, "code": "pass", "cpu": 0}, 422, "cpu must be a positive number"),
        ({"n": 1, "code": "pass", "memory": -1}, 422, "memory must be a positive number"),
        ({"n": 1, "code": "pass", "nvidia_gpu": 1}, 422, "no GPUs"),
        ({"n": 1, "code": "pass", "kernel": "r"}, 422, "workers run python3"),
        ({"n": 1, "code": "pass", "script": "work.py"}, 422, "not both"),
        ({"n": 1}, 422, "either script"),
        ({"n": 1, "code": "  "}, 422, "code is empty"),
        ({"n": 1, "code": "pass", "args": ["x"]}, 422, "args go with a script"),
        ({"n": 1, "script": "../other/work.py"}, 422, ".."),
        ({"n": 1, "script": "/etc/passwd"}, 422, "absolute"),
        ({"n": 1, "script": "missing.py"}, 422, "does not exist"),
        ({"n": 1, "script": "data.txt"}, 422, "Kiln runs"),
        ({"n": 1, "code": "pass", "env": {"BAD NAME": "x"}}, 422, "environment variable"),
        ({"n": 1, "code": "pass\x00"}, 422, "NUL"),
        ({"n": 8, "code": "pass", "cpu": 0.5}, 422, "whole quota"),
        ({"n": 4, "code": "pass", "cpu": 0.5}, 409, "no room in the quota now"),
    ],
)
def test_bad_requests_start_nothing(
    client: TestClient,
    engine: Engine,
    session_token: tuple[str, dict[str, Any], str],
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
    body: dict[str, Any],
    status: int,
    words: str,
) -> None:
    project, _, token = session_token
    client.put(f"{project}/files/work.py", content=b"print(1)\n", headers=alice.headers)
    client.put(f"{project}/files/data.txt", content=b"1\n", headers=alice.headers)
    with transaction(make_sessionmaker(engine)) as db:
        create_profile(db, "small", Resources(1000, 2 * 1024**3))
        create_profile(db, "large", Resources(2000, 4 * 1024**3))
        set_quota(db, get_user(db, "alice"), Resources(2000, 8 * 1024**3))
    response = client.post(WORKERS, json={**SMALL, **body}, headers=bearer(token))
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert words in response.json()["detail"], response.json()
    with make_sessionmaker(engine)() as db:
        count = db.scalar(select(func.count()).where(Workload.kind == "worker"))
    assert count == 0
    assert [w for w in runner.current.servicer.runtime.list_workloads() if "worker" in w] == []


def test_workers_of_a_session_that_died_are_settled_by_the_reconciler(
    client: TestClient,
    engine: Engine,
    session_token: tuple[str, dict[str, Any], str],
    runner: RunnerHandle,  # noqa: F811
) -> None:
    """Nobody asks the API: the runner stops the workers, the reconciler records it."""
    _, session, token = session_token
    slow = launch(client, token, n=1, code="import time; time.sleep(300)")[0]
    record = runner.current.servicer._records[f"session-{session['id']}"]
    os.kill(record.runtime_state["pid1"], signal.SIGKILL)  # type: ignore[index]

    def settled() -> Workload | None:
        with make_sessionmaker(engine)() as db:
            row = db.get(Workload, slow["id"])
            return row if row is not None and row.state == "stopped" else None

    row = wait_for(settled, timeout=60, what="the reconciler to settle the worker")
    assert row.reason == "its parent session ended"
    assert not runner.current.servicer.runtime.status(f"worker-{slow['id']}").running


def test_a_worker_whose_start_was_interrupted_does_not_hold_quota_forever(
    client: TestClient, engine: Engine, session_token: tuple[str, dict[str, Any], str]
) -> None:
    """A web process that stopped between acknowledging a launch and starting it leaves a
    queued worker; the reconciler's pass fails it after a grace period."""
    _, session, token = session_token
    with transaction(make_sessionmaker(engine)) as db:
        parent = db.get(Workload, session["id"])
        assert parent is not None
        db.add(
            Workload(
                id="0123456789abcdef",
                kind="worker",
                project_id=parent.project_id,
                user_id=parent.user_id,
                parent_id=parent.id,
                cpu_millis=250,
                memory_bytes=256 * 1024**2,
                command=["python3", "-c", "pass"],
                state="queued",
                created_at=utcnow() - workers.START_GRACE - dt.timedelta(seconds=1),
            )
        )

    def failed() -> Workload | None:
        with make_sessionmaker(engine)() as db:
            row = db.get(Workload, "0123456789abcdef")
            return row if row is not None and row.state == "failed" else None

    row = wait_for(failed, timeout=30, what="the reconciler to fail the stale worker")
    assert "interrupted" in row.reason
    too_many = client.get(WORKERS, params=[("id", "x")] * 501, headers=bearer(token))
    assert too_many.status_code == 422 and "at most 500" in too_many.json()["detail"]
