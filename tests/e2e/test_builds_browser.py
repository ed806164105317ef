"""A build in a real Chromium: press Build on the project's Builds tab, watch the step timeline
fill in and the log arrive live (pip's own output included), and the image reference appear
— under the page's Content-Security-Policy, without a violation."""

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

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("builder"),
]


def test_build_from_the_ui_and_watch_it(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    project = make_project(live, alice)
    with httpx.Client(
        base_url=live.url,
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=alice.headers,
    ) as api:
        put = api.put(
            "api/v1/projects/alice/demo/files/requirements.txt", content=b"humanize==4.9.0\n"
        )
        assert put.status_code in (200, 201), put.text
    page = browser_page.page
    sign_in(page, alice, project)
    page.locator("nav.tabs").get_by_role("link", name="Builds").click()
    expect(page.get_by_text("No builds yet")).to_be_visible()

    page.fill("input[name=commit]", "--not-a-commit")
    page.get_by_role("button", name="Build", exact=True).click()
    expect(page.locator("form .form-error")).to_contain_text("not a commit name")

    page.fill("input[name=commit]", "")
    page.fill("input[name=command]", "python3 main.py")
    page.get_by_role("button", name="Build", exact=True).click()
    expect(page).to_have_url(re.compile(rf"{re.escape(project)}/builds/1$"))
    log = page.locator("#run-log")
    expect(log).to_contain_text("Successfully installed humanize-4.9.0", timeout=120_000)
    status = page.locator("#build-status")
    expect(status.locator(".run-state")).to_have_text("succeeded", timeout=120_000)
    for step in ("snapshot", "base", "dependencies", "code", "push"):
        expect(status.locator(f'[data-step="{step}"]')).to_have_attribute("data-status", "done")
    expect(status.locator("#image-reference")).to_contain_text("/alice/demo/build@sha256:")
    expect(page.get_by_text("End of output.")).to_be_visible()
    assert log.inner_text().count("Successfully installed humanize") == 1

    # A second build reuses the dependencies; the history shows both.
    page.locator("nav.tabs").get_by_role("link", name="Builds").click()
    page.get_by_role("button", name="Build", exact=True).click()
    expect(page).to_have_url(re.compile(rf"{re.escape(project)}/builds/2$"))
    expect(page.locator('#build-status [data-step="dependencies"]')).to_have_attribute(
        "data-status", "cached", timeout=120_000
    )
    page.locator("nav.tabs").get_by_role("link", name="Builds").click()
    expect(page.locator(".builds-table tbody tr")).to_have_count(2)
    no_csp_violations(browser_page)
