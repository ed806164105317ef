"""Sessions end to end: the API starts a real sandbox through a real runner (mutual TLS),
the terminal WebSocket reaches a shell inside it, and stopping ends it."""

from __future__ import annotations

import json
import socket
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.models import Project
from kiln.settings import Settings
from kiln.storage.store import project_store
from tests.conftest import Account
from tests.integration.test_sessions_support import (
    RunnerHandle,
    make_project,
    read_line,
    runner,  # noqa: F401  (fixture)
    share,
    start_session,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.usefixtures("runner")
def test_start_terminal_stop(
    client: TestClient,
    alice: Account,
) -> None:
    project = make_project(client, alice)
    client.put(f"{project}/env/GREETING", json={"value": "from-the-project"}, headers=alice.headers)
    session = start_session(client, project, alice, editor="terminal")

    assert session["state"] == "running", session
    assert session["editor"] == "terminal" and session["created_by"] == "alice"
    assert (session["cpu"], session["memory_bytes"]) == (1.0, 2 * 1024**3)
    states = [(e["state"], e["message"]) for e in session["timeline"]]
    assert states[0] == ("queued", "queued")
    assert states[1][0] == "starting"
    assert ("running", "sandbox started") in states and states[-1] == ("running", "terminal ready")
    times = [datetime.fromisoformat(e["at"]) for e in session["timeline"]]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert session["started_at"] is not None and session["ended_at"] is None

    # Looking at it asks the runner, which still has it running.
    got = client.get(f"{project}/sessions/{session['id']}", headers=alice.headers).json()
    assert got["state"] == "running" and got["timeline"] == session["timeline"]
    listed = client.get(f"{project}/sessions", headers=alice.headers).json()
    assert [s["id"] for s in listed["items"]] == [session["id"]]

    url = f"{project}/sessions/{session['id']}/terminal?rows=30&cols=100"
    with client.websocket_connect(url, headers=alice.headers) as ws:
        ws.send_bytes(b"echo hello\n")
        read_line(ws, b"hello")
        ws.send_text(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
        ws.send_text("stty size; echo $CDSW_PROJECT $CDSW_ENGINE_ID $KILN_PROJECT $GREETING\n")
        slug = project.rsplit("/", 1)[1]
        read_line(ws, f"45 123\r\n{slug} {session['id']} alice/{slug} from-the-project".encode())
        ws.send_text("exit 3\n")
        exit_frame = None
        for _ in range(100):
            message = ws.receive()
            if message.get("text"):
                exit_frame = json.loads(message["text"])
                break
        assert exit_frame == {"type": "exit", "exit_code": 3}

    # Leaving the shell does not end the session.
    got = client.get(f"{project}/sessions/{session['id']}", headers=alice.headers).json()
    assert got["state"] == "running"

    stopped = client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers)
    assert stopped.status_code == 200, stopped.text
    body = stopped.json()
    assert body["state"] == "stopped" and body["reason"] == "stopped on request"
    assert body["ended_at"] is not None
    assert [e["state"] for e in body["timeline"]][-2:] == ["stopping", "stopped"]
    assert body["timeline"][-2]["message"] == "stop requested by alice"
    # A second stop is a clean conflict, and its terminal is closed.
    again = client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers)
    assert again.status_code == 409, again.text
    assert again.headers["content-type"].startswith("application/problem+json")
    # The console is kept after the session ended: what its terminal showed.
    console = client.get(f"{project}/sessions/{session['id']}/logs", headers=alice.headers)
    assert console.status_code == 200, console.text
    assert "hello\r\n" in console.text and "45 123" in console.text


@pytest.mark.usefixtures("runner")
def test_list_paginates_newest_first_and_viewers_can_look(
    client: TestClient,
    alice: Account,
    bob: Account,
) -> None:
    project = make_project(client, alice)
    share(client, project, alice, bob, "viewer")
    ids = [start_session(client, project, alice)["id"] for _ in range(3)]
    pages, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"{project}/sessions", params=params, headers=bob.headers).json()
        pages.append([s["id"] for s in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i for p in pages for i in p] == ids[::-1] and len(pages) == 2
    bad = client.get(f"{project}/sessions", params={"cursor": "xyz"}, headers=bob.headers)
    assert bad.status_code == 422
    for session_id in ids:
        stopped = client.delete(f"{project}/sessions/{session_id}", headers=alice.headers)
        assert stopped.is_success, stopped.text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed when the block ends: nothing listens there


def test_runner_unreachable_fails_fast_with_a_reason(
    client: TestClient, settings: Settings, alice: Account
) -> None:
    """Choice: the start is acknowledged (201) and the session records the failure; the
    API never answers 500 for a runner that is down."""
    settings.runner.port = _closed_port()
    project = make_project(client, alice)
    response = client.post(f"{project}/sessions", json={}, headers=alice.headers)
    assert response.status_code == 201, response.text
    session = response.json()
    assert session["state"] == "failed"
    assert "runner is not reachable" in session["reason"], session["reason"]
    assert session["timeline"][-1]["state"] == "failed"
    assert session["ended_at"] is not None
    got = client.get(f"{project}/sessions/{session['id']}", headers=alice.headers)
    assert got.status_code == 200 and got.json()["state"] == "failed"
    # Nothing to stop: a clean 409, not a 5xx.
    assert (
        client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers).status_code
        == 409
    )


