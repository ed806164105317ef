"""Runtimes and editors of sessions, through the API, with a recording stand-in for the runner
(what the web tier asks the runner for; real sandboxes are in test_sessions_jupyterlab.py):
which runtime a session gets, what the runner is told, when JupyterLab counts as ready, and
the refusals (422) for runtimes and editors that do not exist or do not go together."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.workload_models import Runtime, Workload
from kiln.domain import session_editors
from kiln.rpc import runner_pb2 as pb
from kiln.runtimes.catalog import builtin_runtime
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, start_session

KEY = hashlib.sha256(b"an image").hexdigest()


class RecordingRunner:
    """Answers like a runner whose sandboxes start at once; remembers every spec."""

    def __init__(self) -> None:
        self.specs: list[pb.WorkloadSpec] = []
        self.endpoint = ("127.0.0.1", 9)  # discard: nothing answers there
        self.running: dict[str, bool] = {}
        self.stops: list[str] = []

    def _status(self, workload_id: str) -> pb.WorkloadStatus:
        status = pb.WorkloadStatus(workload_id=workload_id)
        if self.running.get(workload_id):
            status.state = pb.WORKLOAD_STATE_RUNNING
            status.started_at.GetCurrentTime()
            status.endpoint.host, status.endpoint.port = self.endpoint
        else:
            status.state, status.exit_code, status.reason = (
                pb.WORKLOAD_STATE_STOPPED,
                143,
                "stopped",
            )
        return status

    def start(self, spec: pb.WorkloadSpec) -> pb.WorkloadStatus:
        self.specs.append(spec)
        self.running[spec.workload_id] = True
        return self._status(spec.workload_id)

    def status(self, workload_id: str) -> pb.WorkloadStatus:
        return self._status(workload_id)

    def stop(self, workload_id: str, reason: str) -> pb.WorkloadStatus:
        self.stops.append(reason)
        self.running[workload_id] = False
        return self._status(workload_id)

    def logs(self, workload_id: str, offset: int = 0, follow: bool = False) -> Iterator[bytes]:
        yield b"[I ServerApp] starting\n[E ServerApp] something went wrong\n"

    def wake(self) -> None:
        pass


@pytest.fixture
def fake(app: FastAPI) -> RecordingRunner:
    app.state.runner_client = RecordingRunner()
    runner: RecordingRunner = app.state.runner_client
    return runner


@pytest.fixture
def image_runtime(engine: Engine, settings: Settings) -> Runtime:
    """A runtime image in the cache: a terminal only, with an Env of its own."""
    root = settings.runtimes_dir / "rootfs" / KEY
    (root / "usr").mkdir(parents=True)
    with transaction(make_sessionmaker(engine)) as db:
        row = Runtime(
            name="slim",
            source="oci-archive",
            digest=f"sha256:{KEY}",
            rootfs_path=str(root),
            editors=["terminal"],
            env=[
                ["PATH", "/opt/conda/bin:/usr/bin:/bin"],
                ["IMAGE_ONLY", "yes"],
                ["KILN_PROJECT", "the image loses"],
                ["GREETING", "from the image"],
            ],
        )
        db.add(row)
    return row


@pytest.fixture
def answering() -> Iterator[tuple[str, int]]:
    """A stand-in JupyterLab: answers GET /api/status."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"last_activity": "2026-11-29T17:12:49.606796Z", "kernels": 1}'
            self.send_response(200 if self.path == "/api/status" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ("127.0.0.1", server.server_address[1])
    server.shutdown()


def sessions_in(engine: Engine) -> int:
    with make_sessionmaker(engine)() as db:
        return db.scalar(select(func.count()).select_from(Workload)) or 0


def test_image_runtime_reaches_the_runner_with_its_env_underneath(
    client: TestClient,
    alice: Account,
    fake: RecordingRunner,
    image_runtime: Runtime,
    settings: Settings,
) -> None:
    project = make_project(client, alice)
    client.put(f"{project}/env/GREETING", json={"value": "from-the-project"}, headers=alice.headers)
    session = start_session(client, project, alice, editor="terminal", runtime="slim")
    assert session["state"] == "running" and session["runtime"] == "slim"
    assert session["editor_url"] is None  # a terminal has no web page of its own
    [spec] = fake.specs
    expected_root = (settings.runtimes_dir / "rootfs" / KEY).resolve()
    assert (spec.runtime.id, spec.runtime.image) == ("slim", f"sha256:{KEY}")
    assert spec.runtime.rootfs == str(expected_root)
    assert list(spec.command) == [] and spec.port == 0  # the runner's keep-alive
    env = dict(spec.env)
    assert env["IMAGE_ONLY"] == "yes" and env["PATH"] == "/opt/conda/bin:/usr/bin:/bin"
    assert env["GREETING"] == "from-the-project"  # the project's variable wins
    assert env["KILN_PROJECT"] == "alice/demo"  # and Kiln's own


def test_default_runtime_is_the_builtin_one(
    client: TestClient, alice: Account, fake: RecordingRunner
) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    assert session["runtime"] == "builtin"
    assert fake.specs[0].runtime == pb.RuntimeRef(id="builtin")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"editor": "jupyterlab", "runtime": "slim"}, "runtime 'slim' has no jupyterlab"),
        ({"editor": "terminal", "runtime": "nope"}, "no runtime named 'nope'"),
        ({"editor": "jupyterlab", "runtime": "x" * 101}, "runtime"),
        ({"editor": "emacs"}, "unknown editor 'emacs'"),
        ({"editor": "terminal", "runtime": 7}, "runtime"),
    ],
)
def test_runtime_and_editor_refusals_start_nothing(
    client: TestClient,
    engine: Engine,
    alice: Account,
    fake: RecordingRunner,
    image_runtime: Runtime,
    body: dict[str, Any],
    words: str,
) -> None:
    project = make_project(client, alice)
    response = client.post(f"{project}/sessions", json=body, headers=alice.headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert words in response.json()["detail"]
    assert fake.specs == [] and sessions_in(engine) == 0


@pytest.mark.skipif(
    "jupyterlab" not in builtin_runtime().editors,
    reason="NOTICE: jupyterlab is not installed beside Kiln",
)
def test_jupyterlab_is_ready_only_once_it_answers(
    client: TestClient,
    alice: Account,
    fake: RecordingRunner,
    answering: tuple[str, int],
) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice, editor="jupyterlab")
    path = f"{project}/sessions/{session['id']}"
    [spec] = fake.specs
    assert spec.port == session_editors.JUPYTERLAB_PORT
    # The runtime's own, on its PATH, after its settings are seeded in the sandbox's /tmp.
    assert spec.command[:2] == ["/bin/sh", "-c"] and spec.command[4] == "jupyter-lab"
    assert "--IdentityProvider.token=" in spec.command
    assert dict(spec.env)["JUPYTERLAB_SETTINGS_DIR"].startswith("/tmp/")

    # The sandbox runs, nothing answers on the port yet: still starting, and it says why.
    assert session["state"] == "starting", session
    assert session["timeline"][-1]["message"] == "waiting for jupyterlab to answer on port 8888"
    assert client.get(path, headers=alice.headers).json()["state"] == "starting"
    opened = client.get(f"{path}/open", headers=alice.headers, follow_redirects=False)
    assert opened.status_code == 409 and "starting" in opened.json()["detail"]

    fake.endpoint = answering  # JupyterLab comes up
    got = client.get(path, headers=alice.headers).json()
    assert got["state"] == "running", got
    assert got["timeline"][-1]["message"] == "jupyterlab ready"
    opened = client.get(f"{path}/open", headers=alice.headers, follow_redirects=False)
    assert opened.status_code == 303
    assert opened.headers["location"].startswith(f"https://{session['id']}.kiln.localhost/")


