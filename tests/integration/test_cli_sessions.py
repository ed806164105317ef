"""`kiln sessions start|list|stop` end to end: the real CLI against the live HTTPS server,
with sessions in real sandboxes through a real runner."""

from __future__ import annotations

import json
import re
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from kiln.runtimes.catalog import builtin_runtime
from kiln.settings import Settings
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli
from tests.integration.sessions_ui_support import short_runner_state_dir  # noqa: F401
from tests.integration.test_sessions_support import RunnerHandle, runner  # noqa: F401

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli.isolated(live, tmp_path, monkeypatch)


@pytest.fixture
def demo(cli: Cli, alice: Account) -> str:
    """alice is logged in and owns alice/demo (from python-starter)."""
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    return "alice/demo"


def test_start_list_stop(cli: Cli, demo: str, runner: RunnerHandle) -> None:  # noqa: F811
    empty = cli.ok("sessions", "list", demo).stdout
    assert "No sessions in alice/demo; start one with `kiln sessions start alice/demo`" in empty

    started = cli.ok("sessions", "start", demo).stdout
    match = re.search(
        r"Session ([0-9a-f]{16}) is running \(terminal on builtin, site default: 1 vCPU", started
    )
    assert match, started
    session_id = match.group(1)
    # The timeline: each step with the time since it was queued.
    steps = re.findall(r"\+(\d+\.\d\d)s\s+(\w+)\s+(.+?)\s{2,}", started)
    states = [(state, message) for _, state, message in steps]
    assert states[0] == ("queued", "queued") and ("running", "terminal ready") in states, started
    assert [float(s[0]) for s in steps] == sorted(float(s[0]) for s in steps)
    assert f"{cli.live.url}p/alice/demo/sessions/{session_id}" in started
    assert f"kiln sessions stop alice/demo {session_id}" in started

    listed = cli.ok("sessions", "list", demo).stdout
    assert session_id in listed and "running" in listed and "alice" in listed
    as_json = json.loads(cli.ok("sessions", "list", demo, "--live", "--json").stdout)
    assert [(s["id"], s["state"]) for s in as_json] == [(session_id, "running")]

    stopped = cli.ok("sessions", "stop", demo, session_id).stdout
    assert stopped.strip() == f"Session {session_id} is stopped: stopped by alice"
    assert json.loads(cli.ok("sessions", "list", demo, "--live", "--json").stdout) == []
    assert "No live sessions in alice/demo" in cli.ok("sessions", "list", demo, "--live").stdout
    assert "stopped" in cli.ok("sessions", "list", demo).stdout

    # Stopping it again: nothing to do, and it says so.
    again = cli.ok("sessions", "stop", demo, session_id).stdout
    assert again.strip() == f"Session {session_id} had already ended (stopped, stopped by alice)"


def test_start_json_and_profile(cli: Cli, demo: str, admin: Account, runner: RunnerHandle) -> None:  # noqa: F811
    created = httpx.post(
        f"{cli.live.url}api/v1/resource-profiles",
        json={"name": "small", "cpu": 0.5, "memory_mib": 512},
        headers=admin.headers,
        verify=ssl.create_default_context(cafile=str(cli.live.ca_file)),
    )
    assert created.status_code == 201, created.text
    body = json.loads(cli.ok("sessions", "start", demo, "--profile", "small", "--json").stdout)
    assert body["state"] == "running" and body["profile"] == "small"
    assert (body["cpu"], body["memory_bytes"]) == (0.5, 512 * 1024**2)
    assert body["timeline"][0]["state"] == "queued"
    listed = cli.ok("sessions", "list", demo).stdout
    assert re.search(rf"{body['id']}\s+running\s+terminal\s+small\s+alice", listed), listed
    stopped = json.loads(cli.ok("sessions", "stop", demo, body["id"], "--json").stdout)
    assert stopped["id"] == body["id"] and stopped["state"] == "stopped"


