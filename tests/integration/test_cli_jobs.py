"""`kiln jobs create|list|run|runs|logs` end to end against the real HTTPS server; the last
tests run jobs in real sandboxes through the runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kiln.sdk import Client
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli
from tests.integration.test_sessions_support import RunnerHandle, runner  # noqa: F401

# What python-starter's main.py prints (a fit of seeded noisy points).
STARTER_OUTPUT = "y = 3.02 x + 1.85"


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli.isolated(live, tmp_path, monkeypatch)


@pytest.fixture
def demo(cli: Cli, alice: Account) -> str:
    """alice is logged in and owns alice/demo (from python-starter)."""
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    return "alice/demo"


def test_create_and_list(cli: Cli, demo: str) -> None:
    assert "has no jobs" in cli.ok("jobs", "list", demo).stdout
    created = cli.ok(
        "jobs",
        "create",
        demo,
        "train",
        "--script",
        "main.py",
        "--arg=--epochs",
        "--arg",
        "3",
        "--schedule",
        "0 3 * * *",
        "--timezone",
        "Europe/Berlin",
        "--env",
        "LR=0.1",
        "--env",
        "MODE=a=b",
        "--timeout-minutes",
        "5",
        "--retries",
        "2",
        "--max-concurrent",
        "3",
        "--webhook",
        "https://hooks.example.com/kiln",
    )
    assert "Created job train in alice/demo" in created.stdout
    assert "0 3 * * * (Europe/Berlin)" in created.stdout
    # Times are printed in this computer's zone, which is named.
    assert re.search(r"next run \d{4}-\d\d-\d\d \d\d:\d\d [A-Z][A-Za-z+\-0-9]+\n", created.stdout)
    cli.ok("jobs", "create", demo, "report", "--script", "main.py", "--depends-on", "train")

    jobs = json.loads(cli.ok("jobs", "list", demo, "--json").stdout)
    train, report = sorted(jobs, key=lambda j: j["name"], reverse=True)
    assert train["arguments"] == ["--epochs", "3"]
    assert train["env"] == {"LR": "0.1", "MODE": "a=b"}
    assert train["timeout_minutes"] == 5 and train["max_retries"] == 2
    assert train["max_concurrent_runs"] == 3 and train["catch_up"] == "once"
    assert train["webhook_url"] == "https://hooks.example.com/kiln"
    assert train["next_run_at"] is not None
    assert report["parents"] == ["train"] and report["schedule"] is None

    table = cli.ok("jobs", "list", demo).stdout
    assert "train" in table and "main.py --epochs 3" in table and "Europe/Berlin" in table


def test_bad_input_is_the_servers_message_and_writes_nothing(cli: Cli, demo: str) -> None:
    error = cli.fails("jobs", "create", demo, "bad", "--script", "main.py", "--schedule", "@reboot")
    assert error.startswith("error: ") and "reboot" in error
    assert len(error.strip().splitlines()) == 1
    error = cli.fails("jobs", "create", demo, "bad", "--script", "../etc/passwd")
    assert error.startswith("error: ")
    error = cli.fails(
        "jobs", "create", demo, "bad", "--script", "main.py", "--depends-on", "missing"
    )
    assert "missing" in error
    # A malformed --env is a usage error (exit 2) caught before anything is sent.
    cli.fails("jobs", "create", demo, "bad", "--script", "main.py", "--env", "NOEQUALS", code=2)
    assert "has no jobs" in cli.ok("jobs", "list", demo).stdout
    assert "not found" in cli.fails("jobs", "runs", demo, "nope")
    assert "not found" in cli.fails("jobs", "run", demo, "nope")
    assert "not found" in cli.fails("jobs", "logs", demo, "nope")


def test_another_user_cannot_see_the_jobs(
    cli: Cli, demo: str, bob: Account, live: LiveServer
) -> None:
    cli.ok("jobs", "create", demo, "train", "--script", "main.py")
    cli.login(bob)
    assert "not found" in cli.fails("jobs", "list", demo)
    assert "not found" in cli.fails("jobs", "run", demo, "train")


def test_run_queues_and_runs_lists_it(cli: Cli, demo: str) -> None:
    """Without a runner the run stays queued: run answers at once with the queued run. Runs
    are numbered per job (#1, #2, ...), whatever other jobs ran before."""
    cli.ok("jobs", "create", demo, "other", "--script", "main.py")
    other_ids = [
        json.loads(cli.ok("jobs", "run", demo, "other", "--json").stdout)["id"] for _ in range(3)
    ]
    cli.ok("jobs", "create", demo, "train", "--script", "main.py")
    assert "train has not run yet" in cli.fails("jobs", "logs", demo, "train")
    queued = json.loads(cli.ok("jobs", "run", demo, "train", "--json").stdout)
    assert queued["state"] == "queued" and queued["trigger"] == "manual"
    assert queued["number"] == 1 and queued["id"] > max(other_ids)  # ids stay site-wide (URLs)
    assert "Run #2 of train is queued" in cli.ok("jobs", "run", demo, "train").stdout
    runs = json.loads(cli.ok("jobs", "runs", demo, "train", "--json").stdout)
    assert [(r["number"], r["id"]) for r in runs] == [(2, queued["id"] + 1), (1, queued["id"])]
    assert (
        len(json.loads(cli.ok("jobs", "runs", demo, "train", "--limit", "1", "--json").stdout)) == 1
    )
    table = cli.ok("jobs", "runs", demo, "train").stdout
    assert "#1 " in table and "#2 " in table and f"#{queued['id']} " not in table
    assert "manual by alice" in table
    # Logs take the number people see; no output yet for a queued run: empty, not an error.
    assert cli.ok("jobs", "logs", demo, "train", "1").stdout == ""
    assert "has no run #3" in cli.fails("jobs", "logs", demo, "train", "3")


@pytest.mark.timeout(90)
def test_run_wait_and_logs_with_a_real_runner(
    cli: Cli,
    demo: str,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    cli.ok("jobs", "create", demo, "train", "--script", "main.py")
    result = cli.ok("jobs", "run", demo, "train", "--wait")
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"Run #1 of train succeeded in \d+\.\ds \(exit code 0\)", last), last
    assert STARTER_OUTPUT in cli.ok("jobs", "logs", demo, "train").stdout

    # --follow from the start of a fresh run streams it to the end.
    cli.ok("jobs", "run", demo, "train")
    followed = cli.ok("jobs", "logs", demo, "train", "--follow")
    assert STARTER_OUTPUT in followed.stdout
    runs = json.loads(cli.ok("jobs", "runs", demo, "train", "--json").stdout)
    assert [r["state"] for r in runs] == ["succeeded", "succeeded"]


@pytest.mark.timeout(90)
def test_run_wait_exits_1_when_the_run_fails(
    cli: Cli,
    demo: str,
    live: LiveServer,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    with Client.from_config() as kiln:
        kiln.write_file(
            "alice", "demo", "boom.py", b"print('about to fail')\nraise SystemExit(3)\n"
        )
    cli.ok("jobs", "create", demo, "boom", "--script", "boom.py")
    result = cli.run("jobs", "run", demo, "boom", "--wait")
    assert result.exit_code == 1, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"Run #1 of boom failed in \d+\.\ds \(exit code 3\)", last), last
    error = cli.fails("jobs", "logs", demo, "boom", "--follow")
    assert "Run #1 of boom failed" in error and "(exit code 3)" in error
