"""The API explorer (/api/v1/docs) in a real Chromium: served entirely by Kiln (no CDN, no
other origin), under a CSP that allows nothing else, listing the API's operations and able
to call one with the signed-in browser's session."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from kiln.api.docs import DOCS_CSP
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_ui_browser import no_csp_violations, sign_in

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_the_api_explorer_lists_and_calls_operations(
    browser_page: Watched, live: LiveServer, alice: Account, width: int
) -> None:
    page = browser_page.page
    page.set_viewport_size({"width": width, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, alice)

    response = page.goto("api/v1/docs")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == DOCS_CSP
    projects = page.locator(".opblock-get", has_text="/api/v1/projects").first
    expect(projects).to_be_visible()
    assert page.locator(".opblock").count() > 30, "every operation is listed"
    expect(page.locator(".opblock-tag", has_text="sessions")).to_be_visible()
    favicon = page.locator("link[rel=icon]").get_attribute("href")
    assert favicon == "/static/favicon.svg"
    assert page.request.get(favicon).status == 200

    # Try it out: GET /api/v1/projects with the page's own cookie session.
    page.locator(".opblock-get .opblock-summary-path", has_text="/api/v1/projects").filter(
        has_not_text="{"
    ).first.click()
    page.get_by_role("button", name="Try it out").click()
    page.get_by_role("button", name="Execute").click()
    status = page.locator(".live-responses-table tr.response td.response-col_status").first
    expect(status).to_have_text("200")

    foreign = [url for url in requested if not url.startswith((live.url, "data:"))]
    assert foreign == [], "the explorer loads nothing from outside Kiln"
    no_csp_violations(browser_page)
