"""How a session ended, in words a person reads on its page and in the API (``outcome``).

The state badge says *which* end (stopped, timed out, failed, succeeded); this says *why*,
without the noise of a signal's exit status when Kiln itself ended the sandbox: a session a
person stopped was "Stopped by alice", never "exit code 143".
"""

from __future__ import annotations

from kiln.db.workload_models import Workload
from kiln.scheduling.states import TERMINAL_STATES, StopCause, WorkloadState

EDITOR_SUBJECTS = {"jupyterlab": "JupyterLab"}
# Causes for which Kiln ended the sandbox: its exit status says nothing about the session.
DELIBERATE = frozenset(
    {StopCause.REQUESTED, StopCause.PARENT_ENDED, StopCause.IDLE, StopCause.LIFETIME}
)


def stop_cause(workload: Workload) -> StopCause | None:
    return StopCause(workload.stop_cause) if workload.stop_cause else None


def exit_code_matters(workload: Workload) -> bool:
    """Is the recorded exit status worth showing (the workload ended by itself)?"""
    return workload.exit_code is not None and stop_cause(workload) not in DELIBERATE


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return f"{text[:1].upper()}{text[1:]}." if text else ""


def outcome(workload: Workload) -> str:
    """One or two sentences on how the session ended ("" while it lives)."""
    state = WorkloadState(workload.state)
    if state not in TERMINAL_STATES:
        return ""
    cause = stop_cause(workload)
    reason = workload.reason or (cause.reason if cause else "")
    if cause is StopCause.REQUESTED:
        return _sentence(reason if reason.startswith("stopped by ") else "stopped on request")
    if cause in (StopCause.IDLE, StopCause.LIFETIME):
        return _sentence(f"stopped by Kiln: {cause.reason}")
    if cause is StopCause.START_TIMEOUT:
        return _sentence(f"failed to start: {reason}")
    if reason.startswith("exited with code"):
        subject = EDITOR_SUBJECTS.get(workload.editor, "the session's sandbox")
        return _sentence(f"{subject} {reason}")
    if state == WorkloadState.FAILED:
        return _sentence(f"failed: {reason}" if reason else "failed; no reason was recorded")
    return _sentence(reason or state.value.replace("_", " "))
