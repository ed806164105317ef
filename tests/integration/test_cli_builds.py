"""`kiln builds create|list|show|logs|cancel` end to end: the real CLI against the live HTTPS
server, a real builder and a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.builder.process import RunningBuilder
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli.isolated(live, tmp_path, monkeypatch)


@pytest.fixture
def demo(cli: Cli, alice: Account, builder: RunningBuilder, tmp_path: Path) -> str:
    """alice is logged in and owns alice/demo (python-starter) with one dependency."""
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("humanize==4.9.0\n")
    cli.ok("files", "put", "alice/demo", str(requirements), "requirements.txt")
    return "alice/demo"


def test_create_list_show_logs(cli: Cli, demo: str) -> None:
    assert "has no builds yet" in cli.ok("builds", "list", demo).stdout
    created = cli.ok("builds", "create", demo, "--command", "python3 main.py").stdout
    assert "Build #1 of alice/demo queued" in created
    assert (
        "Build #1 succeeded" in created
        and "image: " in created
        and "/alice/demo/build@sha256:" in created
    )
    listed = cli.ok("builds", "list", demo).stdout
    assert "#1" in listed and "succeeded" in listed and "installed" in listed
    shown = cli.ok("builds", "show", demo, "1").stdout
    for step in ("snapshot", "base", "dependencies", "code", "push"):
        assert step in shown
    as_json = json.loads(cli.ok("builds", "show", demo, "1", "--json").stdout)
    assert as_json["command"] == ["python3", "main.py"] and as_json["state"] == "succeeded"
    log = cli.ok("builds", "logs", demo).stdout
    assert "Successfully installed humanize-4.9.0" in log
    assert cli.ok("builds", "logs", demo, "1", "--follow").stdout == log

    again = cli.ok("builds", "create", demo, "--logs").stdout  # the log, then the steps
    assert "==> dependencies: requirements.txt unchanged" in again
    assert "cached" in again and "Build #2 succeeded" in again


def test_no_wait_cancel_and_failures(cli: Cli, demo: str, tmp_path: Path) -> None:
    script = tmp_path / "cdsw-build.sh"
    script.write_text("sleep 600\n")
    cli.ok("files", "put", demo, str(script), "cdsw-build.sh")
    queued = cli.ok("builds", "create", demo, "--no-wait").stdout
    assert "Build #1 of alice/demo is queued" in queued and "kiln builds logs" in queued
    assert "Build #1 is" in cli.ok("builds", "cancel", demo, "1").stdout
    followed = cli.run("builds", "logs", demo, "1", "--follow")
    assert followed.exit_code == 1 and "build #1 stopped" in followed.stderr

    script.write_text("echo broken >&2; exit 3\n")
    cli.ok("files", "put", demo, str(script), "cdsw-build.sh")
    failed = cli.run("builds", "create", demo)
    assert failed.exit_code == 1
    assert "Build #2 failed" in failed.stdout and "exit code 3" in failed.stdout
    assert "broken" in cli.ok("builds", "logs", demo, "2").stdout
    assert "has no build 9" in cli.fails("builds", "show", demo, "9")
    assert "not OWNER/SLUG" in cli.fails("builds", "list", "nope", code=2)
