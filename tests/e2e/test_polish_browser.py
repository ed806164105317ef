"""The rough edges of the five-minute tour, in a real Chromium at desktop width and at 390 px
(a phone): pages fit the screen (top bar, tabs, file names, actions), form errors sit at
their fields, the editor is a real code editor, the Overview renders the README, secret
values are typed into a password field, and a session's "No access" page looks like Kiln."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched, watch
from tests.e2e.test_ui_browser import no_csp_violations, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

PHONE, DESKTOP = 390, 1280
BASE = "p/alice/churn-model-with-a-long-name"
MONO_DASHES = (
    "[...document.querySelectorAll('main .mono')]"
    ".filter(e => e.textContent.trim() === '\u2014').length"
)


@pytest.fixture(params=[DESKTOP, PHONE], ids=["desktop", "390px"])
def width(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def screen(chromium: Browser, live: LiveServer, width: int) -> Iterator[Watched]:
    """A page of the given width, watched for console errors (CSP violations)."""
    context = chromium.new_context(
        ignore_https_errors=True,
        base_url=live.url,
        viewport={"width": width, "height": 860},
        is_mobile=width == PHONE,
        has_touch=width == PHONE,
    )
    yield watch(context)
    context.close()


@pytest.fixture
def alice_page(screen: Watched, alice: Account, tour: dict[str, Any]) -> Page:
    """alice, signed in, with the tour's project."""
    sign_in(screen.page, alice)
    return screen.page


@pytest.fixture
def tour(live: LiveServer, alice: Account) -> dict[str, Any]:
    """What the tour makes: a project from the template with a README, a folder with a long
    file name, two jobs (one every minute) and a run."""
    with httpx.Client(
        base_url=f"{live.url}api/v1/",
        verify=ssl.create_default_context(cafile=str(live.ca_file)),
        headers=alice.headers,
    ) as api:
        created = api.post(
            "projects", json={"name": "Churn model with a long name", "template": "python-starter"}
        )
        assert created.status_code == 201, created.text
        project = "projects/alice/churn-model-with-a-long-name"
        readme = b"# Churn model\n\nPredicts **churn**.\n\n```python\nprint('hi')\n```\n"
        for path, body in (
            ("README.md", readme),
            ("data/a_very_long_file_name_for_testing_wrapping_behaviour.csv", b"a\n"),
        ):
            assert api.put(f"{project}/files/{path}", content=body).status_code in (200, 201)
        job = api.post(
            f"{project}/jobs",
            json={"name": "prepare", "script": "main.py", "schedule": "* * * * *"},
        ).json()
        api.post(f"{project}/jobs", json={"name": "train", "script": "main.py"})
        run = api.post(f"{project}/jobs/prepare/runs").json()
    return {"job": job, "run": run}


def fits(page: Page, width: int) -> None:
    """Nothing sticks out sideways: no horizontal scrolling of the page."""
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"{page.url}: {scroll} px wide on a {width} px screen"


def on_screen(page: Page, selector: str, width: int) -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (selector, box)


