"""`kiln apps` end to end: the real CLI against the live HTTPS server, with a real Flask
application run by a real runner."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.apps_support import app_file
from tests.integration.cli_support import Cli
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("runner")]


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli.isolated(live, tmp_path, monkeypatch)


@pytest.fixture
def demo(cli: Cli, live: LiveServer, alice: Account) -> str:
    """alice is logged in and owns alice/demo with flask_app.py in it."""
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    with httpx.Client(base_url=live.url, verify=tls, headers=alice.headers) as http:
        written = http.put(
            "api/v1/projects/alice/demo/files/flask_app.py", content=app_file("flask_app.py")
        )
        assert written.is_success, written.text
    return "alice/demo"


def test_the_life_of_an_application_from_the_cli(cli: Cli, demo: str) -> None:
    port = cli.live.url.rstrip("/").rsplit(":", 1)[1]
    address = f"https://web-cli.kiln.localhost:{port}/"
    assert "No applications in alice/demo; create one" in cli.ok("apps", "list", demo).stdout
    created = cli.ok(
        "apps",
        "create",
        demo,
        "web",
        "--script",
        "flask_app.py",
        "--subdomain",
        "web-cli",
        "--env",
        "APP_VERSION=7",
        "--wait",
    ).stdout
    assert f"Application web is running: {address}" in created, created
    listed = cli.ok("apps", "list", demo).stdout
    assert "web" in listed and "running" in listed and "web-cli.kiln.localhost" in listed
    mine = json.loads(cli.ok("apps", "list", "--json").stdout)
    assert [(a["name"], a["project"], a["env"]) for a in mine] == [
        ("web", "alice/demo", {"APP_VERSION": "7"})
    ]
    assert "Running on http://127.0.0.1:8100" in cli.ok("apps", "logs", demo, "web").stdout

    restarted = json.loads(cli.ok("apps", "restart", demo, "web", "--wait", "--json").stdout)
    assert restarted["state"] == "running" and not restarted["restarting"]
    stopped = cli.ok("apps", "stop", demo, "web").stdout
    assert "Application web is stopped" in stopped
    assert "is running" in cli.ok("apps", "start", demo, "web", "--wait").stdout
    assert "Deleted application web." in cli.ok("apps", "delete", demo, "web", "--yes").stdout
    assert "No applications in alice/demo" in cli.ok("apps", "list", demo).stdout


def test_mistakes_are_explained(cli: Cli, demo: str) -> None:
    taken = cli.fails("apps", "create", demo, "www", "--script", "flask_app.py")
    assert "subdomain 'www' is reserved for Kiln" in taken
    missing = cli.fails("apps", "create", demo, "x", "--script", "nope.py")
    assert "script 'nope.py' does not exist in the project" in missing
    bad_env = cli.run("apps", "create", demo, "x", "--script", "flask_app.py", "--env", "NOPE")
    assert bad_env.exit_code == 2 and "'NOPE' is not NAME=VALUE" in bad_env.output
    assert "application 'ghost' not found" in cli.fails("apps", "restart", demo, "ghost")