def test_jupyterlab_that_never_answers_fails_saying_why(
    client: TestClient,
    alice: Account,
    fake: RecordingRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_editors, "EDITOR_START_SECONDS", 0.0)
    project = make_project(client, alice)
    session = start_session(client, project, alice, editor="jupyterlab")
    got = client.get(f"{project}/sessions/{session['id']}", headers=alice.headers).json()
    assert got["state"] == "failed", got
    assert got["reason"] == "did not become ready in time"
    messages = [e["message"] for e in got["timeline"]]
    assert any(
        m.startswith("jupyterlab did not answer on port 8888 within 0 s")
        and "something went wrong" in m
        for m in messages
    ), messages
    assert fake.stops and fake.running == {f"session-{session['id']}": False}


def test_a_terminal_session_has_no_editor_to_open(
    client: TestClient, alice: Account, fake: RecordingRunner
) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    opened = client.get(
        f"{project}/sessions/{session['id']}/open", headers=alice.headers, follow_redirects=False
    )
    assert opened.status_code == 409
    assert "its editor is the terminal" in opened.json()["detail"]


def test_jupyterlabs_own_activity_is_readable(answering: tuple[str, int]) -> None:
    endpoint = f"{answering[0]}:{answering[1]}"
    seen = session_editors.editor_last_activity("jupyterlab", endpoint)
    assert seen == datetime(2026, 11, 29, 17, 12, 49, 606796, tzinfo=UTC)
    assert session_editors.editor_last_activity("terminal", endpoint) is None
    assert session_editors.editor_last_activity("jupyterlab", "127.0.0.1:9") is None
    assert session_editors.editor_last_activity("jupyterlab", "") is None
