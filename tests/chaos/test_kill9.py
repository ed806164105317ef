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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Engine

from kiln.testing.live import free_port
from tests.conftest import Account

T = TypeVar("T")
pytestmark = pytest.mark.timeout(240)
ENDED = {"succeeded", "failed", "timed_out", "stopped"}

if os.geteuid() != 0:  # pragma: no cover - the runner needs root for its sandboxes
    pytest.skip("NOTICE: chaos tests need root (the runner's sandboxes)", allow_module_level=True)


class Site:
    """``kiln up`` on a data dir and the test's database, with its output collected."""

    def __init__(self, tmp_path: Path, db_url: str) -> None:
        self.data_dir = tmp_path / "data"
        self.port, self.runner_port = free_port(), free_port()
        env = dict(
            os.environ,
            KILN_ADMIN_PASSWORD="first-admin-password",
            KILN_RUNNER_PORT=str(self.runner_port),
            KILN_DATABASE_URL=db_url,
            KILN_SECRET_KEY="chaos-" + "x" * 40,
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_output(self, text: str, timeout: float = 90, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines[after:]):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.lines)}")
            time.sleep(0.1)

    def http(self, who: Account) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://localhost:{self.port}/api/v1",
            verify=str(self.data_dir / "pki" / "ca.crt"),
            headers=who.headers,
            timeout=30,
        )

    def kill9(self, service: str) -> int:
        """SIGKILL one service; returns once the supervisor restarts it, with the output
        line count at the kill (to wait for what the new process prints)."""
        out = subprocess.run(
            ["pgrep", "-f", f"kiln.cli.main {service} --data-dir {self.data_dir}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(out) == 1, out
        mark = len(self.lines)
        os.kill(int(out[0]), signal.SIGKILL)
        self.wait_for_output(f"restarting {service}", after=mark)
        return mark

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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
        assert session["state"] == "running", session
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
