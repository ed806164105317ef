"""The builds API without a builder: queueing, numbering, listing, cancelling a queued build,
roles and strangers, bad input (problem+json, nothing written). Builds that run:
test_builder_service.py."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker
from kiln.db.models import AuditEvent, User
from kiln.db.workload_models import JobRun, Workload
from kiln.domain.resources import QUOTA_WAIT_PREFIX, Resources, set_quota
from kiln.settings import Settings
from kiln.testing.live import free_port
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share


def start(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/builds", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    build: dict[str, Any] = response.json()
    return build


def count(engine: Engine) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(Build)) or 0)


def test_queue_number_list_and_get(client: TestClient, alice: Account, engine: Engine) -> None:
    project = make_project(client, alice)
    first = start(client, project, alice)
    assert first["number"] == 1 and first["state"] == "queued"
    assert first["started_by"] == "alice" and first["base"] == "runtimes/python:3.11"
    assert first["source_commit"] is None and first["command"] == ["python3"]
    assert first["steps"] == [] and first["image"] is None
    second = start(
        client, project, alice, commit="main", no_cache=True, command=["python3", "main.py"]
    )
    assert second["number"] == 2 and second["source_commit"] == "main"
    assert second["no_cache"] is True and second["command"] == ["python3", "main.py"]
    page = client.get(f"{project}/builds?limit=1", headers=alice.headers).json()
    assert [b["number"] for b in page["items"]] == [2]
    rest = client.get(
        f"{project}/builds?limit=1&cursor={page['next_cursor']}", headers=alice.headers
    ).json()
    assert [b["number"] for b in rest["items"]] == [1] and rest["next_cursor"] is None
    got = client.get(f"{project}/builds/1", headers=alice.headers).json()
    assert got["id"] == first["id"]
    # A build is a workload: it counts against quotas like a session.
    with make_sessionmaker(engine)() as db:
        workload = db.get(Workload, first["id"])
        assert workload is not None and workload.kind == "build"
        assert workload.memory_bytes > 0 and workload.cpu_millis > 0
        actions = list(
            db.scalars(select(AuditEvent.action).where(AuditEvent.action.like("build.%")))
        )
    assert actions == ["build.create", "build.create"]
    # No log yet: an empty text body.
    logs = client.get(f"{project}/builds/1/logs", headers=alice.headers)
    assert logs.status_code == 200 and logs.text == ""


def test_numbers_are_per_project(client: TestClient, alice: Account) -> None:
    one, two = make_project(client, alice, "one"), make_project(client, alice, "two")
    assert start(client, one, alice)["number"] == 1
    assert start(client, two, alice)["number"] == 1


def test_cancel_a_queued_build(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    start(client, project, alice)
    cancelled = client.post(f"{project}/builds/1/cancel", headers=alice.headers)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "stopped" and "cancelled by alice" in body["reason"]
    again = client.post(f"{project}/builds/1/cancel", headers=alice.headers)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert "already ended" in again.json()["detail"]
    # It never ran: its log is empty, without asking a builder (none runs here).
    for follow in ("false", "true"):
        logs = client.get(f"{project}/builds/1/logs?follow={follow}", headers=alice.headers)
        assert logs.status_code == 200 and logs.content == b"", logs.text


def test_roles_and_strangers(
    client: TestClient, alice: Account, bob: Account, make_user: Any
) -> None:
    carol = make_user("carol")
    project = make_project(client, alice)
    start(client, project, alice)
    # A stranger cannot tell the project exists.
    for method, path in (
        ("GET", "/builds"),
        ("GET", "/builds/1"),
        ("GET", "/builds/1/logs"),
        ("POST", "/builds"),
        ("POST", "/builds/1/cancel"),
    ):
        response = client.request(method, f"{project}{path}", headers=bob.headers, json={})
        assert response.status_code == 404, (method, path, response.text)
    # A viewer sees builds but neither starts nor cancels them.
    share(client, project, alice, bob, "viewer")
    assert client.get(f"{project}/builds/1", headers=bob.headers).status_code == 200
    assert client.post(f"{project}/builds", headers=bob.headers, json={}).status_code == 403
    assert client.post(f"{project}/builds/1/cancel", headers=bob.headers).status_code == 403
    # Operators run jobs, but building images is writing: contributors and up.
    share(client, project, alice, carol, "operator")
    assert client.post(f"{project}/builds", headers=carol.headers, json={}).status_code == 403
    share(client, project, alice, carol, "contributor")
    assert start(client, project, carol)["started_by"] == "carol"
    assert client.post(f"{project}/builds/1/cancel", headers=carol.headers).status_code == 200


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"commit": "--upload-pack=evil"}, "not a commit name"),
    ({"commit": "main..other"}, "not a commit name"),
    ({"commit": "a b"}, "not a commit name"),
    ({"base": "library/python:3.11"}, "runtimes/"),
    ({"base": "runtimes/Python:3.11"}, "not an image reference"),
    ({"base": "runtimes/../python"}, "not an image reference"),
    ({"base": "runtimes/" + "a" * 300}, "base"),
    ({"command": []}, "command"),
    ({"command": [""]}, "command"),
    ({"command": ["python3", "a\u0000b"]}, "command"),
    ({"command": ["x"] * 65}, "command"),
    ({"no_cache": "yes"}, "no_cache"),
    ({"commit": 5}, "commit"),
    ({"unknown_field": 1, "commit": "x" * 201}, "commit"),
]


def test_bad_input_is_a_precise_422_and_writes_nothing(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    for body, words in BAD_BODIES:
        response = client.post(f"{project}/builds", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert words in response.text, (body, response.text)
    assert count(engine) == 0


def test_unknown_builds(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    for path in ("/builds/0", "/builds/99", "/builds/abc", "/builds/99999999999"):
        response = client.get(f"{project}{path}", headers=alice.headers)
        assert response.status_code in (404, 422), (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_bad_cursor_and_limit(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    for query in ("cursor=%%%", "limit=0", "limit=201"):
        response = client.get(f"{project}/builds?{query}", headers=alice.headers)
        assert response.status_code == 422, (query, response.text)


def test_logs_of_a_started_build_need_the_builder(
    client: TestClient, alice: Account, engine: Engine, settings: Settings
) -> None:
    """Once a build has run, its log lives with the builder: a builder that is down is a
    clean 503, not a 500."""
    settings.builder.port = free_port()  # nothing listens there
    project = make_project(client, alice)
    build = start(client, project, alice)
    with make_sessionmaker(engine)() as db:
        workload = db.get(Workload, build["id"])
        row = db.get(Build, build["id"])
        assert workload is not None and row is not None
        workload.state, row.claimed_by = "running", "builder@elsewhere"  # as a claim leaves it
        db.commit()
    response = client.get(f"{project}/builds/1/logs", headers=alice.headers)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "builder" in response.json()["detail"]


def test_a_cancel_racing_the_builders_claim_stops_the_build(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    """Read queued, claimed by a builder before the cancel lands: the cancel becomes a stop
    (the builder then stops it), not a 409."""
    from kiln.db.models import User
    from kiln.domain.builds import cancel_build

    project = make_project(client, alice)
    number = start(client, project, alice)["number"]
    factory = make_sessionmaker(engine)
    with factory() as db:
        build = db.scalar(select(Build).where(Build.number == number))
        assert build is not None
        workload = db.get(Workload, build.workload_id)
        assert workload is not None and workload.state == "queued"
        with factory() as builder_db:  # the builder claims it meanwhile
            claimed = builder_db.get(Workload, build.workload_id)
            assert claimed is not None
            claimed.state = "starting"
            builder_db.commit()
        user = db.scalar(select(User).where(User.username == "alice"))
        assert user is not None
        assert cancel_build(db, build, workload, user) is True
        db.commit()
        assert workload.state == "stopping" and workload.reason == "cancelled by alice"


def test_a_run_waiting_behind_a_build_names_it(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    """A running build holds quota like a session: a job run waiting for that quota names the
    build (not a session), with its page and its cancel path, which cancels it."""
    project = make_project(client, alice)
    number = start(client, project, alice)["number"]
    job = client.post(
        f"{project}/jobs", json={"name": "once", "script": "main.py"}, headers=alice.headers
    )
    assert job.status_code == 201, job.text
    run = client.post(f"{project}/jobs/once/runs", headers=alice.headers)
    assert run.status_code == 201, run.text
    # What the builder and the runner would write: the build claimed and running, the run
    # waiting for the quota the build fills.
    with make_sessionmaker(engine)() as db:
        build = db.scalars(select(Build).where(Build.number == number)).one()
        workload = db.get(Workload, build.workload_id)
        assert workload is not None
        workload.state = "running"
        user = db.scalars(select(User).where(User.username == "alice")).one()
        set_quota(db, user, Resources(workload.cpu_millis, workload.memory_bytes))
        attempt = db.get(JobRun, run.json()["id"])
        assert attempt is not None
        attempt.state = "waiting"
        attempt.reason = f"{QUOTA_WAIT_PREFIX} uses 1 of 1 vCPU"
        db.commit()
    seen = client.get(f"{project}/jobs/once/runs/{run.json()['id']}", headers=alice.headers)
    [holder] = seen.json()["quota"]["holders"]
    assert holder["kind"] == "build" and holder["name"] == f"build #{number}"
    assert holder["url"] == f"/p/alice/demo/builds/{number}"
    assert holder["stop"] == f"{project}/builds/{number}/cancel"
    assert client.post(holder["stop"], headers=alice.headers).status_code == 200
