"""JupyterLab in a real Chromium, on the session's own origin: the "Open JupyterLab" link
signs the browser in there (Chromium resolves ``*.localhost`` to this machine), JupyterLab's
page loads through the proxy, a notebook runs ``1+1`` on a kernel reached over WebSocket, and
the browser holds no Kiln cookie for that origin other than the session's own."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from kiln.domain.session_access import ACCESS_COOKIE
from kiln.runtimes.catalog import builtin_runtime
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.e2e.conftest import Watched
from tests.integration.test_sessions_support import runner, wait_for  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180), pytest.mark.usefixtures("runner")]

if "jupyterlab" not in builtin_runtime().editors:  # pragma: no cover - a broken install
    pytest.skip("NOTICE: jupyterlab is not installed beside Kiln", allow_module_level=True)


def start_jupyterlab(live: LiveServer, owner: Account) -> tuple[dict[str, Any], str]:
    """A running JupyterLab session and its one-time sign-in address."""
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    with httpx.Client(base_url=live.url, verify=tls, headers=owner.headers, timeout=30) as api:
        created = api.post("api/v1/projects", json={"name": "lab", "template": "python-starter"})
        assert created.status_code == 201, created.text
        sessions = f"api/v1/projects/{owner.username}/lab/sessions"
        session = api.post(sessions, json={"editor": "jupyterlab"}).json()

        def running() -> dict[str, Any] | None:
            body: dict[str, Any] = api.get(f"{sessions}/{session['id']}").json()
            assert body["state"] in ("starting", "running"), body
            return body if body["state"] == "running" else None

        session = wait_for(running, timeout=90, what="JupyterLab to answer")
        opened = api.get(session["editor_url"].removeprefix("/"))
        assert opened.status_code == 303, opened.text
        return session, opened.headers["location"]


def test_a_notebook_runs_in_the_browser(
    browser_page: Watched, live: LiveServer, alice: Account
) -> None:
    session, sign_in = start_jupyterlab(live, alice)
    page = browser_page.page
    page.set_default_timeout(60_000)
    page.goto(sign_in)
    assert page.url.startswith(f"https://{session['id']}.kiln.localhost:")
    assert page.url.endswith("/lab") or "/lab?" in page.url or "/lab/" in page.url

    # The launcher, then a Python notebook with one cell.
    page.locator(".jp-LauncherCard[data-category='Notebook']").first.click()
    cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    expect(cell).to_be_visible(timeout=60_000)
    # A cell run before the kernel is connected is dropped, not queued: wait for it.
    idle = page.locator(".jp-StatusBar-Widget", has_text="Python 3 (ipykernel) | Idle")
    expect(idle).to_be_visible(timeout=60_000)
    cell.click()
    page.keyboard.type("1+1")
    page.keyboard.press("Shift+Enter")
    result = page.locator(".jp-OutputArea-executeResult .jp-RenderedText").first
    try:
        expect(result).to_have_text("2", timeout=60_000)  # a kernel starts, over WebSocket
    finally:
        page.screenshot(path=str(live.settings.data_dir / "jupyterlab.png"))

    # By now (a kernel started and ran) JupyterLab's first-screen question about fetching
    # Jupyter news from the internet would long have appeared: Kiln's sessions turn it off.
    expect(page.get_by_text("notified about official Jupyter news")).to_have_count(0)
    notifications = page.evaluate(
        "fetch('/lab/api/settings/@jupyterlab/apputils-extension:notification')"
        ".then(r => r.json()).then(s => s.settings.fetchNews)"
    )
    assert notifications == "false"

    cookies = page.context.cookies(f"https://{session['id']}.kiln.localhost")
    names = {c["name"] for c in cookies}
    assert ACCESS_COOKIE in names and "__Host-kiln_session" not in names
    access = next(c for c in cookies if c["name"] == ACCESS_COOKIE)
    assert access["httpOnly"] and access["secure"] and access["sameSite"] == "Lax"
