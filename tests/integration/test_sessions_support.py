"""Fixtures and helpers for the sessions tests (no tests here): a real runner started
in-process on the app's own settings and data directory, so sessions run in real sandboxes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from kiln.runner.process import RunningRunner, start_runner
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_runner_service import wait_for  # noqa: F401  (re-exported)

T = TypeVar("T")
PROJECTS = "/api/v1/projects"


@dataclass
class RunnerHandle:
    """The test's runner; ``stop``/``start_again`` (same port) simulate an outage."""

    settings: Settings
    current: RunningRunner
    up: bool = True

    def stop(self) -> None:
        self.current.stop()
        self.up = False

    def start_again(self) -> None:
        self.current = start_runner(self.settings, port=self.settings.runner.port)
        self.up = True


@pytest.fixture
def runner(settings: Settings) -> Iterator[RunnerHandle]:
    """A runner on a free port; the app's RunnerClient (created on first use) finds it via
    ``settings.runner.port``. Every sandbox is removed afterwards."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        running = start_runner(settings, port=0)
    except Exception as exc:  # pragma: no cover - hosts that cannot build sandboxes
        from kiln.runtimes.base import RuntimeUnavailable

        if isinstance(exc, RuntimeUnavailable):
            pytest.skip(f"NOTICE: the local runtime cannot run here: {exc}")
        raise
    settings.runner.port = running.port
    handle = RunnerHandle(settings, running)
    try:
        yield handle
    finally:
        runtime = handle.current.servicer.runtime
        for workload_id in runtime.list_workloads():
            runtime.stop(workload_id, grace=0)
            runtime.remove(workload_id)
        if handle.up:
            handle.current.stop()


def make_project(client: TestClient, owner: Account, name: str = "demo") -> str:
    """A project from the built-in template; returns its API path."""
    response = client.post(
        PROJECTS, json={"name": name, "template": "python-starter"}, headers=owner.headers
    )
    assert response.status_code == 201, response.text
    return f"{PROJECTS}/{owner.username}/{response.json()['slug']}"


def share(client: TestClient, project: str, owner: Account, who: Account, role: str) -> None:
    response = client.put(
        f"{project}/collaborators/{who.username}", json={"role": role}, headers=owner.headers
    )
    assert response.status_code == 200, response.text


def start_session(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/sessions", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


def read_line(ws: WebSocketTestSession, line: bytes, limit: int = 200) -> bytes:
    """Output frames until a whole output line equals ``line`` (so the echo of the typed
    command, which merely contains it, does not count). Bounded by frame count; the test's
    timeout bounds the time."""
    pattern = re.compile(rb"[\r\n]" + re.escape(line) + rb"\r\n")
    seen = b""
    for _ in range(limit):
        seen += ws.receive_bytes()
        if pattern.search(seen):
            return seen
    raise AssertionError(f"{line!r} not in the terminal's output: {seen[-500:]!r}")