def test_main_pages_fit_the_screen(
    screen: Watched, alice_page: Page, tour: dict[str, Any], width: int
) -> None:
    page = alice_page
    job, run = tour["job"]["id"], tour["run"]["id"]
    pages = [
        "projects",
        BASE,
        f"{BASE}/files/",
        f"{BASE}/files/data/",
        f"{BASE}/files/main.py",
        f"{BASE}/files/main.py?edit=1",
        f"{BASE}/sessions",
        f"{BASE}/jobs",
        f"{BASE}/jobs/new",
        f"{BASE}/jobs/{job}",
        f"{BASE}/jobs/{job}/runs/{run}",
        f"{BASE}/collaborators",
        f"{BASE}/env",
        f"{BASE}/settings",
        "admin/teams",
        "account",
        "projects/new",
    ]
    for path in pages:
        page.goto(path)
        fits(page, width)
        # Sign out and every main link are on the screen, never cut off.
        on_screen(page, ".topbar button:has-text('Sign out')", width)
        for link in page.locator(".mainnav a").all():
            box = link.bounding_box()
            assert box is not None and box["x"] + box["width"] <= width + 0.5, (path, box)
        # One mark for "nothing here": an em dash, never set in a monospace font (where it
        # looks like an en dash) and never an en dash itself.
        assert "\u2013" not in page.locator("main").inner_text(), path
        assert page.evaluate(MONO_DASHES) == 0, path
        if path.startswith(BASE):
            for tab in page.locator("nav.tabs a").all():  # every tab whole, none clipped
                box = tab.bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    # File names read as words: one line each, never a character per line.
    page.goto(f"{BASE}/files/")
    for name in ("main.py", "requirements.txt", "README.md", "data"):
        link = page.locator("#file-list td.name a", has_text=name).first
        box = link.bounding_box()
        assert box is not None and box["height"] < 30 and box["width"] > 40, (name, box)
    # ... and a row's actions are on the screen.
    on_screen(page, "#file-list tr:has-text('main.py') >> text=Rename", width)
    on_screen(page, "#file-list tr:has-text('main.py') >> text=Delete", width)
    page.goto(f"{BASE}/files/data/")
    long_name = page.locator("#file-list td.name a", has_text="a_very_long_file_name").first
    box = long_name.bounding_box()
    assert box is not None and box["width"] > 150  # wraps at the screen's edge if it must
    # The job form's fields of one row line up, hints or not.
    if width == DESKTOP:
        page.goto(f"{BASE}/jobs/new")
        tops = {
            name: (page.locator(f"input[name={name}]").bounding_box() or {})["y"]
            for name in ("timeout_minutes", "max_retries", "retry_backoff_seconds", "schedule")
        }
        assert tops["timeout_minutes"] == tops["max_retries"] == tops["retry_backoff_seconds"]
        name_box = page.locator("input[name=name]").bounding_box()
        script_box = page.locator("input[name=script]").bounding_box()
        assert name_box and script_box and name_box["y"] == script_box["y"]
    # Cards never touch: jobs and the pipeline, a job and its runs, a run and its console.
    for path, first, second in (
        (f"{BASE}/jobs", "#jobs", ".pipeline-card"),
        (f"{BASE}/jobs/{job}", "section.card >> nth=0", "#runs"),
        (f"{BASE}/jobs/{job}/runs/{run}", "#run-status", "#run-log"),
        ("account", "#api-keys table", "#api-keys form.add-form"),  # the form below the keys
    ):
        page.goto(path)
        top = page.locator(first).first.bounding_box()
        below = page.locator(second).first.bounding_box()
        assert top and below and below["y"] - (top["y"] + top["height"]) >= 8, (path, top, below)
    no_csp_violations(screen)


def test_form_errors_are_at_their_fields(screen: Watched, alice_page: Page) -> None:
    page = alice_page

    def error_at(selector: str, text: str | re.Pattern[str]) -> None:
        field = page.locator(selector)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_be_focused()
        described = field.get_attribute("aria-describedby") or ""
        message = page.locator(f"#{described.split()[-1]}")
        expect(message).to_have_text(text)
        expect(message).to_be_visible()

    # The browser's own check, with words a person can act on.
    page.goto(f"{BASE}/env")
    page.fill("#env input[name=name]", "1BAD")
    page.get_by_role("button", name="Save variable").click()
    error_at(
        "#env input[name=name]", re.compile("letters, digits and _, not starting with a digit")
    )
    assert "Please match the requested format" not in page.content()
    # Typing clears it; the server's answer lands at the field the same way.
    page.fill("#env input[name=name]", "OK_NAME")
    expect(page.locator("#env input[name=name]")).not_to_have_attribute("aria-invalid", "true")

    page.goto(f"{BASE}/jobs/new")
    page.fill("input[name=name]", "nightly")
    page.fill("input[name=script]", "main.py")
    page.fill("input[name=schedule]", "61 * * * *")
    page.get_by_role("button", name="Create job").click()
    error_at("input[name=schedule]", re.compile("61"))
    expect(page.locator("form.job-form > .form-error")).to_be_hidden()  # not a banner
    page.fill("input[name=schedule]", "0 3 * * *")
    page.fill("input[name=script]", "missing.py")
    page.get_by_role("button", name="Create job").click()
    error_at("input[name=script]", re.compile("does not exist"))

    page.goto(f"{BASE}/files/")
    page.fill("input[name=name][placeholder=data]", "data")  # exists already
    page.get_by_role("button", name="Create folder").click()
    error_at("input[name=name][placeholder=data]", re.compile("exists"))

    page.goto(f"{BASE}/collaborators")
    page.fill("#collaborators input[name=username]", "nobody")
    page.get_by_role("button", name="Add collaborator").click()
    error_at("#collaborators input[name=username]", "user 'nobody' not found")
    no_csp_violations(screen)


