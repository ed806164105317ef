"""A session in a real Chromium: start it from the project's Sessions tab, wait for its
terminal, type in it and read the answer from xterm's rendered rows, resize the window,
then stop it — all under the page's Content-Security-Policy, without a violation."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_ui_browser import no_csp_violations, sign_in
from tests.integration.sessions_ui_support import short_runner_state_dir  # noqa: F401
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120), pytest.mark.usefixtures("runner")]

STTY_SIZE = re.compile(r"^\s*(\d+) (\d+)\s*$")


def make_project(live: LiveServer, owner: Account) -> str:
    with httpx.Client(
        base_url=live.url,
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=owner.headers,
    ) as api:
        created = api.post("api/v1/projects", json={"name": "demo", "template": "python-starter"})
        assert created.status_code == 201, created.text
        return f"p/{owner.username}/{created.json()['slug']}"


def output_row(rows: Locator, text: str | re.Pattern[str]) -> Locator:
    """The terminal rows whose whole text is ``text`` (the typed command line, which merely
    contains it, does not count)."""
    pattern = text if isinstance(text, re.Pattern) else re.compile(rf"^\s*{re.escape(text)}\s*$")
    return rows.locator(":scope > div").filter(has_text=pattern)


def run(page: Page, command: str) -> None:
    page.keyboard.type(command)
    page.keyboard.press("Enter")


def terminal_size(page: Page, rows: Locator) -> tuple[int, int]:
    """What the shell inside the sandbox believes its window is (rows, cols)."""
    before = output_row(rows, STTY_SIZE).count()
    run(page, "stty size")
    expect(output_row(rows, STTY_SIZE)).to_have_count(before + 1)
    text = output_row(rows, STTY_SIZE).last.inner_text()
    match = STTY_SIZE.match(text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def test_start_a_session_type_in_its_terminal_and_stop_it(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    project = make_project(live, alice)
    page = browser_page.page
    page.set_viewport_size({"width": 1280, "height": 900})
    sign_in(page, alice, project)
    page.locator("nav.tabs").get_by_role("link", name="Sessions").click()
    expect(page.get_by_text("No sessions yet")).to_be_visible()

    page.get_by_role("button", name="Start session").click()
    expect(page).to_have_url(re.compile(rf"{re.escape(project)}/sessions/[0-9a-f]{{16}}$"))
    status = page.locator("#session-status")
    expect(status.locator(".card-head .state")).to_have_text("running")
    expect(status.locator(".tl-message").last).to_have_text("terminal ready")
    expect(page.locator("#terminal-state")).to_have_text("Connected")

    rows = page.locator("#terminal .xterm-rows")
    page.locator("#terminal").click()
    run(page, "echo hello")
    expect(output_row(rows, "hello")).to_have_count(1)

    # The shell runs in the project's files.
    run(page, "pwd; ls main.py")
    expect(output_row(rows, "/home/cdsw")).to_have_count(1)
    expect(output_row(rows, "main.py")).to_have_count(1)

    # 24-bit colour: xterm writes it as a style, which the CSP must not block.
    run(page, r"printf '\033[38;2;255;0;0m%s\033[0m\n' RED")
    red = rows.locator("span").filter(has_text=re.compile(r"^RED$"))
    expect(red).to_have_count(1)
    assert red.evaluate("e => getComputedStyle(e).color") == "rgb(255, 0, 0)"

    # Resizing the window resizes the terminal, and the shell is told.
    wide = terminal_size(page, rows)
    page.set_viewport_size({"width": 800, "height": 700})
    page.wait_for_timeout(400)  # the fit is debounced
    narrow = terminal_size(page, rows)
    assert narrow[1] < wide[1] and narrow[0] < wide[0], (wide, narrow)

    # Leaving the shell ends the terminal, not the session; a new shell can be opened.
    run(page, "exit 3")
    expect(page.locator("#terminal-state")).to_have_text("The shell exited (code 3).")
    reopen = page.get_by_role("button", name="Open a new shell")
    expect(reopen).to_be_visible()
    reopen.click()
    expect(page.locator("#terminal-state")).to_have_text("Connected")
    page.locator("#terminal").click()
    run(page, "echo again")
    expect(output_row(rows, "again")).to_have_count(1)

    page.get_by_role("button", name="Stop session").click()
    expect(status.locator(".card-head .state")).to_have_text("stopped")
    expect(page.locator("#terminal-state")).to_have_text(
        "Stopped by alice. Its terminal is closed."
    )
    expect(page.get_by_role("button", name="Stop session")).to_have_count(0)
    assert any("Stop this session?" in d for d in browser_page.dialogs)

    page.locator("nav.tabs").get_by_role("link", name="Sessions").click()
    expect(page.locator("#sessions .state").first).to_have_text("stopped")
    no_csp_violations(browser_page)


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_a_stopped_session_says_what_happened(
    browser_page: Watched, live: LiveServer, alice: Account, width: int
) -> None:
    """Stopped with its terminal open: the badge, the page and the terminal all say the same
    thing, in words, and no exit status of Kiln's own stop shows up as a failure."""
    project = make_project(live, alice)
    page = browser_page.page
    page.set_viewport_size({"width": width, "height": 800})
    sign_in(page, alice, f"{project}/sessions")
    page.get_by_role("button", name="Start session").click()
    status = page.locator("#session-status")
    expect(status.locator(".card-head .state")).to_have_text("running")
    expect(page.locator("#terminal-state")).to_have_text("Connected")

    page.get_by_role("button", name="Stop session").click()
    expect(status.locator(".card-head .state")).to_have_text("stopped")
    expect(status.locator(".session-outcome")).to_have_text("Stopped by alice.")
    expect(page.locator("#terminal-state")).to_have_text(
        "Stopped by alice. Its terminal is closed."
    )
    ending = "[The session is ending: its terminal closed.]"
    # xterm draws only while on screen: on a phone the terminal is below the status card.
    page.locator("#terminal").scroll_into_view_if_needed()
    expect(page.locator("#terminal .xterm-rows")).to_contain_text(ending, timeout=15_000)
    expect(page.get_by_role("button", name="Open a new shell")).to_be_hidden()
    text = page.locator("main").inner_text()
    for contradiction in ("still running", "Exit code", "code 143", "code 137", "failed"):
        assert contradiction not in text, contradiction
    no_csp_violations(browser_page)
