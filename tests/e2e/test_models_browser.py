"""A deployed model's page in a real Chromium: its status and replica, the test widget
calling the model through the router (a real model server as its replica; the runner's
rows from ``model_support.serve_from``), the answer shown, the plots drawn inline and
counting the call — under the page's Content-Security-Policy, without a violation."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy import Engine

from kiln.settings import Settings
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_applications_browser import shot
from tests.e2e.test_sessions_browser import make_project
from tests.e2e.test_ui_browser import no_csp_violations, sign_in
from tests.integration.model_support import model_project as model_project  # a fixture
from tests.integration.model_support import serve_from
from tests.integration.model_support import start_replica as start_replica  # a fixture

pytestmark = [pytest.mark.browser, pytest.mark.one_database, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _quick_statistics(settings: Settings) -> None:
    """The live server's router writes its counts every half second (before it starts)."""
    settings.models.stats_flush_seconds = 0.5


def test_the_model_page_of_a_deployed_model_and_its_test_widget(
    browser_page: Watched, live: LiveServer, alice: Account, engine: Engine, start_replica: Any
) -> None:
    project = make_project(live, alice)
    with httpx.Client(
        base_url=live.url,
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=alice.headers,
    ) as api:
        body = {"name": "adder", "file": "model.py", "function": "predict"}
        created = api.post("api/v1/projects/alice/demo/models", json=body)
        assert created.status_code == 201, created.text
    server = start_replica(function="predict", replica_id="replica0")
    server.wait_ready()
    serve_from(engine, "adder", {"replica0": f"127.0.0.1:{server.port}"})

    page = browser_page.page
    sign_in(page, alice)
    page.goto(f"{project}/models")
    page.get_by_role("link", name="adder").click()
    expect(page.locator("#model-status")).to_have_attribute("data-serving", "1")
    expect(page.locator('[data-replica="replica0"]')).to_contain_text("ready")

    page.fill("textarea[name=request]", '{"a": 2, "b": 40}')
    page.get_by_role("button", name="Call the model").click()
    result = page.locator("#test-result")
    expect(result).to_have_attribute("data-status", "200")
    expect(result).to_contain_text('"sum": 42')
    expect(result).to_contain_text("replica0")

    # Bad JSON is shown at the form, and nothing is called.
    page.fill("textarea[name=request]", "{oops")
    page.get_by_role("button", name="Call the model").click()
    expect(page.locator("#test-widget .field-error")).to_contain_text("not JSON")

    # The call is in the plots once this web process wrote its counts (every few seconds).
    page.wait_for_timeout(1500)
    page.get_by_role("link", name="last day").click()
    stats = page.locator("#model-stats")
    expect(stats).to_have_attribute("data-range", "day")
    expect(stats).to_contain_text("1 call, 0 errors")
    expect(page.locator("#model-stats svg")).to_have_count(3)
    shot(page, live, "model-page")

    # The replica's own page: its state and its log, followed by the shared log poller.
    page.locator('[data-replica="replica0"] a').click()
    expect(page.locator("#replica-status")).to_have_attribute("data-replica-state", "running")
    expect(page.locator("#log-poller")).to_have_attribute("data-offset", "0")
    page.get_by_role("link", name="Models").last.click()
    expect(page.locator("#model-adder")).to_contain_text("serving")
    shot(page, live, "models-list")
    no_csp_violations(browser_page)
