"""The UI in a real Chromium: sign in, create a project from the template, edit and save a
file, upload, search, and a hostile project name that stays text."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest
from playwright.sync_api import Page, expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched

pytestmark = pytest.mark.browser

XSS_NAME = "<script>alert(1)</script>"
XSS_DESCRIPTION = '<img src=x onerror="alert(2)">'


def sign_in(page: Page, account: Account, start: str = "projects") -> None:
    page.goto(start)
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("input[name=username]", account.username)
    page.fill("input[name=password]", account.password)
    page.click("button[type=submit]")
    expect(page.locator(".topbar .username")).to_have_text(account.username)


def no_csp_violations(watched: Watched) -> None:
    violations = [e for e in watched.console_errors if "Content Security Policy" in e]
    assert not violations, violations
    uncaught = [e for e in watched.console_errors if e.startswith("uncaught")]
    assert not uncaught, uncaught


def test_create_from_template_then_edit_and_save_a_file(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    page = browser_page.page
    sign_in(page, alice)
    expect(page.get_by_text("No projects yet")).to_be_visible()
    page.get_by_role("link", name="New project").first.click()
    expect(page.locator("input[name=source][value=template]")).to_be_checked()
    page.fill("input[name=name]", "Browser demo")
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(live.url + "p/alice/browser-demo")
    expect(page.locator("#project-title")).to_have_text("Browser demo")
    expect(page.locator("#clone-cmd")).to_contain_text("/git/alice/browser-demo.git")

    page.locator("nav.tabs").get_by_role("link", name="Files").click()
    page.get_by_role("link", name="main.py").click()
    expect(page.locator("#file-content")).to_contain_text("import")
    page.get_by_role("link", name="Edit").click()
    editor = page.locator(".cm-editor .cm-content")  # CodeMirror, over the form's textarea
    expect(editor).to_contain_text("import")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text('print("hello from chromium")\n')
    expect(page.locator(".save-state")).to_have_text("Unsaved changes")
    page.get_by_role("button", name="Save").click()
    # The time in the UI's one format: 24-hour, with its zone.
    expect(page.locator(".save-state")).to_have_text(re.compile(r"^Saved at \d\d:\d\d UTC$"))
    page.get_by_role("link", name="Close").click()
    expect(page.locator("#file-content")).to_have_text('print("hello from chromium")\n')
    page.reload()  # it is on the server, not only in the page
    expect(page.locator("#file-content")).to_have_text('print("hello from chromium")\n')

    # An error is shown in place, at the field it is about.
    page.goto("projects/new")
    page.fill("input[name=name]", "Browser demo")
    page.get_by_role("button", name="Create project").click()
    name = page.locator("input[name=name]")
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_be_focused()
    described = page.locator("#" + (name.get_attribute("aria-describedby") or "none"))
    expect(described).to_have_text("project alice/browser-demo already exists")
    expect(page).to_have_url(live.url + "projects/new")
    no_csp_violations(browser_page)


def test_a_script_project_name_is_only_text(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    with httpx.Client(
        base_url=live.url,
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=alice.headers,
    ) as api:
        created = api.post(
            "api/v1/projects",
            json={"name": XSS_NAME, "description": XSS_DESCRIPTION},
        )
        assert created.status_code == 201
        slug = created.json()["slug"]
    page = browser_page.page
    browser_page.accept_dialogs = False
    sign_in(page, alice)
    card_name = page.locator(".project-card .project-name")
    expect(card_name).to_have_text(XSS_NAME)
    page.fill("input[type=search]", "script")  # the htmx search fragment, too
    expect(page).to_have_url(re.compile(r"q=script"))
    expect(card_name).to_have_text(XSS_NAME)
    card_name.click()
    expect(page).to_have_url(live.url + f"p/alice/{slug}")
    expect(page.locator("#project-title")).to_have_text(XSS_NAME)
    expect(page.get_by_text(XSS_DESCRIPTION)).to_be_visible()
    for tab in ("collaborators", "env", "settings"):
        page.goto(f"p/alice/{slug}/{tab}")
        expect(page.locator("#project-title")).to_have_text(XSS_NAME)
    expect(page.locator("input[name=name]")).to_have_value(XSS_NAME)
    # Saving settings swaps the title in with htmx: still text.
    page.fill("input[name=name]", XSS_NAME + "!")
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_text("Saved.")).to_be_visible()
    expect(page.locator("#project-title")).to_have_text(XSS_NAME + "!")
    # Only Kiln's own two scripts are in the page; no injected element exists.
    assert page.locator("script").count() == 2
    assert page.locator("img[src=x]").count() == 0
    page.wait_for_timeout(300)
    assert browser_page.dialogs == []
    no_csp_violations(browser_page)


def test_upload_new_folder_and_delete(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    page = browser_page.page
    sign_in(page, alice)
    page.goto("projects/new")
    page.check("input[name=source][value=blank]")
    page.fill("input[name=name]", "files")
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(live.url + "p/alice/files")
    page.goto("p/alice/files/files/")
    expect(page.get_by_text("No files yet")).to_be_visible()

    page.fill("input[name=name][placeholder=data]", "data")
    page.get_by_role("button", name="Create folder").click()
    folder_link = page.locator("#file-list").get_by_role("link", name="data", exact=True)
    expect(folder_link).to_be_visible()
    folder_link.click()
    expect(page.get_by_text("This folder is empty")).to_be_visible()
    page.set_input_files(
        "input[type=file]",
        [
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"<b>not bold</b>\n"},
            {"name": "weights.bin", "mimeType": "application/octet-stream", "buffer": b"\0\1"},
        ],
    )
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator(".upload-status")).to_have_text("Uploaded 2 files.")
    expect(page.locator("#file-list").get_by_role("link", name="notes.txt")).to_be_visible()
    page.locator("#file-list").get_by_role("link", name="notes.txt").click()
    expect(page.locator("#file-content")).to_have_text("<b>not bold</b>\n")
    page.get_by_role("button", name="Delete").click()  # confirm() is accepted
    expect(page).to_have_url(live.url + "p/alice/files/files/data/")
    expect(page.locator("#file-list")).not_to_contain_text("notes.txt")
    expect(page.locator("#file-list")).to_contain_text("weights.bin")
    assert any("Delete notes.txt?" in d for d in browser_page.dialogs)
    no_csp_violations(browser_page)


def test_wrong_password_then_sign_in_and_out(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    page = browser_page.page
    page.goto("account")
    page.fill("input[name=username]", alice.username)
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    expect(page.locator(".form-error")).to_have_text("wrong username or password")
    page.fill("input[name=password]", alice.password)
    page.click("button[type=submit]")
    expect(page).to_have_url(live.url + "account")  # back where the visitor wanted to go
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key")
    expect(key).to_have_text(re.compile(r"^kiln_"))
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(live.url + "login")
    page.goto("projects")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fprojects"))
    no_csp_violations(browser_page)
