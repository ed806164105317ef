"""Helpers for the Workers API tests (no tests here): a session's own environment, read from
inside its sandbox through the runner's Exec, as a process in the session would see it."""

from __future__ import annotations

from kiln.rpc import runner_pb2 as pb
from kiln.runner.client import RunnerClient
from kiln.settings import Settings

WORKERS = "/api/v1/workers"


def exec_in_session(settings: Settings, session_id: str, argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` inside the session (no TTY); its exit status and output."""
    client = RunnerClient(settings)
    start = pb.ExecStart(workload_id=f"session-{session_id}", command=argv, tty=False)
    output, code = b"", -1
    try:
        for message in client.exec(iter([pb.ExecInput(start=start)])):
            kind = message.WhichOneof("output")
            if kind in ("stdout", "stderr"):
                output += getattr(message, kind)
            elif kind == "exit":
                code = message.exit.exit_code
    finally:
        client.close()
    return code, output.decode(errors="replace")


def token_of(settings: Settings, session_id: str) -> str:
    """The session's workers token, as ``printenv`` inside it shows it."""
    code, output = exec_in_session(settings, session_id, ["printenv", "KILN_WORKERS_TOKEN"])
    assert code == 0 and output.startswith("kwt_"), output
    return output.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
