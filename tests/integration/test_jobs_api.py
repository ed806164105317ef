"""The jobs API without a runner: create/edit/delete, validation, roles, cross-tenant,
queued runs and cancels, the pipeline graph. (Runs that execute: test_jobs_runner.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Job, JobRun
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share


def create(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    body = {"name": "train", "script": "main.py"} | body
    response = client.post(f"{project}/jobs", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def count(engine: Engine, model: type[Job] | type[JobRun]) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(model)) or 0)


def test_create_read_update_delete(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    job = create(
        client,
        project,
        alice,
        arguments=["--epochs", "3"],
        env={"LR": "0.1"},
        schedule="*/5 * * * *",
        timezone="Europe/Berlin",
    )
    assert job["script"] == "main.py" and job["arguments"] == ["--epochs", "3"]
    assert job["schedule"] == "*/5 * * * *" and job["next_run_at"] is not None
    assert job["created_by"] == "alice" and job["last_run"] is None
    assert job["notify_on"] == ["failure", "success", "timeout"]
    by_name = client.get(f"{project}/jobs/train", headers=alice.headers).json()
    assert by_name["id"] == job["id"]
    changed = client.patch(
        f"{project}/jobs/{job['id']}",
        json={"schedule": None, "max_retries": 2, "name": "train-v2"},
        headers=alice.headers,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["schedule"] is None and body["next_run_at"] is None
    assert body["max_retries"] == 2 and body["name"] == "train-v2"
    assert body["env"] == {"LR": "0.1"}  # untouched fields stay
    listed = client.get(f"{project}/jobs", headers=alice.headers).json()
    assert [j["name"] for j in listed] == ["train-v2"]
    assert client.delete(f"{project}/jobs/train-v2", headers=alice.headers).status_code == 204
    assert client.get(f"{project}/jobs", headers=alice.headers).json() == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"schedule": "* * * * * *"}, "exactly 5"),
        ({"schedule": "@reboot"}, "@reboot"),
        ({"schedule": "61 * * * *"}, "minute"),
        ({"schedule": "0 0 31 2 *"}, "never"),
        ({"timezone": "Mars/Olympus"}, "zone"),
        ({"script": "../other/main.py"}, ".."),
        ({"script": "/etc/passwd.py"}, "absolute"),
        ({"script": "missing.py"}, "does not exist"),
        ({"script": "README.md"}, "runs"),
        ({"script": ".git/config.py"}, ".git"),
        ({"max_retries": 11}, "max_retries"),
        ({"max_concurrent_runs": 0}, "max_concurrent_runs"),
        ({"timeout_minutes": 0}, "timeout_minutes"),
        ({"catch_up": "sometimes"}, "catch_up"),
        ({"env": {"1BAD": "x"}}, "environment variable"),
        ({"env": {"JOB_MAXIMUM_MINUTES": "forever"}}, "JOB_MAXIMUM_MINUTES"),
        ({"webhook_url": "ftp://example.com/x"}, "http"),
        ({"webhook_url": "https://user:pw@example.com/"}, "credentials"),
        ({"webhook_url": "https://example.com:99999/"}, "not a valid URL"),
        ({"webhook_url": "http://[::1/"}, "not a valid URL"),
        ({"notify_on": ["always"]}, "notify_on"),
        ({"profile": "huge"}, "no resource profile"),
        ({"runtime": "nope"}, "no runtime"),
        ({"parents": ["nope"]}, "no job named"),
        ({"name": ""}, "name"),
        ({"arguments": "--x"}, "list"),
        ({"enabled": "yes"}, "bool"),
    ],
)
def test_bad_input_is_a_clear_422_and_writes_nothing(
    client: TestClient, engine: Engine, alice: Account, body: dict[str, Any], words: str
) -> None:
    project = make_project(client, alice)
    response = client.post(
        f"{project}/jobs", json={"name": "train", "script": "main.py"} | body, headers=alice.headers
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert words.lower() in response.text.lower(), response.text
    assert count(engine, Job) == 0


def test_dependencies_refuse_self_and_cycles_and_draw_a_graph(
    client: TestClient, engine: Engine, alice: Account
) -> None:
    project = make_project(client, alice)
    create(client, project, alice, name="extract")
    create(client, project, alice, name="transform", parents=["extract"])
    create(client, project, alice, name="load", parents=["transform"])
    own = client.patch(
        f"{project}/jobs/extract", json={"parents": ["extract"]}, headers=alice.headers
    )
    assert own.status_code == 422 and "itself" in own.text
    cycle = client.patch(
        f"{project}/jobs/extract", json={"parents": ["load"]}, headers=alice.headers
    )
    assert cycle.status_code == 422 and "cycle" in cycle.text, cycle.text
    assert client.get(f"{project}/jobs/extract", headers=alice.headers).json()["parents"] == []
    graph = client.get(f"{project}/pipeline", headers=alice.headers).json()
    layers = {n["name"]: n["layer"] for n in graph["nodes"]}
    assert layers == {"extract": 0, "transform": 1, "load": 2}
    assert len(graph["edges"]) == 2


def test_duplicate_name_is_409(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    again = client.post(
        f"{project}/jobs", json={"name": "train", "script": "main.py"}, headers=alice.headers
    )
    assert again.status_code == 409


def test_run_now_queues_and_cancel_ends_a_queued_run(
    client: TestClient, engine: Engine, alice: Account
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    run = client.post(f"{project}/jobs/train/runs", headers=alice.headers)
    assert run.status_code == 201, run.text
    body = run.json()
    assert body["state"] == "queued" and body["trigger"] == "manual"
    assert body["triggered_by"] == "alice"
    url = f"{project}/jobs/train/runs/{body['id']}"
    assert client.get(f"{url}/logs", headers=alice.headers).text == ""  # not started yet
    cancelled = client.post(f"{url}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "stopped"
    again = client.post(f"{url}/cancel", headers=alice.headers)
    assert again.status_code == 409 and "already ended" in again.text
    page = client.get(f"{project}/jobs/train/runs", headers=alice.headers).json()
    assert [r["id"] for r in page["items"]] == [body["id"]]
    # A job with a run in progress cannot be deleted; a finished history can.
    assert client.delete(f"{project}/jobs/train", headers=alice.headers).status_code == 204
    assert count(engine, JobRun) == 0


def test_roles_operators_run_but_do_not_edit(
    client: TestClient, alice: Account, bob: Account, make_user: Any
) -> None:
    carol = make_user("carol")
    project = make_project(client, alice)
    create(client, project, alice)
    share(client, project, alice, bob, "operator")
    share(client, project, alice, carol, "viewer")
    assert client.post(f"{project}/jobs/train/runs", headers=bob.headers).status_code == 201
    edit = client.patch(f"{project}/jobs/train", json={"max_retries": 1}, headers=bob.headers)
    assert edit.status_code == 403
    made = client.post(
        f"{project}/jobs", json={"name": "b", "script": "main.py"}, headers=bob.headers
    )
    assert made.status_code == 403
    assert client.get(f"{project}/jobs", headers=carol.headers).status_code == 200
    assert client.post(f"{project}/jobs/train/runs", headers=carol.headers).status_code == 403
    assert client.delete(f"{project}/jobs/train", headers=carol.headers).status_code == 403


def test_another_user_cannot_see_or_touch_jobs(
    client: TestClient, engine: Engine, alice: Account, bob: Account
) -> None:
    project = make_project(client, alice)
    job = create(client, project, alice)
    run = client.post(f"{project}/jobs/train/runs", headers=alice.headers).json()
    for method, path in [
        ("GET", "/jobs"),
        ("GET", "/jobs/train"),
        ("PATCH", "/jobs/train"),
        ("DELETE", "/jobs/train"),
        ("POST", "/jobs/train/runs"),
        ("GET", f"/jobs/train/runs/{run['id']}"),
        ("GET", f"/jobs/train/runs/{run['id']}/logs"),
        ("POST", f"/jobs/train/runs/{run['id']}/cancel"),
        ("GET", "/pipeline"),
    ]:
        response = client.request(method, f"{project}{path}", json={}, headers=bob.headers)
        assert response.status_code == 404, (method, path, response.text)
    # bob's own project cannot reach alice's job or run by id either.
    own = make_project(client, bob, name="mine")
    assert client.get(f"{own}/jobs/{job['id']}", headers=bob.headers).status_code == 404
    create(client, own, bob)
    assert client.get(f"{own}/jobs/train/runs/{run['id']}", headers=bob.headers).status_code == 404
    assert count(engine, JobRun) == 1


def test_unknown_ids_are_404_not_500(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    for path in ["/jobs/999999", "/jobs/99999999999999999999", "/jobs/nope/runs"]:
        assert client.get(f"{project}{path}", headers=alice.headers).status_code == 404, path
    for path in ["/jobs/train/runs/5", "/jobs/train/runs/99999999999"]:
        assert client.get(f"{project}{path}", headers=alice.headers).status_code in (404, 422)
    bad = client.get(f"{project}/jobs/train/runs/x", headers=alice.headers)
    assert bad.status_code == 422
    cursor = client.get(f"{project}/jobs/train/runs?cursor=zz", headers=alice.headers)
    assert cursor.status_code == 422
