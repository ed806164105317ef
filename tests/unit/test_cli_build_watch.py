"""Off a terminal (a script, CI, the README tour), a followed build prints a line each time
its state or reason changes, so a build waiting for quota says why instead of pausing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kiln.cli import builds_cmd
from kiln.cli.remote import ProjectRef
from kiln.sdk.builds import Build

CREATED = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)


def build(state: str, reason: str = "") -> Build:
    return Build(
        number=3,
        id="b3",
        project="alice/demo",
        state=state,
        reason=reason,
        base="runtimes/python:3.11",
        created_at=CREATED,
    )


class Builds:
    def __init__(self, *seen: Build) -> None:
        self.seen = list(seen)

    def get_build(self, owner: str, slug: str, number: int) -> Build:
        return self.seen.pop(0)


def test_state_and_reason_changes_are_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(builds_cmd, "POLL_SECONDS", 0)
    waiting = "waiting: alice uses 6 of 8 GiB; the build needs 4 GiB"
    kiln: Any = Builds(
        build("waiting", waiting),
        build("waiting", waiting),  # unchanged: no second line
        build("running"),
        build("succeeded"),
    )
    ended = builds_cmd.watch_build(kiln, ProjectRef("alice", "demo"), build("queued"))
    assert ended.state == "succeeded"
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"Build #3 of alice/demo is waiting: {waiting}",
        "Build #3 of alice/demo is running",
    ]
