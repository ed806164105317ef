"""The Workers API end to end, as a user has it: a session on a real runner, a real HTTPS web
tier (uvicorn, Kiln's CA), and ``from kiln.sdk import workers`` run inside the session. The
session reaches the web tier's port over its sandbox network, with TLS verified against
Kiln's CA, and still not the runner's port."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import Engine

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Workload
from kiln.settings import Settings
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_sessions_support import (
    RunnerHandle,
    runner,  # noqa: F401  (fixture)
)
from tests.integration.test_workers_support import exec_in_session

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def site(
    live: LiveServer, settings: Settings, request: pytest.FixtureRequest
) -> tuple[LiveServer, RunnerHandle]:
    """The web tier first: the runner opens its port to sessions when it starts."""
    settings.web.port = urlsplit(live.url).port or 443
    handle: RunnerHandle = request.getfixturevalue("runner")
    return live, handle


@pytest.fixture
def http(site: tuple[LiveServer, RunnerHandle], alice: Account) -> Iterator[httpx.Client]:
    live, _ = site
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    with httpx.Client(base_url=live.url.rstrip("/"), verify=tls, headers=alice.headers) as c:
        yield c


def start_session(http: httpx.Client) -> tuple[str, dict[str, Any]]:
    project = http.post("/api/v1/projects", json={"name": "demo", "template": "python-starter"})
    assert project.status_code == 201, project.text
    sessions = f"/api/v1/projects/alice/{project.json()['slug']}/sessions"
    session = http.post(sessions, json={"editor": "terminal"}).json()
    assert session["state"] == "running", session
    return sessions, session


def python_in(settings: Settings, session_id: str, source: str) -> str:
    code, output = exec_in_session(settings, session_id, ["python3", "-c", source])
    assert code == 0, output
    return output


LAUNCH_AND_AWAIT = """
from kiln.sdk import workers
launched = workers.launch_workers(2, cpu=0.25, memory=0.25, code="print(42)")
result = workers.await_workers(launched, timeout_seconds=120)
print("RESULT", len(result["workers"]), len(result["failures"]),
      sorted(w["exit_code"] for w in result["workers"]))
listed = sorted(w["id"] for w in workers.list_workers())
print("LISTED", listed == sorted(w["id"] for w in launched))
try:
    workers.launch_workers(0, cpu=0.25, memory=0.25, code="pass")
except workers.WorkersError as exc:
    print("REFUSED", exc.status, exc)
"""

PROBE = """
import socket, sys
for port in sys.argv[1:]:
    try:
        socket.create_connection(("10.0.2.2", int(port)), timeout=3).close()
        print(port, "open")
    except OSError as exc:
        print(port, type(exc).__name__)
"""


def test_a_session_launches_and_awaits_workers_over_https(
    site: tuple[LiveServer, RunnerHandle], http: httpx.Client, settings: Settings
) -> None:
    _, session = start_session(http)
    output = python_in(settings, session["id"], LAUNCH_AND_AWAIT)
    assert "RESULT 2 0 [0, 0]" in output, output
    assert "LISTED True" in output, output
    assert "REFUSED 422 422: n must be between 1 and 32" in output, output

    web, grpc = settings.web.port, settings.runner.port
    code, probed = exec_in_session(
        settings, session["id"], ["python3", "-c", PROBE, str(web), str(grpc)]
    )
    assert code == 0 and f"{web} open" in probed, probed
    assert f"{grpc} open" not in probed and str(grpc) in probed, probed


def test_stopping_the_session_stops_a_long_running_worker(
    site: tuple[LiveServer, RunnerHandle], http: httpx.Client, settings: Settings, engine: Engine
) -> None:
    _, handle = site
    sessions, session = start_session(http)
    source = (
        "from kiln.sdk import workers\n"
        "w = workers.launch_workers(1, 0.25, 0.25, code='import time; time.sleep(600)')\n"
        "print('WORKER', w[0]['id'], w[0]['state'])\n"
    )
    line = next(x for x in python_in(settings, session["id"], source).splitlines() if "WORKER" in x)
    _, worker_id, state = line.split()
    assert state == "running"
    runtime = handle.current.servicer.runtime
    assert runtime.status(f"worker-{worker_id}").running

    stopped = http.delete(f"{sessions}/{session['id']}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert not runtime.status(f"worker-{worker_id}").running
    with make_sessionmaker(engine)() as db:
        row = db.get(Workload, worker_id)
        assert row is not None
        assert (row.state, row.reason) == ("stopped", "its parent session ended")
