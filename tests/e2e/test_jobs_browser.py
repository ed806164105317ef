"""A job in a real Chromium: create it from the project's Jobs tab, press Run now, watch the
run's page show the script's output as it arrives and the state become succeeded — all under
the page's Content-Security-Policy, without a violation."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest
from playwright.sync_api import expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_sessions_browser import make_project
from tests.e2e.test_ui_browser import no_csp_violations, sign_in
from tests.integration.sessions_ui_support import short_runner_state_dir  # noqa: F401
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120), pytest.mark.usefixtures("runner")]

# What python-starter's main.py prints (a line fitted to seeded noisy points).
STARTER_OUTPUT = "y = 3.02 x + 1.85"


def test_create_a_job_run_it_and_watch_its_log(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    project = make_project(live, alice)
    page = browser_page.page
    sign_in(page, alice, project)
    page.locator("nav.tabs").get_by_role("link", name="Jobs").click()
    expect(page.get_by_text("No jobs yet")).to_be_visible()

    page.get_by_role("link", name="New job").first.click()
    page.fill("input[name=name]", "fit")
    page.fill("input[name=script]", "nope.py")
    page.get_by_role("button", name="Create job").click()
    # Refused in place: the message at the script field, what was typed kept.
    expect(page.locator("input[name=script]")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("form .field-error")).to_contain_text("nope.py")
    expect(page.locator("input[name=name]")).to_have_value("fit")

    page.fill("input[name=script]", "main.py")
    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(rf"{re.escape(project)}/jobs/\d+$"))
    expect(page.get_by_text("No runs yet")).to_be_visible()

    page.get_by_role("button", name="Run now").click()
    expect(page).to_have_url(re.compile(rf"{re.escape(project)}/jobs/\d+/runs/\d+$"))
    expect(page.locator("#run-log")).to_contain_text(STARTER_OUTPUT, timeout=30_000)
    expect(page.locator("#run-status .run-state")).to_have_text("succeeded", timeout=30_000)
    expect(page.locator("#run-status")).to_contain_text("manual by alice")
    expect(page.get_by_text("End of output.")).to_be_visible()
    # The output is shown once, not appended again by later polls.
    assert page.locator("#run-log").inner_text().count(STARTER_OUTPUT) == 1

    # Back on the jobs list, the pipeline box is colored by the last run.
    page.locator("nav.tabs").get_by_role("link", name="Jobs").click()
    expect(page.locator("svg.pipeline .pipeline-node.node-succeeded")).to_have_count(1)
    no_csp_violations(browser_page)


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_a_run_waiting_for_quota_offers_to_stop_what_holds_it(
    browser_page: Watched, live: LiveServer, alice: Account, width: int
) -> None:
    """Two sessions fill the quota; the run's page names them with a Stop button each, and
    stopping one lets the run start and finish, without leaving the page."""
    live.settings.runner.user_quota_cpu_millis = 2000  # two sessions of 1 vCPU fill it
    project = make_project(live, alice)
    api = httpx.Client(
        base_url=live.url,
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=alice.headers,
        timeout=30,
    )
    base = f"api/v1/projects/{project.removeprefix('p/')}"
    sessions = [api.post(f"{base}/sessions", json={}).json() for _ in range(2)]
    assert [s["state"] for s in sessions] == ["running", "running"], sessions
    made = api.post(f"{base}/jobs", json={"name": "fit", "script": "main.py"})
    assert made.status_code == 201, made.text

    page = browser_page.page
    page.set_viewport_size({"width": width, "height": 900})
    sign_in(page, alice, f"{project}/jobs/{made.json()['id']}")
    page.get_by_role("button", name="Run now").click()
    status = page.locator("#run-status")
    expect(status.locator(".run-state")).to_have_text("waiting", timeout=30_000)
    expect(status.locator(".quota-wait")).to_contain_text("Waiting for quota.")
    holders = status.locator(".quota-holders li")
    expect(holders).to_have_count(2)
    first = sessions[0]["id"]
    expect(holders.filter(has_text=first[:8]).get_by_role("link")).to_have_attribute(
        "href", f"/{project}/sessions/{first}"
    )
    holders.filter(has_text=first[:8]).get_by_role("button", name="Stop session").click()
    expect(status.locator(".run-state")).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#run-log")).to_contain_text(STARTER_OUTPUT, timeout=30_000)
    assert any(f"Stop Terminal session {first[:8]}" in d for d in browser_page.dialogs)
    assert api.get(f"{base}/sessions/{first}").json()["state"] == "stopped"
    api.delete(f"{base}/sessions/{sessions[1]['id']}")
    no_csp_violations(browser_page)
