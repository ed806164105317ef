"""How a session ended, in words: each way a session ends gets a sentence, and an exit status
that Kiln's own stop caused is never shown as if the session had failed."""

from __future__ import annotations

import pytest

from kiln.db.workload_models import Workload
from kiln.domain.session_endings import exit_code_matters, outcome


def ended(
    state: str,
    reason: str = "",
    stop_cause: str | None = None,
    exit_code: int | None = None,
    editor: str = "terminal",
) -> Workload:
    return Workload(
        id="s1",
        kind="session",
        state=state,
        reason=reason,
        stop_cause=stop_cause,
        exit_code=exit_code,
        editor=editor,
    )


@pytest.mark.parametrize(
    ("row", "said", "code_shown"),
    [
        (ended("stopped", "stopped by alice", "requested", 143), "Stopped by alice.", False),
        (
            ended("stopped", "stopped by alice before it started", "requested"),
            "Stopped by alice before it started.",
            False,
        ),
        (ended("stopped", "stopped on request", "requested", 0), "Stopped on request.", False),
        (
            ended("timed_out", "idle for longer than IDLE_MAXIMUM_MINUTES", "idle", 143),
            "Stopped by Kiln: idle for longer than IDLE_MAXIMUM_MINUTES.",
            False,
        ),
        (
            ended("timed_out", "ran longer than SESSION_MAXIMUM_MINUTES", "lifetime", 137),
            "Stopped by Kiln: ran longer than SESSION_MAXIMUM_MINUTES.",
            False,
        ),
        (
            ended("failed", "did not become ready in time", "start_timeout", 143, "jupyterlab"),
            "Failed to start: did not become ready in time.",
            True,
        ),
        (
            ended("failed", "exited with code 1", None, 1, "jupyterlab"),
            "JupyterLab exited with code 1.",
            True,
        ),
        (
            ended("failed", "exited with code 137 (128 + SIGKILL)", None, 137),
            "The session's sandbox exited with code 137 (128 + SIGKILL).",
            True,
        ),
        (
            ended("failed", "out of memory: killed for exceeding its memory limit", None, 137),
            "Failed: out of memory: killed for exceeding its memory limit.",
            True,
        ),
        (
            ended("failed", "could not start: no sandbox here", None),
            "Failed: could not start: no sandbox here.",
            False,
        ),
        (
            ended("succeeded", "exited with code 0", None, 0, "jupyterlab"),
            "JupyterLab exited with code 0.",
            True,
        ),
        (ended("failed"), "Failed; no reason was recorded.", False),
    ],
)
def test_each_ending_in_words(row: Workload, said: str, code_shown: bool) -> None:
    assert outcome(row) == said
    assert exit_code_matters(row) is code_shown


@pytest.mark.parametrize("state", ["queued", "waiting", "starting", "running", "stopping"])
def test_a_live_session_has_no_outcome(state: str) -> None:
    assert outcome(ended(state, "stopped by alice", "requested")) == ""