@pytest.mark.usefixtures("runner")
def test_a_start_the_runner_refuses_fails_with_its_reason(
    client: TestClient, engine: Engine, settings: Settings, alice: Account
) -> None:
    project = make_project(client, alice)
    with make_sessionmaker(engine)() as db:
        project_id = db.scalar(select(Project.id).where(Project.slug == project.rsplit("/")[-1]))
    project_store(settings).delete(project_id)  # the runner refuses: no files
    session = start_session(client, project, alice)
    assert session["state"] == "failed"
    assert "has no files on this runner" in session["reason"], session["reason"]
    assert [e["state"] for e in session["timeline"]] == ["queued", "starting", "failed"]


def test_stop_during_a_runner_outage_is_503_then_finishes(
    client: TestClient,
    runner: RunnerHandle,  # noqa: F811
    alice: Account,
) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    url = f"{project}/sessions/{session['id']}"
    runner.stop()
    # Looking shows the last recorded state; stopping records the intent, then says 503.
    assert client.get(url, headers=alice.headers).json()["state"] == "running"
    down = client.delete(url, headers=alice.headers)
    assert down.status_code == 503, down.text
    assert down.headers["content-type"].startswith("application/problem+json")
    assert client.get(url, headers=alice.headers).json()["state"] == "stopping"
    runner.start_again()  # it re-attaches to the sandbox, which kept running

    # The restarted runner's reconciler finishes the recorded stop by itself.

    def stopped() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url, headers=alice.headers).json()
        return body if body["state"] == "stopped" else None

    body = wait_for(stopped, timeout=30, what="the stop to finish once the runner is back")
    assert body["state"] == "stopped" and body["reason"] == "stopped on request"
    again = client.delete(url, headers=alice.headers)  # stopping it again: it has ended
    assert again.status_code == 409 and "already ended" in again.text, again.text


@pytest.mark.usefixtures("runner")
def test_a_session_that_ends_by_itself_is_seen_ended(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    url = f"{project}/sessions/{session['id']}"
    with client.websocket_connect(f"{url}/terminal", headers=alice.headers) as ws:
        # Kill the session's keep-alive process from inside: the sandbox ends on its own.
        ws.send_bytes(b"pkill -KILL -f 'sleep infinity'\n")
        for _ in range(200):  # the sandbox's end takes the shell with it: the socket closes
            if ws.receive()["type"] == "websocket.close":
                break

    def ended() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url, headers=alice.headers).json()
        return body if body["state"] not in ("running", "starting") else None

    body = wait_for(ended, timeout=20, what="the session to be seen ended")
    assert body["state"] == "failed", body
    assert "SIGKILL" in body["reason"] and body["exit_code"] is not None, body
    assert body["ended_at"] is not None and body["timeline"][-1]["state"] == "failed"
    # Ended sessions cannot be stopped, nor get a terminal.
    assert client.delete(url, headers=alice.headers).status_code == 409


@pytest.mark.usefixtures("runner")
def test_files_written_by_the_web_tier_stay_writable_in_a_live_session(
    client: TestClient, alice: Account
) -> None:
    project = make_project(client, alice)
    session = start_session(client, project, alice)
    put = client.put(
        f"{project}/files/notes/today.txt", content=b"from the UI\n", headers=alice.headers
    )
    assert put.status_code == 201, put.text
    url = f"{project}/sessions/{session['id']}/terminal"
    with client.websocket_connect(url, headers=alice.headers) as ws:
        # Append to the file the web tier wrote, make a file in its new folder, and commit
        # (git writes objects beside the ones the web tier's commit created).
        ws.send_text(
            "echo from-the-terminal >> notes/today.txt && touch notes/more.txt && "
            "git add -A && git -c user.name=a -c user.email=a@example.com commit -qm t "
            "&& echo WRITE-$((40+2))\n"
        )
        read_line(ws, b"WRITE-42")
    got = client.get(f"{project}/files/notes/today.txt", headers=alice.headers)
    assert got.content == b"from the UI\nfrom-the-terminal\n"
    client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers)
