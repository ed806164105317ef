"""Applications in a real Chromium, as the README tells a new user: create a Streamlit app
from the UI, open it on its own subdomain (Chromium resolves ``*.localhost`` here) and see
one's name in it (``Remote-User``; Streamlit builds its page over its WebSocket, so the
greeting proves ``/_stcore/stream`` crosses the proxy), restart it, share it with a viewer
who opens it from the site-wide list; a Dash app (callbacks from the browser) and a Flask
app; and TensorBoard opened from a session's page. Each step leaves a screenshot."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.e2e.test_ui_browser import no_csp_violations, sign_in
from tests.integration.apps_support import app_file, make_project, wait_state
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300), pytest.mark.usefixtures("runner")]

SHOTS = os.environ.get("KILN_TEST_SCREENSHOTS", "")


def shot(page: Page, live: LiveServer, name: str) -> None:
    """A screenshot in the test's data directory, and in $KILN_TEST_SCREENSHOTS if set."""
    page.screenshot(path=str(live.settings.data_dir / f"{name}.png"), full_page=True)
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)
    assert (live.settings.data_dir / f"{name}.png").stat().st_size > 1000


def api(live: LiveServer, who: Account) -> httpx.Client:
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    return httpx.Client(base_url=live.url, verify=tls, headers=who.headers, timeout=60)


def open_app(page: Page, link_name: str = "Open") -> Page:
    """Click an "Open" link (a new tab) and return the app's tab."""
    with page.context.expect_page() as popup:
        page.get_by_role("link", name=link_name).first.click()
    app = popup.value
    app.set_default_timeout(60_000)
    return app


def test_a_streamlit_app_from_the_ui_as_the_readme_tells_it(
    browser_page: Watched, chromium: Browser, live: LiveServer, alice: Account, bob: Account
) -> None:
    with api(live, alice) as http:
        make_project(
            http,
            "dashboards",
            {
                "streamlit_app.py": app_file("streamlit_app.py"),
                "app.sh": app_file("streamlit_app.sh"),
            },
        )
    page = browser_page.page
    page.set_default_timeout(60_000)
    sign_in(page, alice)
    page.goto("p/alice/dashboards/applications")
    expect(page.get_by_text("No applications yet")).to_be_visible()
    page.get_by_role("link", name="New application").first.click()
    page.fill("input[name=name]", "sales")
    page.fill("input[name=subdomain]", "sales")
    page.fill("input[name=script]", "app.sh")
    page.fill("input[name=description]", "Sales by region")
    shot(page, live, "app-form")
    page.get_by_role("button", name="Create and start").click()
    expect(page).to_have_url(re.compile(r"/p/alice/dashboards/applications/sales$"))
    status = page.locator("#app-status")
    expect(status).to_have_attribute("data-app-state", "running", timeout=120_000)
    expect(page.locator("#run-log")).to_contain_text("You can now view your Streamlit app")
    # Its resource use: the memory the running instance holds, of what its profile allows.
    page.reload()
    expect(page.locator("#app-memory")).to_have_text(re.compile(r"^\d+\.\d MiB of 2\.0 GiB$"))
    shot(page, live, "app-page")

    app = open_app(page)
    expect(app).to_have_url(re.compile(r"^https://sales\.kiln\.localhost:\d+/"))
    expect(app.get_by_text("Hello, alice!")).to_be_visible()  # over the WebSocket
    app.get_by_role("button", name="Count").click()
    expect(app.get_by_text("Clicks: 1")).to_be_visible()
    shot(app, live, "streamlit-alice")
    cookies = {c["name"] for c in app.context.cookies("https://sales.kiln.localhost")}
    assert "__Host-kiln_session" not in cookies, cookies  # Kiln's UI cookie stays home

    # Restart from the app's page: a new instance takes over; the app still greets alice.
    first = status.get_attribute("data-app-state")
    assert first == "running"
    page.get_by_role("button", name="Restart").click()
    expect(page.locator("#app-status .badge", has_text="restarting")).to_be_visible()
    expect(page.locator("#app-status .badge", has_text="restarting")).to_have_count(
        0, timeout=120_000
    )
    expect(page.locator("#run-log")).to_contain_text("a new instance", timeout=30_000)
    app.reload()
    expect(app.get_by_text("Hello, alice!")).to_be_visible()

    # Share with bob as a viewer; he finds it among his applications.
    page.goto("p/alice/dashboards/collaborators")
    page.fill("input[name=username]", "bob")
    page.select_option("select[name=role]", "viewer")
    page.get_by_role("button", name="Add collaborator").click()
    expect(page.locator("#collaborators")).to_contain_text("bob")
    no_csp_violations(browser_page)

    bobs = chromium.new_context(ignore_https_errors=True, base_url=live.url)
    try:
        bob_page = bobs.new_page()
        bob_page.set_default_timeout(60_000)
        sign_in(bob_page, bob)
        bob_page.locator(".mainnav").get_by_role("link", name="Applications").click()
        card = bob_page.locator("#app-card-sales")
        expect(card).to_contain_text("Sales by region")
        shot(bob_page, live, "my-applications")
        bob_app = open_app(bob_page)
        expect(bob_app.get_by_text("Hello, bob!")).to_be_visible()
        shot(bob_app, live, "streamlit-bob")
        # A viewer may open it, not stop it.
        bob_page.goto("p/alice/dashboards/applications/sales")
        expect(bob_page.get_by_role("button", name="Stop")).to_have_count(0)
    finally:
        bobs.close()


