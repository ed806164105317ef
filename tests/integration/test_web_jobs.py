"""Jobs pages of the UI: the list and its empty state, the pipeline graph, creating, editing
and deleting through the forms (with the CSRF token htmx sends), run now and cancel, the run
page's log poller, and that viewers, operators and strangers see and may do exactly what the
API allows."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Job, JobRun
from kiln.domain.jobs import queue_run
from kiln.web.log_chunks import decodable
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)

FORM: dict[str, Any] = {
    "name": "train",
    "script": "main.py",
    "arguments": "--epochs\n3\n",
    "env": "LR=0.1\n",
    "schedule": "",
    "timezone": "UTC",
    "catch_up": "once",
    "max_retries": "1",
    "retry_backoff_seconds": "30",
    "max_concurrent_runs": "1",
    "notify_on": ["failure"],
    "enabled": "true",
}


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def project_page(client: TestClient, owner: Account, name: str = "demo") -> tuple[str, str]:
    """A project from the template: (API path, UI path)."""
    api = make_project(client, owner, name)
    return api, api.replace("/api/v1/projects", "/p")


def count(engine: Engine, model: type[Job] | type[JobRun]) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(model)) or 0)


def create(ui: UiClient, page: str, **fields: Any) -> str:
    """Create a job with the form; returns the job page it sends the browser to."""
    response = ui.htmx("POST", f"{page}/jobs/new", data=FORM | fields)
    assert response.status_code == 204, response.text
    location: str = response.headers["hx-redirect"]
    assert re.fullmatch(rf"{page}/jobs/\d+", location), location
    return location


def test_empty_state_and_tab(alice_ui: UiClient, client: TestClient, alice: Account) -> None:
    _, page = project_page(client, alice)
    html = alice_ui.page(f"{page}/jobs")
    assert f'href="{page}/jobs" class="active">Jobs</a>' in html
    assert "No jobs yet" in html and "cron schedule" in html
    assert "kiln jobs create alice/demo NAME --script main.py" in html
    assert f'href="{page}/jobs/new"' in html
    assert 'class="pipeline"' not in html  # no graph without jobs
    assert "Jobs</a>" in alice_ui.page(page)  # the tab is on every project page
    form = alice_ui.page(f"{page}/jobs/new")
    for field in ("name", "script", "arguments", "schedule", "timezone", "catch_up", "env"):
        assert f'name="{field}"' in form
    for field in ("timeout_minutes", "max_retries", "max_concurrent_runs", "webhook_url"):
        assert f'name="{field}"' in form


def test_create_via_form_then_list_detail_edit_delete(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    api, page = project_page(client, alice)
    job_page = create(alice_ui, page, schedule="0 3 * * *", timezone="Europe/Berlin")
    job = client.get(f"{api}/jobs/train", headers=alice.headers).json()
    assert job["arguments"] == ["--epochs", "3"] and job["env"] == {"LR": "0.1"}
    assert job["schedule"] == "0 3 * * *" and job["timezone"] == "Europe/Berlin"
    assert job["max_retries"] == 1 and job["notify_on"] == ["failure"]
    assert job["created_by"] == "alice"

    html = alice_ui.page(f"{page}/jobs")
    assert "train" in html and "main.py" in html and "0 3 * * *" in html
    assert "Europe/Berlin" in html and "never run" in html and "Run now" in html
    detail = alice_ui.page(job_page)
    assert "No runs yet" in detail and "Edit" in detail and "Delete" in detail

    # A second job after the first: the edit form offers the first as a parent.
    child = create(alice_ui, page, name="report", schedule="")
    edit = alice_ui.page(f"{child}/edit")
    assert 'value="train"' in edit and 'name="parents"' in edit
    response = alice_ui.htmx(
        "POST", f"{child}/edit", data=FORM | {"name": "report", "parents": ["train"]}
    )
    assert response.status_code == 204, response.text
    assert client.get(f"{api}/jobs/report", headers=alice.headers).json()["parents"] == ["train"]

    # Clearing the schedule in the form clears it on the job.
    response = alice_ui.htmx("POST", f"{job_page}/edit", data=FORM | {"schedule": ""})
    assert response.status_code == 204, response.text
    assert client.get(f"{api}/jobs/train", headers=alice.headers).json()["schedule"] is None

    response = alice_ui.htmx("POST", f"{child}/delete")
    assert response.status_code == 204 and response.headers["hx-redirect"] == f"{page}/jobs"
    assert count(engine, Job) == 1


def test_bad_input_is_shown_and_nothing_is_written(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    _, page = project_page(client, alice)
    cases = {
        "schedule": ("@reboot", "reboot"),
        "script": ("../outside.py", ""),
        "timezone": ("Mars/Olympus", "Mars/Olympus"),
        "max_retries": ("lots", "Retries must be a whole number"),
        "env": ("NOEQUALS", "NAME=VALUE"),
        "webhook_url": ("ftp://hooks.example.com/x", "webhook_url"),
        "parents": (["train"], "train"),  # depends on itself: a cycle
    }
    for field, (value, message) in cases.items():
        response = alice_ui.htmx("POST", f"{page}/jobs/new", data=FORM | {field: value})
        assert 400 <= response.status_code < 500, (field, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert message in response.json()["detail"], (field, response.json())
    assert count(engine, Job) == 0
    # The form has the slot kiln.js puts the detail into, and keeps what was typed (no swap).
    assert 'class="form-error"' in alice_ui.page(f"{page}/jobs/new")


def test_csrf_token_is_required(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    _, page = project_page(client, alice)
    response = alice_ui.htmx(
        "POST", f"{page}/jobs/new", data=FORM, headers={"X-CSRF-Token": "wrong"}
    )
    assert response.status_code == 403
    response = alice_ui.http.post(f"{page}/jobs/new", data=FORM)  # no header at all
    assert response.status_code == 403
    assert count(engine, Job) == 0


def test_pipeline_graph_is_svg_with_names_and_edges(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    api, page = project_page(client, alice)
    create(alice_ui, page, name="extract")
    create(alice_ui, page, name="transform", parents=["extract"])
    create(alice_ui, page, name="<b>load</b>", parents=["transform"])
    html = alice_ui.page(f"{page}/jobs")
    start = html.index('<svg class="pipeline"')
    svg = html[start : html.index("</svg>", start)]
    assert ">extract</text>" in svg and ">transform</text>" in svg
    assert "&lt;b&gt;load&lt;/b&gt;" in svg and "<b>" not in svg  # names are escaped
    assert svg.count('class="pipeline-edge"') == 2
    assert 'data-parent="extract" data-child="transform"' in svg
    assert 'data-parent="transform" data-child="&lt;b&gt;load&lt;/b&gt;"' in svg
    assert 'marker-end="url(#arrow-head)"' in svg
    assert "node-never" in svg  # no run yet: the neutral color
    assert "style=" not in html and "<script>" not in html  # the CSP forbids inline ones
    # A run changes the color of its box.
    assert client.post(f"{api}/jobs/extract/runs", headers=alice.headers).status_code == 201
    svg = alice_ui.page(f"{page}/jobs")
    assert "pipeline-node node-queued" in svg


def test_run_now_run_page_log_poller_and_cancel(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    """Without a runner the run stays queued: the page polls its status and its log."""
    _, page = project_page(client, alice)
    job_page = create(alice_ui, page)
    response = alice_ui.htmx("POST", f"{job_page}/run")
    assert response.status_code == 204, response.text
    run_page = response.headers["hx-redirect"]
    assert re.fullmatch(rf"{job_page}/runs/\d+", run_page), run_page
    assert count(engine, JobRun) == 1

    html = alice_ui.page(run_page)
    assert "queued" in html and "Cancel run" in html and "manual" in html and "by alice" in html
    assert f'hx-get="{run_page}/status"' in html
    assert f'hx-get="{run_page}/log?offset=0&amp;attempt=1"' in html
    log = alice_ui.htmx("GET", f"{run_page}/log?offset=0&attempt=1")
    assert log.status_code == 200
    assert 'id="log-poller"' in log.text and 'hx-swap-oob="true"' in log.text
    assert "load delay:1s" in log.text  # still live: it asks again

    history = alice_ui.page(job_page)
    assert "#" in history and "queued" in history and 'hx-trigger="every 2s"' in history

    cancelled = alice_ui.htmx("POST", f"{run_page}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert "stopped" in cancelled.text and "Cancel run" not in cancelled.text
    log = alice_ui.htmx("GET", f"{run_page}/log?offset=0&attempt=1")
    assert "End of output." in log.text and "hx-get" not in log.text  # ended: no more polling
    again = alice_ui.htmx("POST", f"{run_page}/cancel")
    assert again.status_code == 409


def test_viewer_sees_no_buttons_and_gets_403(
    app: FastAPI,
    client: TestClient,
    alice: Account,
    bob: Account,
    alice_ui: UiClient,
    engine: Engine,
) -> None:
    api, page = project_page(client, alice)
    job_page = create(alice_ui, page)
    share(client, api, alice, bob, "viewer")
    bob_ui = sign_in(app, bob.username, bob.password)
    html = bob_ui.page(f"{page}/jobs")
    assert "train" in html and "Run now" not in html and "New job" not in html
    assert "creating one needs" not in html  # (the empty-state hint is only for no jobs)
    detail = bob_ui.page(job_page)
    assert "Run now" not in detail and "Edit" not in detail and "Delete</button>" not in detail
    assert bob_ui.htmx("POST", f"{job_page}/run").status_code == 403
    assert bob_ui.htmx("POST", f"{page}/jobs/new", data=FORM | {"name": "x"}).status_code == 403
    assert bob_ui.htmx("POST", f"{job_page}/edit", data=FORM).status_code == 403
    assert bob_ui.htmx("POST", f"{job_page}/delete").status_code == 403
    assert bob_ui.http.get(f"{page}/jobs/new").status_code == 403
    assert count(engine, Job) == 1 and count(engine, JobRun) == 0

    # An operator runs and cancels, but does not create or edit.
    share(client, api, alice, bob, "operator")
    detail = bob_ui.page(job_page)
    assert "Run now" in detail and "/edit" not in detail
    run = bob_ui.htmx("POST", f"{job_page}/run")
    assert run.status_code == 204
    assert bob_ui.htmx("POST", f"{run.headers['hx-redirect']}/cancel").status_code == 200
    assert bob_ui.htmx("POST", f"{job_page}/edit", data=FORM).status_code == 403


def test_another_user_gets_404(
    app: FastAPI,
    client: TestClient,
    alice: Account,
    bob: Account,
    alice_ui: UiClient,
    engine: Engine,
) -> None:
    _, page = project_page(client, alice)
    job_page = create(alice_ui, page)
    run_page = alice_ui.htmx("POST", f"{job_page}/run").headers["hx-redirect"]
    bob_ui = sign_in(app, bob.username, bob.password)
    for path in (f"{page}/jobs", job_page, f"{job_page}/edit", run_page, f"{run_page}/log"):
        bob_ui.page(path, status=404)
    for path in (f"{page}/jobs/new", f"{job_page}/run", f"{job_page}/delete", f"{run_page}/cancel"):
        assert bob_ui.htmx("POST", path, data=FORM).status_code == 404
    # bob's own project cannot reach alice's job by its id either.
    _, bobs = project_page(client, bob, "mine")
    job_id = job_page.rsplit("/", 1)[1]
    bob_ui.page(f"{bobs}/jobs/{job_id}", status=404)
    assert bob_ui.htmx("POST", f"{bobs}/jobs/{job_id}/run").status_code == 404
    assert count(engine, JobRun) == 1


def test_log_chunks_never_split_a_character() -> None:
    data = "héllo".encode()
    text, used = decodable(data[:2], final=False)  # "h" + the first byte of "é"
    assert (text, used) == ("h", 1)
    assert decodable(data, final=False) == ("héllo", len(data))
    assert decodable(data[:2], final=True)[1] == 2  # nothing more comes: shown replaced


def test_runs_show_their_number_in_the_job_and_name_the_parent_run(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    """Pages say "run #1" for a job's first run whatever its site-wide id (the URL keeps the
    id), and a dependent run says which parent run started it and how that one started."""
    _, page = project_page(client, alice)
    other_page = create(alice_ui, page, name="prepare")
    for _ in range(2):
        assert alice_ui.htmx("POST", f"{other_page}/run").status_code == 204
    train_page = create(alice_ui, page, name="train", parents=["prepare"])
    run_page = alice_ui.htmx("POST", f"{train_page}/run").headers["hx-redirect"]
    run_id = int(run_page.rsplit("/", 1)[1])
    html = alice_ui.page(run_page)
    assert "/ run #1</h2>" in html and "<title>Run #1 ·" in html
    assert f">#{run_id}<" not in alice_ui.page(train_page)
    assert f'href="{run_page}">#1</a>' in alice_ui.page(train_page)

    # A dependent run, as the runner queues it when prepare's run #2 succeeds.
    with make_sessionmaker(engine)() as db:
        prepare = db.scalars(select(Job).where(Job.name == "prepare")).one()
        train = db.scalars(select(Job).where(Job.name == "train")).one()
        parent = db.scalars(
            select(JobRun).where(JobRun.job_id == prepare.id, JobRun.number == 2)
        ).one()
        child = queue_run(db, train, "dependency", parent_run=parent)
        db.commit()
        parent_link = f'{page}/jobs/{prepare.id}/runs/{parent.id}"'
        child_page = f"{train_page}/runs/{child.id}"
    history = alice_ui.page(train_page)
    assert f'href="{child_page}">#2</a>' in history
    assert parent_link + ">prepare #2</a>" in history and "(manual)" in history
    assert parent_link + ">prepare #2</a>" in alice_ui.page(child_page)
