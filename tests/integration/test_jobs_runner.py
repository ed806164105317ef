"""Job runs in real sandboxes, driven by the runner's reconciler: success with logs, failure
with retries, dependent jobs, timeouts, concurrency, cancel, cron slots exactly once, webhooks
(delivered, retried, never to Kiln's own addresses), and sessions waiting for quota."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Job, JobRun, Runtime, Workload
from kiln.runner.reconciler import Reconciler
from kiln.runner.webhooks import Policy, Refused, post
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_runtime_local_rootfs import minimal_rootfs
from tests.integration.test_sessions_support import (  # noqa: F401  (fixture)
    RunnerHandle,
    make_project,
    runner,
    start_session,
    wait_for,
)
from tests.integration.web_ui_client import sign_in

pytestmark = pytest.mark.timeout(120)
ENDED = {"succeeded", "failed", "timed_out", "stopped"}


def write(client: TestClient, project: str, who: Account, path: str, text: str) -> None:
    response = client.put(f"{project}/files/{path}", content=text.encode(), headers=who.headers)
    assert response.status_code in (200, 201), response.text


def create(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/jobs", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def run_now(client: TestClient, project: str, who: Account, job: str) -> dict[str, Any]:
    response = client.post(f"{project}/jobs/{job}/runs", headers=who.headers)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def wait_run(
    client: TestClient, project: str, who: Account, job: str, run_id: int, states: set[str]
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(
            f"{project}/jobs/{job}/runs/{run_id}", headers=who.headers
        ).json()
        return body if body["state"] in states else None

    return wait_for(probe, timeout=60, what=f"run {run_id} of {job} to be {states}")


def run_job_id(client: TestClient, project: str, who: Account, job: str) -> int:
    found: int = client.get(f"{project}/jobs/{job}", headers=who.headers).json()["id"]
    return found


def logs(client: TestClient, project: str, who: Account, job: str, run_id: int) -> str:
    response = client.get(f"{project}/jobs/{job}/runs/{run_id}/logs", headers=who.headers)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.usefixtures("runner")
def test_a_run_succeeds_with_its_log_kept(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    write(
        client,
        project,
        alice,
        "hello.py",
        "import os, sys\nprint('hello', sys.argv[1:], os.environ['GREETING'], "
        "os.environ['CDSW_PROJECT'])\n",
    )
    create(
        client,
        project,
        alice,
        name="hello",
        script="hello.py",
        arguments=["a b", "c"],
        env={"GREETING": "hi"},
    )
    run = run_now(client, project, alice, "hello")
    done = wait_run(client, project, alice, "hello", run["id"], ENDED)
    assert done["state"] == "succeeded", done
    assert done["exit_code"] == 0 and done["duration_seconds"] is not None
    assert logs(client, project, alice, "hello", run["id"]) == "hello ['a b', 'c'] hi demo\n"
    # Follow mode on an ended run returns the whole log and ends.
    followed = client.get(
        f"{project}/jobs/hello/runs/{run['id']}/logs",
        params={"follow": "true"},
        headers=alice.headers,
    )
    assert followed.text.startswith("hello")
    job = client.get(f"{project}/jobs/hello", headers=alice.headers).json()
    assert job["last_run"]["state"] == "succeeded"


@pytest.mark.usefixtures("runner")
def test_failures_are_retried_then_final(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    write(client, project, alice, "flaky.py", "import sys\nprint('try')\nsys.exit(3)\n")
    create(
        client,
        project,
        alice,
        name="flaky",
        script="flaky.py",
        max_retries=2,
        retry_backoff_seconds=1,
    )
    run = run_now(client, project, alice, "flaky")
    done = wait_run(client, project, alice, "flaky", run["id"], ENDED)
    assert done["state"] == "failed" and done["exit_code"] == 3
    assert done["attempt"] == 3 and "exited with code 3" in done["reason"]


@pytest.mark.usefixtures("runner")
def test_a_dependent_job_runs_after_its_parent_succeeds(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    write(client, project, alice, "a.py", "print('parent')\n")
    write(client, project, alice, "b.py", "print('child')\n")
    create(client, project, alice, name="parent", script="a.py")
    create(client, project, alice, name="child", script="b.py", parents=["parent"])
    run = run_now(client, project, alice, "parent")
    wait_run(client, project, alice, "parent", run["id"], {"succeeded"})

    def child_run() -> dict[str, Any] | None:
        items = client.get(f"{project}/jobs/child/runs", headers=alice.headers).json()["items"]
        return items[0] if items and items[0]["state"] == "succeeded" else None

    child = wait_for(child_run, timeout=30, what="the dependent run")
    assert child["trigger"] == "dependency" and child["parent_run_id"] == run["id"]
    # Which run of which job started it, and how that run itself was started.
    assert child["number"] == 1
    assert child["parent_run"] == {
        "id": run["id"],
        "number": 1,
        "job": "parent",
        "job_id": run_job_id(client, project, alice, "parent"),
        "trigger": "manual",
    }
    assert logs(client, project, alice, "child", child["id"]) == "child\n"


@pytest.mark.usefixtures("runner")
def test_timeout_concurrency_and_cancel(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    write(
        client,
        project,
        alice,
        "slow.py",
        "import time\nprint('start', flush=True)\ntime.sleep(600)\n",
    )
    create(client, project, alice, name="slow", script="slow.py", timeout_minutes=1)
    first = run_now(client, project, alice, "slow")
    second = run_now(client, project, alice, "slow")
    wait_run(client, project, alice, "slow", first["id"], {"running"})
    waiting = wait_run(client, project, alice, "slow", second["id"], {"waiting"})
    assert "max_concurrent_runs = 1" in waiting["reason"]
    # Live log while running.
    wait_for(lambda: logs(client, project, alice, "slow", first["id"]) == "start\n", timeout=20)
    cancelled = client.post(f"{project}/jobs/slow/runs/{first['id']}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("stopping", "stopped")
    done = wait_run(client, project, alice, "slow", first["id"], ENDED)
    assert done["state"] == "stopped"
    # The waiting run starts once the first is gone; cancel it too.
    wait_run(client, project, alice, "slow", second["id"], {"running"})
    client.post(f"{project}/jobs/slow/runs/{second['id']}/cancel", headers=alice.headers)
    assert wait_run(client, project, alice, "slow", second["id"], ENDED)["state"] == "stopped"


def test_a_run_past_its_time_limit_is_timed_out(
    client: TestClient,
    engine: Engine,
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    project = make_project(client, alice)
    write(client, project, alice, "slow.py", "import time\ntime.sleep(600)\n")
    create(client, project, alice, name="slow", script="slow.py", timeout_minutes=1)
    run = run_now(client, project, alice, "slow")
    wait_run(client, project, alice, "slow", run["id"], {"running"})
    # A minute is the smallest limit users can set; shorten this run's deadline instead of
    # waiting: the runner enforces the deadline it was given at start.
    with make_sessionmaker(engine)() as db:
        workload_id = db.get(JobRun, run["id"]).workload_id  # type: ignore[union-attr]
    runner.current.servicer._records[f"job-{workload_id}"].deadline = 1.0  # long past
    done = wait_run(client, project, alice, "slow", run["id"], ENDED)
    assert done["state"] == "timed_out", done
    assert "time limit" in done["reason"]


def every_minute_job(
    client: TestClient, project: str, who: Account, engine: Engine
) -> tuple[dict[str, Any], dt.datetime]:
    """A job ``tick`` on ``* * * * *`` whose schedule starts a day ahead, 30 s into a minute
    (returned): the live runner's own scheduler, on the real clock, finds nothing due there,
    so only a test's reconciler with its own clock makes slots come due."""
    job = create(client, project, who, name="tick", script="main.py", schedule="* * * * *")
    start = dt.datetime.now(dt.UTC).replace(second=30, microsecond=0) + dt.timedelta(days=1)
    with make_sessionmaker(engine)() as db:
        db.get(Job, job["id"]).schedule_anchor = start  # type: ignore[union-attr]
        db.commit()
    return job, start