def test_errors_are_clean_messages(cli: Cli, demo: str, bob: Account) -> None:
    error = cli.fails("sessions", "start", demo, "--profile", "huge")
    assert error.strip() == "error: no resource profile named 'huge'; profiles: none defined"
    error = cli.fails("sessions", "start", demo, "--runtime", "nope")
    assert error.startswith("error: no runtime named 'nope'")
    error = cli.fails("sessions", "start", demo, "--editor", "emacs")
    assert "unknown editor 'emacs'" in error and len(error.strip().splitlines()) == 1
    assert "No sessions" in cli.ok("sessions", "list", demo).stdout  # nothing was started
    assert "not found" in cli.fails("sessions", "stop", demo, "0123456789abcdef")
    assert cli.fails("sessions", "stop", demo, "../../x").strip() == (
        "error: '../../x' is not a session id (ids look like 3f2a9c0d1e4b5a69)"
    )
    # A malformed project is a usage error (exit 2); a missing one is a clean error.
    cli.fails("sessions", "list", "no-slash", code=2)
    assert "not found" in cli.fails("sessions", "list", "alice/nope")
    # Another user's private project does not exist for bob.
    cli.login(bob)
    assert "project alice/demo not found" in cli.fails("sessions", "list", demo)
    assert "project alice/demo not found" in cli.fails("sessions", "start", demo)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_start_that_fails_exits_1_with_the_reason(
    cli: Cli, demo: str, settings: Settings
) -> None:
    settings.runner.port = _closed_port()  # no runner: the session fails to start
    result = cli.run("sessions", "start", demo)
    assert result.exit_code == 1, result.output
    assert re.search(r"Session [0-9a-f]{16} is failed", result.stdout), result.stdout
    assert "failed" in result.stdout  # the timeline ends with the failure
    assert re.match(
        r"error: session [0-9a-f]{16} could not start: could not start: ", result.stderr
    )
    assert "runner" in result.stderr
    as_json = cli.run("sessions", "start", demo, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["state"] == "failed"
    # Stopping a session that never started: nothing to stop, and it says how it ended.
    session_id = json.loads(as_json.stdout)["id"]
    stopped = cli.ok("sessions", "stop", demo, session_id).stdout
    assert stopped.startswith(f"Session {session_id} had already ended (failed, could not start")


def test_list_fits_an_80_column_terminal_one_line_per_session(
    cli: Cli, demo: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.runner.port = _closed_port()  # no runner: each start fails, with a long reason
    ids = [json.loads(cli.run("sessions", "start", demo, "--json").stdout)["id"] for _ in range(3)]
    monkeypatch.setenv("COLUMNS", "80")
    lines = cli.ok("sessions", "list", demo).stdout.rstrip("\n").splitlines()
    assert len(lines) == 1 + 3, lines  # the header, then one line per session
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert lines[0].split() == ["SESSION", "STATE", "EDITOR", "PROFILE", "BY", "CREATED"]
    for line, session_id in zip(lines[1:], reversed(ids), strict=True):
        assert re.fullmatch(
            rf"{session_id}\s+failed\s+terminal\s+default\s+alice\s+"
            r"\w{3} \d\d \d\d:\d\d \w+\s*",
            line,
        ), line
    # A wide terminal has room for the resources and the reason.
    monkeypatch.setenv("COLUMNS", "200")
    wide = cli.ok("sessions", "list", demo).stdout.splitlines()
    assert "REASON" in wide[0] and "could not start" in wide[1] and len(wide) == 4


def test_help_says_what_each_command_does(cli: Cli) -> None:
    top = cli.ok("sessions", "--help").stdout
    for command in ("start", "list", "stop"):
        assert command in top
    start = cli.ok("sessions", "start", "--help").stdout
    assert "--profile" in start and "--editor" in start and "--json" in start
    assert "kiln sessions start alice/demo" in start


def test_not_logged_in(cli: Cli) -> None:
    error = cli.fails("sessions", "list", "alice/demo")
    assert error.strip() == "error: not logged in: run `kiln login URL` first"


def test_a_jupyterlab_session_prints_its_link(
    cli: Cli,
    demo: str,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    if "jupyterlab" not in builtin_runtime().editors:  # pragma: no cover - a broken install
        pytest.skip("NOTICE: jupyterlab is not installed beside Kiln")
    started = cli.ok("sessions", "start", demo, "--editor", "jupyterlab", "--wait").stdout
    match = re.search(r"Session ([0-9a-f]{16}) is running \(jupyterlab on builtin", started)
    assert match, started
    link = f"jupyterlab: {cli.live.url}api/v1/projects/alice/demo/sessions/{match.group(1)}/open"
    assert link in started
    assert "is stopped" in cli.ok("sessions", "stop", demo, match.group(1)).stdout
