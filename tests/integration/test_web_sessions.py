"""Sessions pages of the UI: the list and its empty state, starting and stopping through the
forms (with the CSRF token htmx sends), the session page with its live timeline and its
terminal, and that viewers and strangers see and may do exactly what the API allows."""

from __future__ import annotations

import re
import socket

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import Project, User
from kiln.db.workload_models import Workload
from kiln.domain import sessions as domain
from kiln.runtimes.catalog import builtin_runtime
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.sessions_ui_support import short_runner_state_dir  # noqa: F401
from tests.integration.test_sessions_support import (
    make_project,
    runner,  # noqa: F401  (fixture)
    share,
    wait_for,
)
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)

NONCE = re.compile(r"style-src 'self' 'nonce-([A-Za-z0-9_-]{20,})'")


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


def project_page(client: TestClient, owner: Account, name: str = "demo") -> str:
    """A project from the template; returns its UI path."""
    return make_project(client, owner, name).replace("/api/v1/projects", "/p")


def start(ui: UiClient, page: str, **form: str) -> str:
    """Start a session with the page's form; returns the session page it sends the browser to."""
    response = ui.htmx("POST", f"{page}/sessions", data=form)
    assert response.status_code == 204, response.text
    location: str = response.headers["hx-redirect"]
    assert location.startswith(f"{page}/sessions/"), location
    return location


def session_rows(engine: Engine) -> list[Workload]:
    with make_sessionmaker(engine)() as db:
        return list(db.scalars(select(Workload)))


def test_empty_state_tab_and_start_form(
    alice_ui: UiClient, client: TestClient, alice: Account, admin: Account
) -> None:
    created = client.post(
        "/api/v1/resource-profiles",
        json={"name": "small", "cpu": 0.5, "memory_mib": 512, "is_default": True},
        headers=admin.headers,
    )
    assert created.status_code == 201, created.text
    page = project_page(client, alice)
    overview = alice_ui.page(page)
    assert f'href="{page}/sessions"' in overview  # the project's Sessions tab
    listing = alice_ui.page(f"{page}/sessions")
    assert "No sessions yet" in listing
    assert f"kiln sessions start {page.removeprefix('/p/')}" in listing
    assert '<option value="terminal">Terminal</option>' in listing
    # The runtimes, with the editors each offers; the built-in one is the default.
    assert re.search(r'<option value="builtin" selected>builtin \(Python [\d.]+; Terminal', listing)
    # The site's profiles, the default one chosen; no "site default" entry beside it.
    assert '<option value="small" selected>small (0.5 vCPU · 512 MiB) · default</option>' in (
        listing
    )
    assert "Site default" not in listing
    assert "every 2s" not in listing  # nothing to follow
    # Kiln's usual CSP on the list: no style nonce there.
    response = alice_ui.http.get(f"{page}/sessions")
    assert "nonce" not in response.headers["content-security-policy"]