def test_a_real_code_editor(screen: Watched, alice_page: Page) -> None:
    page = alice_page
    page.goto(f"{BASE}/files/main.py?edit=1")
    editor = page.locator(".cm-editor")
    expect(editor).to_be_visible()
    expect(page.locator("textarea[data-editor]")).to_be_hidden()  # the form keeps its text
    expect(
        page.locator(".cm-lineNumbers .cm-gutterElement", has_text=re.compile(r"^3$"))
    ).to_be_visible()
    # Python is highlighted: "import" is a keyword token, styled apart from plain text.
    keyword = page.locator(".cm-line span", has_text=re.compile(r"^import$")).first
    expect(keyword).to_be_visible()
    plain_color = page.evaluate("getComputedStyle(document.querySelector('.cm-line')).color")
    assert keyword.evaluate("el => getComputedStyle(el).color") != plain_color
    # Search (Ctrl+F) opens CodeMirror's search panel.
    page.locator(".cm-content").click()
    page.keyboard.press("Control+f")
    expect(page.locator(".cm-search input[name=search]")).to_be_visible()
    page.keyboard.press("Escape")
    # Typing over a selection, then Ctrl+S: saved, in the UI's time format.
    page.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.type("print('edited in CodeMirror')")
    expect(page.locator(".save-state")).to_have_text("Unsaved changes")
    page.keyboard.press("Control+s")
    expect(page.locator(".save-state")).to_have_text(re.compile(r"^Saved at \d\d:\d\d UTC$"))
    page.goto(f"{BASE}/files/main.py")
    expect(page.locator("#file-content")).to_have_text("print('edited in CodeMirror')")
    expect(page.locator("#file-content .nb")).to_have_text("print")  # highlighted view
    no_csp_violations(screen)


def test_overview_renders_the_readme_and_relative_times_stay_true(
    screen: Watched, alice_page: Page
) -> None:
    page = alice_page
    page.goto(BASE)
    expect(page.locator("#readme h1")).to_have_text("Churn model")
    expect(page.locator("#readme strong")).to_have_text("churn")
    expect(page.locator("#commits .commit-subject").first).to_have_text(
        "Add data/a_very_long_file_name_for_testing_wrapping_behaviour.csv"
    )
    expect(page.locator("#recent-runs")).to_contain_text("prepare #1")
    # The every-minute schedule's next run counts down while the page stays open.
    page.goto(f"{BASE}/jobs")
    countdown = page.locator("td[data-label=Schedule] time[data-relative]").first
    first = countdown.inner_text()
    assert re.fullmatch(r"in \d+ seconds?|in 1 minute|now", first), first
    page.wait_for_timeout(6_000)
    assert countdown.inner_text() != first or first == "now"
    no_csp_violations(screen)


def test_secret_values_are_typed_into_a_password_field(screen: Watched, alice_page: Page) -> None:
    page = alice_page
    page.goto(f"{BASE}/env")
    value = page.locator("#env input[name=value]")
    expect(value).to_have_attribute("type", "text")
    page.check("#env input[name=secret]")
    expect(value).to_have_attribute("type", "password")
    page.fill("#env input[name=name]", "DB_PASSWORD")
    value.fill("hunter2-very-secret")
    page.get_by_role("button", name="Save variable").click()
    expect(page.locator("#env")).to_contain_text("DB_PASSWORD")
    assert "hunter2-very-secret" not in page.content()
    no_csp_violations(screen)


def test_a_sessions_no_access_page_looks_like_kiln(
    screen: Watched, live: LiveServer, width: int
) -> None:
    """A session's own origin, visited without access: Kiln's page, styled from the UI's
    origin, with no script and no CSP violation."""
    page = screen.page
    port = live.url.rsplit(":", 1)[1].rstrip("/")
    response = page.goto(f"https://0123456789abcdef.kiln.localhost:{port}/lab")
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_have_text("No access")
    expect(page.locator(".topbar .brand")).to_be_visible()
    topbar = page.evaluate("getComputedStyle(document.querySelector('.topbar')).backgroundColor")
    assert topbar == "rgb(22, 24, 28)", topbar  # kiln.css was applied
    link = page.get_by_role("link", name="Open Kiln")
    expect(link).to_have_attribute("href", re.compile(rf"^https://localhost:{port}/projects$"))
    assert page.locator("script").count() == 0
    fits(page, width)
    assert not [e for e in screen.console_errors if "Content Security Policy" in e]


def test_badges_side_by_side_do_not_touch(
    screen: Watched, live: LiveServer, admin: Account
) -> None:
    page = screen.page
    sign_in(page, admin)
    page.goto("admin/users")
    row = page.locator("#user-rows tr", has_text=admin.username)
    active = row.locator(".badge", has_text="active").bounding_box()
    site_admin = row.locator(".badge", has_text="site admin").bounding_box()
    assert active and site_admin
    assert site_admin["x"] - (active["x"] + active["width"]) >= 3, (active, site_admin)
    no_csp_violations(screen)
