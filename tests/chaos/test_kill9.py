"""Chaos: ``kill -9`` of the runner and of the web tier under ``kiln up``, on SQLite and
PostgreSQL.

* Runner killed while a session and job runs are active: the workloads keep running, the
  supervisor restarts the runner, it re-attaches, every run ends (none stays "running"
  forever), and a run whose workload died while the runner was down is failed with why.
* Web tier killed right after acknowledging runs: every acknowledged run exists after the
  restart and is run.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Engine

from tests.conftest import Account
from tests.kiln_site import KilnSite

T = TypeVar("T")
pytestmark = pytest.mark.timeout(240)
ENDED = {"succeeded", "failed", "timed_out", "stopped"}

if os.geteuid() != 0:  # pragma: no cover - the runner needs root for its sandboxes
    pytest.skip("NOTICE: chaos tests need root (the runner's sandboxes)", allow_module_level=True)


class Site(KilnSite):
    """``kiln up`` on the test's database, with API clients for a test user."""

    def http(self, who: Account) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://localhost:{self.port}/api/v1",
            verify=ssl.create_default_context(cafile=self.ca_file),
            headers=who.headers,
            timeout=30,
        )


@pytest.fixture
def site(tmp_path: Path, db_url: str, engine: Engine) -> Iterator[Site]:
    s = Site(tmp_path, db_url)
    try:
        s.wait_for_output("Kiln is up")
        s.wait_for_output("runner serving gRPC")
        yield s
    finally:
        s.stop()
        # Sandboxes outlive the runner by design: end this test's for good.
        subprocess.run(["pkill", "-9", "-f", "chaos-job-"], check=False)


def wait_for(probe: Callable[[], T | None], timeout: float = 60, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except httpx.TransportError:  # the web tier is restarting
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def setup_project(http: httpx.Client) -> str:
    created = http.post("/projects", json={"name": "chaos", "template": "python-starter"})
    assert created.status_code == 201, created.text
    project = f"/projects/alice/{created.json()['slug']}"
    scripts = {
        "chaos-job-long.py": "import time\nprint('begin', flush=True)\ntime.sleep(12)\n"
        "print('done')\n",
        "chaos-job-doomed.py": "import time\ntime.sleep(600)\n",
        "chaos-job-quick.py": "print('quick')\n",
    }
    for name, text in scripts.items():
        put = http.put(f"{project}/files/{name}", content=text.encode())
        assert put.status_code in (200, 201), put.text
        job = http.post(f"{project}/jobs", json={"name": name[10:-3], "script": name})
        assert job.status_code == 201, job.text
    return project


def run(http: httpx.Client, project: str, job: str) -> int:
    response = http.post(f"{project}/jobs/{job}/runs")
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def run_state(http: httpx.Client, project: str, job: str, run_id: int) -> dict[str, Any]:
    body: dict[str, Any] = http.get(f"{project}/jobs/{job}/runs/{run_id}").json()
    return body


def test_runner_killed_with_live_session_and_runs(site: Site, alice: Account) -> None:
    with site.http(alice) as http:
        project = setup_project(http)
        session = http.post(f"{project}/sessions", json={"editor": "terminal"}).json()
        # A refusal shows its problem body, and the site's log says why (a 500 is logged).
        assert session.get("state") == "running", (session, site.explain())
        long_run, doomed_run = run(http, project, "long"), run(http, project, "doomed")
        for job, run_id in (("long", long_run), ("doomed", doomed_run)):
            wait_for(
                lambda j=job, r=run_id: run_state(http, project, j, r)["state"] == "running",
                what=f"{job} running",
            )

        mark = site.kill9("runner")
        # While the runner is down, the doomed run's process dies (an OOM killer, a
        # colleague's kill): nobody is watching it.
        subprocess.run(["pkill", "-9", "-f", "chaos-job-doomed.py"], check=True)
        site.wait_for_output("runner serving gRPC", after=mark)

        long = wait_for(
            lambda: (b := run_state(http, project, "long", long_run))["state"] in ENDED and b,
            what="the long run to end after the restart",
        )
        assert long["state"] == "succeeded", long
        log = http.get(f"{project}/jobs/long/runs/{long_run}/logs").text
        assert log == "begin\ndone\n"  # the output written while the runner was down is kept
        doomed = wait_for(
            lambda: (b := run_state(http, project, "doomed", doomed_run))["state"] in ENDED and b,
            what="the doomed run to be recorded",
        )
        assert doomed["state"] == "failed", doomed
        assert "SIGKILL" in doomed["reason"] or "lost" in doomed["reason"], doomed
        # The session's sandbox kept running and was re-attached.
        again = http.get(f"{project}/sessions/{session['id']}").json()
        assert again["state"] == "running", again
        stopped = http.delete(f"{project}/sessions/{session['id']}")
        assert stopped.json()["state"] == "stopped", stopped.text


def test_web_killed_loses_no_acknowledged_run(site: Site, alice: Account) -> None:
    with site.http(alice) as http:
        project = setup_project(http)
        acknowledged = [run(http, project, "quick") for _ in range(3)]
        site.kill9("web")
        wait_for(lambda: http.get(project).status_code == 200, what="the web tier back")
        acknowledged.append(run(http, project, "quick"))
        for run_id in acknowledged:
            done = wait_for(
                lambda r=run_id: (
                    (b := run_state(http, project, "quick", r))["state"] in ENDED and b
                ),
                what=f"run {run_id}",
            )
            assert done["state"] == "succeeded", done
            assert http.get(f"{project}/jobs/quick/runs/{run_id}/logs").text == "quick\n"