def test_dash_and_flask_in_the_browser(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    with api(live, alice) as http:
        project = make_project(
            http,
            "web",
            {"dash_app.py": app_file("dash_app.py"), "flask_app.py": app_file("flask_app.py")},
        )
        for name, script in (("dash", "dash_app.py"), ("flask", "flask_app.py")):
            body: dict[str, Any] = {"name": name, "subdomain": f"{name}-demo", "script": script}
            assert http.post(f"{project}/applications", json=body).status_code == 201
        for name in ("dash", "flask"):
            wait_state(http, project, name, "running")
    page = browser_page.page
    page.set_default_timeout(60_000)
    sign_in(page, alice)
    page.goto("p/alice/web/applications")
    expect(page.locator("#app-dash .badge")).to_have_text("running")
    shot(page, live, "applications-list")

    with page.context.expect_page() as popup:
        page.locator("#app-dash .app-link").click()
    dash = popup.value
    expect(dash.locator("h1")).to_have_text("Dash on Kiln")
    # The greeting comes from a callback: the browser POSTs to the app through the proxy.
    expect(dash.locator("#greeting")).to_have_text("Hello from a callback, Kiln!")
    dash.locator("#name").fill("alice")
    expect(dash.locator("#greeting")).to_have_text("Hello from a callback, alice!")
    shot(dash, live, "dash")

    # Straight to the address, as from a bookmark: through Kiln's sign-in and back.
    flask = page.context.new_page()
    port = live.url.rstrip("/").rsplit(":", 1)[1]
    flask.goto(f"https://flask-demo.kiln.localhost:{port}/?format=html")
    expect(flask).to_have_url(f"https://flask-demo.kiln.localhost:{port}/?format=html")
    expect(flask.locator("#hello")).to_have_text("Hello, alice")
    shot(flask, live, "flask")


def test_tensorboard_opens_from_the_session_page(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    with api(live, alice) as http:
        project = make_project(
            http, "training", {"tensorboard_logs.py": app_file("tensorboard_logs.py")}
        )
        session = http.post(f"{project}/sessions", json={"editor": "terminal"}).json()
        assert session["state"] == "running", session
    page = browser_page.page
    page.set_default_timeout(60_000)
    sign_in(page, alice)
    page.goto(f"p/alice/training/sessions/{session['id']}")
    uis = page.locator("#session-web-uis")
    expect(uis.locator("#web-ui-cdsw_app_port")).to_contain_text("nothing listens yet")
    terminal = page.locator("#terminal .xterm-helper-textarea")
    expect(page.locator("#terminal-state")).to_have_text("Connected")
    terminal.focus()
    page.keyboard.type(
        "python tensorboard_logs.py tb-logs && tensorboard --logdir tb-logs "
        "--host 127.0.0.1 --port $CDSW_APP_PORT\n"
    )
    link = uis.get_by_role("link", name="Open app")
    expect(link).to_be_visible(timeout=60_000)
    shot(page, live, "session-web-uis")
    with page.context.expect_page() as popup:
        link.click()
    board = popup.value
    board.set_default_timeout(60_000)
    expect(board).to_have_url(re.compile(rf"^https://app-{session['id']}\.kiln\.localhost:"))
    expect(board.get_by_text("loss").first).to_be_visible()
    shot(board, live, "tensorboard")
