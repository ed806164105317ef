"""The admin resource pages in a real Chromium: a profile created, refused with the error in
the form (the input kept), edited in place and deleted; a quota set and removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_ui_browser import no_csp_violations, sign_in

pytestmark = pytest.mark.browser

# Set to a folder to keep a screenshot of each page (for looking at the layout).
SHOTS = os.environ.get("KILN_TEST_SCREENSHOTS", "")


def _shot(watched: Watched, name: str) -> None:
    if SHOTS:
        watched.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def test_admin_manages_profiles_and_quotas_in_the_browser(
    browser_page: Watched, live: LiveServer, admin: Account, alice: Account
) -> None:
    page = browser_page.page
    sign_in(page, admin)
    page.locator(".mainnav").get_by_role("link", name="Resources").click()
    expect(page.locator("#runtime-builtin")).to_contain_text("builtin")
    expect(page.locator("#runtime-add-cmd")).to_contain_text("kiln runtimes add")
    _shot(browser_page, "runtimes")

    page.locator("nav.tabs").get_by_role("link", name="Resource profiles").click()
    expect(page.get_by_text("No resource profiles yet")).to_be_visible()
    page.get_by_text("New profile").click()
    form = page.locator("#new-profile form")
    form.locator("input[name=name]").fill("small")
    form.locator("input[name=cpu]").fill("lots")
    form.locator("input[name=memory]").fill("2")
    form.get_by_role("button", name="Create profile").click()
    # The error is at its field (outlined, focused, described), not in a banner.
    cpu = form.locator("input[name=cpu]")
    expect(cpu).to_have_attribute("aria-invalid", "true")
    expect(cpu).to_be_focused()
    expect(form.locator(".field-error")).to_contain_text("Input should be a valid number")
    expect(form.locator(".form-error")).to_be_hidden()
    expect(form.locator("input[name=name]")).to_have_value("small")  # the input is kept
    _shot(browser_page, "profiles-error")
    form.locator("input[name=cpu]").fill("1")
    form.get_by_role("button", name="Create profile").click()
    row = page.locator("#profile-small")
    expect(row).to_contain_text("1 vCPU")
    expect(row).to_contain_text("2.0 GiB")
    expect(form.locator(".form-error")).to_be_hidden()

    row.get_by_role("button", name="Edit").click()
    editing = page.locator("#profile-small form")
    expect(editing.locator("input[name=memory]")).to_have_value("2")
    editing.locator("input[name=cpu]").fill("0")
    editing.get_by_role("button", name="Save").click()
    expect(editing.locator(".field-error")).to_contain_text("Input should be greater than 0")
    expect(editing.locator("input[name=cpu]")).to_have_attribute("aria-invalid", "true")
    _shot(browser_page, "profiles-edit")
    editing.locator("input[name=cpu]").fill("2")
    editing.locator("select[name=memory_unit]").select_option("MiB")
    editing.locator("input[name=memory]").fill("3072")
    editing.get_by_role("button", name="Save").click()
    expect(page.locator("#profile-small")).to_contain_text("3.0 GiB")
    expect(page.locator("#profile-small")).to_contain_text("2 vCPU")
    page.locator("#profile-small").get_by_role("button", name="Make default").click()
    expect(page.locator("#profile-small .badge")).to_have_text("default")
    _shot(browser_page, "profiles")
    page.locator("#profile-small").get_by_role("button", name="Delete").click()
    expect(page.get_by_text("No resource profiles yet")).to_be_visible()

    page.locator("nav.tabs").get_by_role("link", name="Quotas").click()
    expect(page.get_by_text("No quotas of their own")).to_be_visible()
    page.get_by_text("Set a quota").click()
    quota = page.locator("#set-quota form")
    quota.locator("input[name=name]").fill("nobody")
    quota.locator("input[name=cpu]").fill("8")
    quota.locator("input[name=memory]").fill("32")
    quota.get_by_role("button", name="Save quota").click()
    expect(quota.locator(".form-error")).to_contain_text("nobody")
    quota.locator("input[name=name]").fill(alice.username)
    quota.get_by_role("button", name="Save quota").click()
    expect(page.locator("#quota-user-alice")).to_contain_text("8 vCPU")
    _shot(browser_page, "quotas")
    page.locator("#quota-user-alice").get_by_role("button", name="Remove").click()
    expect(page.get_by_text("No quotas of their own")).to_be_visible()
    assert any("Delete profile small?" in d for d in browser_page.dialogs)
    no_csp_violations(browser_page)
