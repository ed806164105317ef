"""Times the UI shows are true: a new project's template files were modified "just now", a
project's "Updated" follows edits of its files, jobs and environment, and an every-minute
schedule's next run is "in N seconds", not "just now"."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from kiln.db.engine import make_sessionmaker
from kiln.db.models import Project
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def _age_project(engine: Engine, hours: int = 3) -> dt.datetime:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    with make_sessionmaker(engine)() as db:
        db.execute(update(Project).values(updated_at=old))
        db.commit()
    return old


def _updated(client: TestClient, project: str, who: Account) -> dt.datetime:
    return dt.datetime.fromisoformat(client.get(project, headers=who.headers).json()["updated_at"])


def test_template_files_are_modified_when_the_project_is_created(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    project = make_project(client, alice)
    listing = client.get(f"{project}/files/", headers=alice.headers).json()["entries"]
    now = dt.datetime.now(dt.UTC)
    for entry in listing:
        modified = dt.datetime.fromisoformat(entry["modified"])
        assert now - modified < dt.timedelta(minutes=1), entry
    page = alice_ui.page("/p/alice/demo/files/main.py")
    assert re.search(r"modified <time [^>]*data-relative>(just now|\d+ seconds ago)</time>", page)


@pytest.mark.parametrize("change", ["file", "job", "env"])
def test_a_projects_updated_time_follows_its_edits(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine, change: str
) -> None:
    project = make_project(client, alice)
    old = _age_project(engine)
    assert "Updated <time" in alice_ui.page("/projects") and "3 hours ago" in alice_ui.page(
        "/projects"
    )
    if change == "file":
        r = client.put(f"{project}/files/notes.md", content=b"hi", headers=alice.headers)
    elif change == "job":
        r = client.post(
            f"{project}/jobs", json={"name": "t", "script": "main.py"}, headers=alice.headers
        )
    else:
        r = client.put(f"{project}/env/MODE", json={"value": "x"}, headers=alice.headers)
    assert r.status_code in (200, 201), r.text
    assert _updated(client, project, alice) > old + dt.timedelta(hours=2)
    card = alice_ui.page("/projects")
    assert re.search(r"Updated <time [^>]*>(just now|\d+ seconds ago)</time>", card), card
    # Looking and running are not editing.
    old = _age_project(engine)
    client.get(f"{project}/files/", headers=alice.headers)
    assert _updated(client, project, alice) == old


def test_an_every_minute_schedule_is_next_in_seconds_not_just_now(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    project = make_project(client, alice)
    created = client.post(
        f"{project}/jobs",
        json={"name": "tick", "script": "main.py", "schedule": "* * * * *"},
        headers=alice.headers,
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    for page in ("/p/alice/demo/jobs", f"/p/alice/demo/jobs/{job_id}"):
        html = alice_ui.page(page)
        match = re.search(r"next <time[^>]*data-relative>([^<]+)</time>", html)
        assert match, html
        assert re.fullmatch(r"in \d+ seconds?|in 1 minute|now", match.group(1)), match.group(1)
        assert "just now" not in match.group(0)