def test_a_run_waiting_behind_an_application_names_it(
    app: FastAPI,
    client: TestClient,
    alice: Account,
    settings: Settings,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    """An application's instance holds quota like a session; the waiting run names the
    application (not a session), with its page and its stop path, which lets the run start."""
    settings.runner.user_quota_cpu_millis = 1000  # the application's 1 vCPU fills it
    project = make_project(client, alice)
    serve = 'exec python -m http.server "$CDSW_APP_PORT" --bind 127.0.0.1\n'
    write(client, project, alice, "serve.sh", serve)
    body = {"name": "web", "subdomain": "web-quota", "script": "serve.sh"}
    made = client.post(f"{project}/applications", json=body, headers=alice.headers)
    assert made.status_code == 201, made.text

    def serving() -> bool:
        found = client.get(f"{project}/applications/web", headers=alice.headers).json()
        return bool(found["state"] == "running")

    wait_for(serving, timeout=60, what="the application to serve")
    create(client, project, alice, name="once", script="main.py")
    run = run_now(client, project, alice, "once")
    run = wait_run(client, project, alice, "once", run["id"], {"waiting"})
    [holder] = run["quota"]["holders"]
    assert holder["kind"] == "application" and holder["name"] == "application web"
    assert holder["id"] == "web" and holder["url"] == "/p/alice/demo/applications/web"
    assert holder["stop"] == f"{project}/applications/web/stop"
    page = sign_in(app, "alice", alice.password).page(
        f"/p/alice/demo/jobs/{run_job_id(client, project, alice, 'once')}/runs/{run['id']}"
    )
    assert 'hx-post="/p/alice/demo/applications/web/stop"' in page
    assert "Stop application" in page
    assert client.post(holder["stop"], headers=alice.headers).status_code == 200
    done = wait_run(client, project, alice, "once", run["id"], ENDED)
    assert done["state"] == "succeeded", done


def test_cron_slots_run_exactly_once_and_catch_up_once(
    client: TestClient,
    engine: Engine,
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    project = make_project(client, alice)
    job, start = every_minute_job(client, project, alice, engine)
    maker = make_sessionmaker(engine)
    clocks = [start + dt.timedelta(minutes=10)]  # ten missed minutes: "once" runs one
    live = runner.current.reconciler
    assert live is not None
    # Two reconcilers over the same database (a restarted runner racing its old self) at the
    # same moment: the unique (job, slot) key keeps one run per slot.
    others = [
        Reconciler(
            maker, live.runner, live.settings, deliver=lambda n: None, clock=lambda: clocks[0]
        )
        for _ in range(2)
    ]
    threads = [threading.Thread(target=r.schedule) for r in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with maker() as db:
        slots = db.scalars(select(JobRun.scheduled_for).where(JobRun.job_id == job["id"])).all()
    assert [s.replace(tzinfo=dt.UTC) if s.tzinfo is None else s for s in slots] == [
        start.replace(second=0) + dt.timedelta(minutes=10)
    ]
    # The next minute's slot is a run once this one no longer waits to start.
    with maker() as db:
        [first] = db.scalars(select(JobRun.id).where(JobRun.job_id == job["id"])).all()
    wait_run(client, project, alice, "tick", first, ENDED)
    clocks[0] += dt.timedelta(minutes=1)
    others[0].schedule()
    others[0].schedule()  # again at the same moment: nothing new
    with maker() as db:
        runs = db.scalars(select(JobRun).where(JobRun.job_id == job["id"])).all()
    # Scheduled runs are numbered like the others: the slot lost to the race took no number.
    assert sorted(r.number for r in runs) == [1, 2]


class Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Receiver.fail_first > 0:
            Receiver.fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.received, Receiver.fail_first = [], 1
    server = ThreadingHTTPServer(("127.0.0.2", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


def test_webhooks_refuse_kiln_itself_and_private_addresses() -> None:
    policy = Policy(allowed=(), blocked_ports=frozenset({8443}))
    for url in ["http://127.0.0.1:8443/", "http://10.1.2.3/", "http://[::1]:9/", "http://0.0.0.0/"]:
        with pytest.raises(Refused):
            post(url, b"{}", policy)
    allowed = Policy(allowed=[ipaddress.ip_network("127.0.0.0/8")], blocked_ports=frozenset({8443}))
    with pytest.raises(Refused, match="Kiln's own"):
        post("http://127.0.0.1:8443/", b"{}", allowed)


def test_webhook_is_sent_on_failure_and_retried(
    client: TestClient,
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
    receiver: str,
) -> None:
    webhooks = runner.current.webhooks
    assert webhooks is not None
    webhooks.policy.allowed = [ipaddress.ip_network("127.0.0.2/32")]
    webhooks.backoff = (0.2, 0.2)
    project = make_project(client, alice)
    write(client, project, alice, "bad.py", "raise SystemExit(2)\n")
    create(client, project, alice, name="bad", script="bad.py", webhook_url=receiver)
    run = run_now(client, project, alice, "bad")
    wait_run(client, project, alice, "bad", run["id"], {"failed"})
    payload = wait_for(lambda: Receiver.received and Receiver.received[0], timeout=20)
    assert payload["event"] == "failure" and payload["job"]["name"] == "bad"
    assert payload["run"]["id"] == run["id"] and payload["run"]["exit_code"] == 2
    assert payload["run"]["number"] == run["number"] == 1
    # The sender records the outcome once the receiver's answer is back, a moment after
    # the receiver has the payload (reading it at once failed a check run).
    outcome = wait_for(lambda: webhooks.delivered and webhooks.delivered[-1], timeout=10)
    assert outcome == (receiver, "delivered")


def test_a_session_over_quota_waits_then_starts_by_itself(
    client: TestClient,
    alice: Account,
    settings: Settings,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    settings.runner.user_quota_cpu_millis = 2000  # room for two sessions of 1 vCPU
    project = make_project(client, alice)
    first = start_session(client, project, alice)
    second = start_session(client, project, alice)
    third = start_session(client, project, alice)  # 1 vCPU each; the quota is 2 vCPU
    assert first["state"] == second["state"] == "running", (first["reason"], first["timeline"])
    assert third["state"] == "waiting" and "waiting for quota" in third["reason"]
    url = f"{project}/sessions"
    assert client.delete(f"{url}/{first['id']}", headers=alice.headers).status_code == 200

    def started() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"{url}/{third['id']}", headers=alice.headers).json()
        return body if body["state"] == "running" else None

    body = wait_for(started, timeout=30, what="the waiting session to start")
    assert any("room in the quota" in e["message"] for e in body["timeline"])
    for session in (second, third):
        client.delete(f"{url}/{session['id']}", headers=alice.headers)


def test_a_run_waiting_for_quota_names_what_holds_it_and_its_schedule_waits(
    app: FastAPI,
    client: TestClient,
    engine: Engine,
    alice: Account,
    bob: Account,
    settings: Settings,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    """The tour's dead end: two sessions fill the quota, an every-minute job waits. The run
    names the sessions (with a way to stop each, for whoever may), the schedule queues no
    more runs behind it, and stopping a session lets it run."""
    settings.runner.user_quota_cpu_millis = 2000  # two sessions of 1 vCPU fill it
    project = make_project(client, alice)
    other = make_project(client, alice, "private")  # bob cannot see this one
    member = client.put(
        f"{project}/collaborators/bob", json={"role": "viewer"}, headers=alice.headers
    )
    assert member.status_code == 200, member.text
    here = start_session(client, project, alice)
    there = start_session(client, other, alice, editor="terminal")
    assert here["state"] == there["state"] == "running"
    job, start = every_minute_job(client, project, alice, engine)
    maker = make_sessionmaker(engine)
    live = runner.current.reconciler
    assert live is not None
    clocks = [start + dt.timedelta(minutes=1)]
    cron = Reconciler(
        maker, live.runner, live.settings, deliver=lambda n: None, clock=lambda: clocks[0]
    )
    cron.schedule()
    with maker() as db:
        [run_id] = db.scalars(select(JobRun.id).where(JobRun.job_id == job["id"])).all()
    run = wait_run(client, project, alice, "tick", run_id, {"waiting"})
    assert run["reason"].startswith("waiting for quota: alice uses 2 of 2 vCPU")

    # What holds the quota: both of alice's sessions, each with its page and how to stop it.
    quota = run["quota"]
    assert quota["whose"] == "alice" and quota["elsewhere"] == 0
    named = {h["id"]: h for h in quota["holders"]}
    assert set(named) == {here["id"], there["id"]}
    mine = named[here["id"]]
    assert mine["kind"] == "session" and mine["name"] == f"Terminal session {here['id'][:8]}"
    assert mine["url"] == f"/p/alice/demo/sessions/{here['id']}"
    assert mine["stop"] == f"{project}/sessions/{here['id']}"
    assert (mine["cpu"], mine["started_by"]) == (1.0, "alice")
    # A viewer of this project sees its session (and cannot stop it), not the other one's.
    seen_by_bob = client.get(f"{project}/jobs/tick/runs/{run_id}", headers=bob.headers).json()
    assert [h["id"] for h in seen_by_bob["quota"]["holders"]] == [here["id"]]
    assert seen_by_bob["quota"]["holders"][0]["stop"] is None
    assert seen_by_bob["quota"]["elsewhere"] == 1
    assert "private" not in json.dumps(seen_by_bob)
    # The run's page says the same, with a button per session.
    page = sign_in(app, "alice", alice.password).page(
        f"/p/alice/demo/jobs/{job['id']}/runs/{run_id}"
    )
    assert "Waiting for quota." in page and f"Terminal session {there['id'][:8]}" in page
    assert f'hx-post="/p/alice/private/sessions/{there["id"]}/stop"' in page

    # Two more minutes pass: the schedule queues nothing behind the waiting run.
    for _ in range(2):
        clocks[0] += dt.timedelta(minutes=1)
        cron.schedule()
    with maker() as db:
        assert db.scalars(select(JobRun.id).where(JobRun.job_id == job["id"])).all() == [run_id]

    # Stopping one session (through the path the run named) lets the run start and finish.
    assert client.delete(mine["stop"], headers=alice.headers).status_code == 200
    done = wait_run(client, project, alice, "tick", run_id, ENDED)
    assert done["state"] == "succeeded" and done["quota"] is None, done
    clocks[0] += dt.timedelta(minutes=1)
    cron.schedule()  # nothing waits any more: the next slot is a run again
    with maker() as db:
        assert len(db.scalars(select(JobRun.id).where(JobRun.job_id == job["id"])).all()) == 2
    client.delete(f"{other}/sessions/{there['id']}", headers=alice.headers)


@pytest.mark.parametrize(
    ("variable", "column", "words"),
    [
        ("IDLE_MAXIMUM_MINUTES", "last_activity_at", "idle"),
        ("SESSION_MAXIMUM_MINUTES", "started_at", "SESSION_MAXIMUM_MINUTES"),
    ],
)
def test_idle_and_old_sessions_are_stopped_by_the_runner(
    client: TestClient,
    engine: Engine,
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
    variable: str,
    column: str,
    words: str,
) -> None:
    project = make_project(client, alice)
    env = client.put(
        f"{project}/env/{variable}", json={"value": "1", "secret": False}, headers=alice.headers
    )
    assert env.status_code in (200, 201), env.text
    session = start_session(client, project, alice)
    assert session["state"] == "running"
    # Two minutes without activity (or of life) is past the one-minute limit.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    with make_sessionmaker(engine)() as db:
        db.execute(update(Workload).where(Workload.id == session["id"]).values({column: past}))
        db.commit()
    url = f"{project}/sessions/{session['id']}"

    def ended() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url, headers=alice.headers).json()
        return body if body["state"] in ENDED else None

    body = wait_for(ended, timeout=30, what="the runner to stop the session")
    assert body["state"] == "timed_out" and words in body["reason"], body
    assert any("stopping it" in e["message"] for e in body["timeline"])


def test_a_job_runs_on_its_runtime_image(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    alice: Account,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    key = hashlib.sha256(b"kiln job image").hexdigest()
    root = minimal_rootfs(settings.runtimes_dir.resolve() / "rootfs" / key)
    (root / "usr/bin/bash").symlink_to("dash")  # jobs run .sh files with bash
    with make_sessionmaker(engine)() as db:
        db.add(
            Runtime(
                name="tiny",
                source="oci-archive",
                digest=f"sha256:{key}",
                rootfs_path=str(root),
                editors=["terminal"],
                env=[["PATH", "/usr/bin:/bin"], ["IMAGE_ONLY", "from the image"]],
            )
        )
        db.commit()
    project = make_project(client, alice)
    write(client, project, alice, "where.sh", 'cat /etc/os-release; echo "$IMAGE_ONLY"\n')
    create(client, project, alice, name="where", script="where.sh", runtime="tiny")
    run = run_now(client, project, alice, "where")
    done = wait_run(client, project, alice, "where", run["id"], ENDED)
    assert done["state"] == "succeeded", done
    assert (
        logs(client, project, alice, "where", run["id"]) == "ID=kiln-test-image\nfrom the image\n"
    )
