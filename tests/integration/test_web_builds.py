"""Builds pages of the UI without a builder: the tab and its empty state, the Build form (with
the CSRF token htmx sends), a build's page with its step timeline, cancel, and that viewers
and strangers see and may do exactly what the API allows."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.api.builds import BuildPublic, StepPublic
from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker
from kiln.web.build_pages import timeline
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def pages(client: TestClient, owner: Account) -> tuple[str, str]:
    api = make_project(client, owner)
    return api, api.replace("/api/v1/projects", "/p")


def count(engine: Engine) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(Build)) or 0)


def test_tab_empty_state_build_and_cancel(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    _, page = pages(client, alice)
    html = alice_ui.page(f"{page}/builds")
    assert f'href="{page}/builds" class="active">Builds</a>' in html
    assert "No builds yet" in html and "kiln builds create alice/demo" in html
    assert 'hx-post="/p/alice/demo/builds"' in html  # the form: alice may build

    response = alice_ui.htmx(
        "POST",
        f"{page}/builds",
        data={"commit": "main", "command": "python3 'my app.py'", "no_cache": "true"},
    )
    assert response.status_code == 204, response.text
    assert response.headers["hx-redirect"] == f"{page}/builds/1"
    build = alice_ui.page(f"{page}/builds/1")
    assert 'data-build-state="queued"' in build and "Cancel build" in build
    for label in ("Snapshot", "Base image", "Dependencies", "Code layer", "Push"):
        assert label in build
    assert "python3 my app.py" in build and "(no cache asked)" in build
    assert 'hx-get="/p/alice/demo/builds/1/log?' in build  # the log poller
    log = alice_ui.htmx("GET", f"{page}/builds/1/log?offset=0")
    assert log.status_code == 200 and 'id="log-poller"' in log.text

    history = alice_ui.page(f"{page}/builds")
    assert "#1" in history and "every 2s" in history  # a live build: the table refreshes

    cancelled = alice_ui.htmx("POST", f"{page}/builds/1/cancel")
    assert cancelled.status_code == 200 and 'data-build-state="stopped"' in cancelled.text
    assert "cancelled by alice" in cancelled.text and "Cancel build" not in cancelled.text


def test_refusals_show_in_place_and_write_nothing(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    _, page = pages(client, alice)
    bad = alice_ui.htmx("POST", f"{page}/builds", data={"commit": "--upload-pack=x"})
    assert bad.status_code == 422 and "not a commit name" in bad.json()["detail"]
    quote = alice_ui.htmx("POST", f"{page}/builds", data={"command": "python3 'unclosed"})
    assert quote.status_code == 422 and "command" in quote.json()["detail"]
    no_csrf = alice_ui.http.post(f"{page}/builds", headers={"HX-Request": "true"}, data={})
    assert no_csrf.status_code == 403
    assert count(engine) == 0
    assert alice_ui.page(f"{page}/builds/7", status=404)


def test_viewers_and_strangers(
    app: FastAPI, client: TestClient, alice: Account, bob: Account, make_user: object
) -> None:
    api, page = pages(client, alice)
    assert client.post(f"{api}/builds", json={}, headers=alice.headers).status_code == 201
    bob_ui = sign_in(app, bob.username, bob.password)
    bob_ui.page(f"{page}/builds", status=404)
    bob_ui.page(f"{page}/builds/1", status=404)
    share(client, api, alice, bob, "viewer")
    listing = bob_ui.page(f"{page}/builds")
    assert "#1" in listing and "Build an image" not in listing
    assert "Cancel build" not in bob_ui.page(f"{page}/builds/1")
    assert bob_ui.htmx("POST", f"{page}/builds", data={}).status_code == 403
    assert bob_ui.htmx("POST", f"{page}/builds/1/cancel").status_code == 403


def test_the_timeline_shows_every_step_and_its_share_of_the_time() -> None:
    import datetime as dt

    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def step(name: str, status: str, seconds: float | None) -> StepPublic:
        ended = at + dt.timedelta(seconds=seconds) if seconds is not None else None
        return StepPublic(
            name=name, status=status, detail="", started_at=at, ended_at=ended,
            duration_seconds=seconds,
        )  # fmt: skip

    build = BuildPublic.model_construct(
        steps=[
            step("snapshot", "done", 1.0),
            step("base", "done", 3.0),
            step("dependencies", "running", None),
        ]
    )
    rows = timeline(build)
    assert [r.name for r in rows] == ["snapshot", "base", "dependencies", "code", "push"]
    assert [r.status for r in rows] == ["done", "done", "running", "pending", "pending"]
    assert [r.share for r in rows] == [25.0, 75.0, 0.0, 0.0, 0.0]
