"""A real headless Chromium (Debian's), driven by Playwright, against the live HTTPS server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from kiln.testing.live import LiveServer

CHROMIUM = Path(os.environ.get("KILN_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"Chromium not found at {CHROMIUM}; `make test` installs it (apt chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@dataclass
class Watched:
    """What the page did that a test may want to assert never happened."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    accept_dialogs: bool = True


@pytest.fixture
def browser_page(chromium: Browser, live: LiveServer) -> Iterator[Watched]:
    context = chromium.new_context(ignore_https_errors=True, base_url=live.url)
    yield watch(context)
    context.close()


def watch(context: BrowserContext) -> Watched:
    """A new page of ``context`` whose dialogs and console errors are recorded."""
    context.set_default_timeout(15_000)
    page = context.new_page()
    watched = Watched(page)

    def on_dialog(dialog) -> None:  # type: ignore[no-untyped-def]
        watched.dialogs.append(f"{dialog.type}: {dialog.message}")
        if watched.accept_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on(
        "console",
        lambda msg: watched.console_errors.append(msg.text) if msg.type == "error" else None,
    )
    page.on("pageerror", lambda exc: watched.console_errors.append(f"uncaught: {exc}"))
    return watched