def test_without_profiles_the_site_default_is_offered(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    listing = alice_ui.page(f"{project_page(client, alice)}/sessions")
    assert '<option value="">Site default (1 vCPU · 2 GiB)</option>' in listing


@pytest.mark.usefixtures("runner")
def test_start_look_and_stop_through_the_forms(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    page = project_page(client, alice)
    location = start(alice_ui, page, editor="terminal", runtime="builtin", profile="")
    session_id = location.rsplit("/", 1)[1]

    response = alice_ui.http.get(location)
    assert response.status_code == 200
    html = response.text
    assert 'data-session-state="running"' in html
    # The start timeline, with times and the time since it was queued.
    timeline = re.findall(r'<span class="tl-message">([^<]*)</span>', html)
    assert timeline[0] == "queued" and timeline[-1] == "terminal ready", timeline
    assert "sandbox started" in timeline
    assert re.search(r'class="tl-offset mono"[^>]*>\+\d+\.\d\d s<', html)
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} UTC", html)
    assert "every 1s" not in html  # running: nothing to poll for
    assert "<dt>Runtime</dt><dd>builtin</dd>" in html
    assert "Open Terminal" not in html  # a link only for editors served over the web
    # The terminal, on its WebSocket, with xterm and the page's own script.
    terminal = f"/api/v1/projects/alice/{page.rsplit('/', 1)[1]}/sessions/{session_id}/terminal"
    assert f'data-terminal-path="{terminal}"' in html
    assert '<script src="/static/vendor/xterm.js' in html
    # A style nonce for xterm's style elements, fresh per response, handed to the page's script.
    nonce = NONCE.search(response.headers["content-security-policy"])
    assert nonce, response.headers["content-security-policy"]
    assert "session-terminal.js?v=" in html and f'nonce="{nonce.group(1)}"' in html
    again = alice_ui.http.get(location).headers["content-security-policy"]
    other = NONCE.search(again)
    assert other and other.group(1) != nonce.group(1)
    assert "script-src 'self';" in again  # scripts: still only the site's own files

    listing = alice_ui.page(f"{page}/sessions")
    assert f'href="{location}"' in listing and "No sessions yet" not in listing
    assert f'hx-post="{location}/stop"' in listing

    # Stopping without the CSRF token is refused, and stops nothing.
    forged = alice_ui.htmx("POST", f"{location}/stop", headers={"X-CSRF-Token": "forged"})
    assert forged.status_code == 403
    assert [r.state for r in session_rows(engine)] == ["running"]

    # Stop from the session page: its status fragment comes back.
    stopped = alice_ui.htmx("POST", f"{location}/stop")
    assert stopped.status_code == 200, stopped.text
    assert 'data-session-state="stopped"' in stopped.text
    assert "Stop session" not in stopped.text
    assert "Stopped by alice." in stopped.text
    assert "Exit code" not in stopped.text  # Kiln's own stop: no exit status
    # Stopping again (a page left open): it shows how the session ended, not an error.
    twice = alice_ui.htmx("POST", f"{location}/stop")
    assert twice.status_code == 200, twice.text
    assert 'data-session-state="stopped"' in twice.text and "Stop session" not in twice.text
    ended = alice_ui.page(location)
    assert "its terminal is closed" not in ended  # said by the script, not the server
    assert 'data-session-state="stopped"' in ended


@pytest.mark.usefixtures("runner")
def test_a_jupyterlab_session_links_to_its_editor(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    if "jupyterlab" not in builtin_runtime().editors:  # pragma: no cover - a broken install
        pytest.skip("NOTICE: jupyterlab is not installed beside Kiln")
    page = project_page(client, alice)
    assert '<option value="jupyterlab">JupyterLab</option>' in alice_ui.page(f"{page}/sessions")
    location = start(alice_ui, page, editor="jupyterlab")

    def running() -> str | None:
        html = alice_ui.htmx("GET", f"{location}/status").text
        return html if 'data-session-state="running"' in html else None

    html = wait_for(running, timeout=60, what="JupyterLab to be ready")
    api_path = location.replace("/p/", "/api/v1/projects/")
    assert f'href="{api_path}/open" target="_blank" rel="noopener">Open JupyterLab</a>' in html
    assert alice_ui.htmx("POST", f"{location}/stop").status_code == 200


@pytest.mark.usefixtures("runner")
def test_stop_from_the_list_answers_with_the_list(
    alice_ui: UiClient, client: TestClient, alice: Account
) -> None:
    page = project_page(client, alice)
    location = start(alice_ui, page)
    response = alice_ui.htmx("POST", f"{location}/stop", data={"view": "list"})
    assert response.status_code == 200, response.text
    assert response.text.lstrip().startswith('<section id="sessions"')
    assert "state-stopped" in response.text and f'hx-post="{location}/stop"' not in response.text


def test_start_without_csrf_starts_nothing(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    page = project_page(client, alice)
    response = alice_ui.htmx("POST", f"{page}/sessions", headers={"X-CSRF-Token": ""})
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert session_rows(engine) == []


def test_bad_input_is_shown_in_place(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    page = project_page(client, alice)
    unknown = alice_ui.htmx("POST", f"{page}/sessions", data={"profile": "huge"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == "no resource profile named 'huge'; profiles: none defined"
    editor = alice_ui.htmx("POST", f"{page}/sessions", data={"editor": "emacs"})
    assert editor.status_code == 422 and "unknown editor 'emacs'" in editor.json()["detail"]
    runtime = alice_ui.htmx("POST", f"{page}/sessions", data={"runtime": "nope"})
    assert runtime.status_code == 422
    assert runtime.json()["detail"].startswith("no runtime named 'nope'")
    too_long = alice_ui.htmx("POST", f"{page}/sessions", data={"profile": "x" * 65})
    assert too_long.status_code == 422
    assert session_rows(engine) == []
    alice_ui.page(f"{page}/sessions/0123456789abcdef", status=404)
    alice_ui.page(f"{page}/sessions/no-such-session/status", status=404)
    missing = alice_ui.htmx("POST", f"{page}/sessions/0123456789abcdef/stop")
    assert missing.status_code == 404


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failed_start_shows_its_reason(
    alice_ui: UiClient, client: TestClient, alice: Account, settings: Settings
) -> None:
    settings.runner.port = _closed_port()  # nothing listens: the start fails fast
    page = project_page(client, alice)
    location = start(alice_ui, page)
    html = alice_ui.page(location)
    assert 'data-session-state="failed"' in html
    assert re.search(r'session-outcome" role="alert">Failed: could not start: [^<]*runner', html)
    assert "Stop session" not in html
    listing = alice_ui.page(f"{page}/sessions")
    assert 'class="small reason reason-failed">Failed: could not start:' in listing


def test_a_queued_session_is_followed_by_polling(
    alice_ui: UiClient, client: TestClient, alice: Account, engine: Engine
) -> None:
    page = project_page(client, alice)
    with transaction(make_sessionmaker(engine)) as db:
        project = db.scalar(select(Project).where(Project.slug == page.rsplit("/", 1)[1]))
        user = db.scalar(select(User).where(User.username == "alice"))
        assert project is not None and user is not None
        session_id = domain.create_session(db, project, user, "terminal", None).id
    location = f"{page}/sessions/{session_id}"
    html = alice_ui.page(location)
    assert 'data-session-state="queued"' in html
    assert f'hx-get="{location}/status"' in html
    assert 'hx-trigger="every 1s, session-changed from:body"' in html
    fragment = alice_ui.htmx("GET", f"{location}/status")
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<section id="session-status"')
    assert "every 1s" in fragment.text and "Starting…" in fragment.text
    assert "<html" not in fragment.text
    listing = alice_ui.htmx("GET", f"{page}/sessions")
    assert 'hx-trigger="every 2s"' in listing.text and "<html" not in listing.text
    # Stopping a queued session cancels it.
    stopped = alice_ui.htmx("POST", f"{location}/stop")
    assert stopped.status_code == 200 and 'data-session-state="stopped"' in stopped.text
    assert "every 1s" not in stopped.text


@pytest.mark.usefixtures("runner")
def test_a_viewer_can_look_but_not_start_stop_or_open_the_terminal(
    app: FastAPI, alice_ui: UiClient, client: TestClient, alice: Account, bob: Account
) -> None:
    page = project_page(client, alice)
    location = start(alice_ui, page)
    share(client, page.replace("/p/", "/api/v1/projects/"), alice, bob, "viewer")
    bob_ui = sign_in(app, bob.username, bob.password)
    listing = bob_ui.page(f"{page}/sessions")
    assert f'href="{location}"' in listing
    assert "Start session" not in listing and "/stop" not in listing
    detail = bob_ui.page(location)
    assert 'data-session-state="running"' in detail
    assert "Stop session" not in detail
    assert "data-terminal-path" not in detail and "xterm.js" not in detail
    assert "needs the contributor role" in detail
    refused = bob_ui.htmx("POST", f"{page}/sessions", data={"editor": "terminal"})
    assert refused.status_code == 403 and "contributor" in refused.json()["detail"]
    assert bob_ui.htmx("POST", f"{location}/stop").status_code == 403
    still = client.get(location.replace("/p/", "/api/v1/projects/"), headers=alice.headers)
    assert still.json()["state"] == "running"
    # An empty list tells a viewer who may start one.
    quiet = project_page(client, alice, "quiet")
    share(client, quiet.replace("/p/", "/api/v1/projects/"), alice, bob, "viewer")
    empty = bob_ui.page(f"{quiet}/sessions")
    assert "No sessions yet" in empty and "starting one needs the contributor role" in empty


@pytest.mark.usefixtures("runner")
def test_another_user_gets_404_everywhere(
    app: FastAPI, alice_ui: UiClient, client: TestClient, alice: Account, bob: Account
) -> None:
    page = project_page(client, alice)
    location = start(alice_ui, page)
    bob_ui = sign_in(app, bob.username, bob.password)
    for path in (f"{page}/sessions", location, f"{location}/status"):
        bob_ui.page(path, status=404)
    assert bob_ui.htmx("POST", f"{page}/sessions").status_code == 404
    assert bob_ui.htmx("POST", f"{location}/stop").status_code == 404
    # Bob's own project does not reach Alice's session by its id either.
    bobs = project_page(client, bob)
    bob_ui.page(f"{bobs}/sessions/{location.rsplit('/', 1)[1]}", status=404)
    assert (
        bob_ui.htmx("POST", f"{bobs}/sessions/{location.rsplit('/', 1)[1]}/stop").status_code == 404
    )
    still = client.get(location.replace("/p/", "/api/v1/projects/"), headers=alice.headers)
    assert still.json()["state"] == "running"


def test_signed_out_visitors_are_sent_to_sign_in(
    app: FastAPI, client: TestClient, alice: Account
) -> None:
    page = project_page(client, alice)
    anonymous = TestClient(app, base_url="https://testserver", follow_redirects=False)
    response = anonymous.get(f"{page}/sessions")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")
