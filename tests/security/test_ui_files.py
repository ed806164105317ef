"""The file browser shows user files only as escaped text, and never leaves the project."""

from __future__ import annotations

import os
import re
from pathlib import Path

import markupsafe
import pytest
from fastapi import FastAPI

from tests.conftest import Account
from tests.integration.web_ui_client import UiClient, sign_in

UI = "/p/alice/demo/files/"
PAYLOAD = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    ui = sign_in(app, alice.username, alice.password)
    assert ui.htmx("POST", "/projects/new", data={"name": "demo"}).status_code == 204
    return ui


def project_dir(settings) -> Path:
    (found,) = [p for p in settings.projects_dir.iterdir() if not p.name.startswith(".")]
    return found


def test_html_in_a_file_and_its_name_is_shown_as_text(alice_ui: UiClient, settings) -> None:
    root = project_dir(settings)
    name = "<img src=x onerror=alert(3)>.html"
    (root / name).write_text(PAYLOAD)
    listing = alice_ui.page(UI)
    assert "<img src=x onerror=alert(3)>" not in listing
    assert str(markupsafe.escape(name)) in listing
    encoded = "%3Cimg%20src%3Dx%20onerror%3Dalert%283%29%3E.html"
    assert f'href="{UI}{encoded}"' in listing  # the link is percent-encoded, not raw
    for page in (alice_ui.page(UI + encoded), alice_ui.page(UI + encoded + "?edit=1")):
        assert PAYLOAD not in page
        assert "<script>alert(1)" not in page
        # The viewer highlights the HTML (Pygments' spans around escaped tokens): without
        # the spans, it is the payload escaped.
        assert str(markupsafe.escape(PAYLOAD)) in re.sub(r"</?span[^>]*>", "", page)


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/%2e%2e/etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "a/%2e%2e/%2e%2e/x",
        "%252e%252e/x",
        ".git/config",
        "a%00b",
    ],
)
def test_traversal_through_the_browser_is_refused(alice_ui: UiClient, path: str) -> None:
    response = alice_ui.http.get(UI + path)
    assert 400 <= response.status_code < 500, (path, response.status_code)
    assert "root:" not in response.text
    assert "[core]" not in response.text
    deleted = alice_ui.htmx("DELETE", UI + path)
    assert 400 <= deleted.status_code < 500


def test_symlinks_out_of_the_project_are_not_followed(alice_ui: UiClient, settings) -> None:
    root = project_dir(settings)
    os.symlink("/etc", root / "etc-link")
    os.symlink("/etc/passwd", root / "passwd-link")
    listing = alice_ui.page(UI)
    assert "passwd-link" in listing
    assert f'href="{UI}passwd-link"' not in listing  # shown, not linked
    for path in ("passwd-link", "etc-link/", "etc-link/passwd", "passwd-link?edit=1"):
        response = alice_ui.http.get(UI + path)
        assert "root:" not in response.text, path
    assert "root:" not in alice_ui.page(UI + "passwd-link")
    alice_ui.htmx("DELETE", UI + "passwd-link")  # removes the link itself, never the target
    assert Path("/etc/passwd").exists()
    assert not (root / "passwd-link").exists()
