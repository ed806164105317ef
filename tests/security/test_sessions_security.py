"""Sessions: who may start, look at, stop and open a terminal on them, and bad input.
Refusals are precise 4xx (problem+json) or WebSocket closes before accept, and start nothing."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from starlette.websockets import WebSocketDisconnect

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import AuditEvent
from kiln.db.workload_models import ResourceProfile, Workload
from kiln.domain.identity import get_user, start_web_session
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_sessions_support import (
    make_project,
    read_line,
    runner,  # noqa: F401  (fixture)
    share,
    start_session,
)

pytestmark = pytest.mark.timeout(60)
COOKIE = "__Host-kiln_session"
OWN_ORIGIN = "https://testserver"
# TestClient defaults WebSockets to ws://; the app runs behind TLS, where the handshake's
# scheme is wss and the page's origin https://testserver.
WSS = "wss://testserver"


def workload_count(engine: Engine) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(Workload)) or 0)


def problem(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    detail: str = response.json()["detail"]
    return detail


def refused(client: TestClient, url: str, headers: dict[str, str]) -> int:
    with (
        pytest.raises(WebSocketDisconnect) as caught,
        client.websocket_connect(WSS + url, headers=headers) as ws,
    ):
        ws.receive()  # an accepted socket would wait here: it must not get this far
    return caught.value.code


def cookie_for(engine: Engine, username: str) -> str:
    from datetime import timedelta

    with transaction(make_sessionmaker(engine)) as db:
        token = start_web_session(db, get_user(db, username), timedelta(hours=1)).token
    return f"{COOKIE}={token}"


def test_bad_input_and_roles_start_nothing(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    make_user: Any,
    alice: Account,
    bob: Account,
) -> None:
    # No runner: none of these may get as far as asking one (that would be a failed session).
    project = make_project(client, alice)
    viewer, operator = make_user("vera"), make_user("otto")
    share(client, project, alice, viewer, "viewer")
    share(client, project, alice, operator, "operator")
    sessions = f"{project}/sessions"

    assert "unknown editor" in problem(
        client.post(sessions, json={"editor": "emacs"}, headers=alice.headers), 422
    )
    assert "no runtime named 'nope'" in problem(
        client.post(
            sessions, json={"editor": "jupyterlab", "runtime": "nope"}, headers=alice.headers
        ),
        422,
    )
    assert "no resource profile named 'huge'" in problem(
        client.post(sessions, json={"profile": "huge"}, headers=alice.headers), 422
    )
    problem(client.post(sessions, json={"editor": 5}, headers=alice.headers), 422)
    problem(client.post(sessions, json={"editor": "x" * 41}, headers=alice.headers), 422)
    problem(client.post(sessions, json={"editor": "terminal\x00"}, headers=alice.headers), 422)
    problem(client.post(sessions, json={}, headers={}), 401)
    assert "contributor" in problem(client.post(sessions, json={}, headers=viewer.headers), 403)
    problem(client.post(sessions, json={}, headers=operator.headers), 403)
    problem(client.post(sessions, json={}, headers=bob.headers), 404)  # a stranger
    problem(client.get(sessions, headers=bob.headers), 404)
    problem(client.get(f"{sessions}?limit=0", headers=alice.headers), 422)
    assert workload_count(engine) == 0


@pytest.mark.usefixtures("runner")
def test_profiles_choose_the_resources(client: TestClient, engine: Engine, alice: Account) -> None:
    with transaction(make_sessionmaker(engine)) as db:
        db.add(ResourceProfile(name="small", cpu_millis=500, memory_bytes=512 * 1024**2))
        db.add(
            # 0.5 + 1.5 vCPU: both fit the default quota of 2 vCPU together.
            ResourceProfile(name="std", cpu_millis=1500, memory_bytes=4 * 1024**3, is_default=True)
        )
        db.add(ResourceProfile(name="gpu", cpu_millis=1000, memory_bytes=1024**3, gpu=1))
    project = make_project(client, alice)
    chosen = start_session(client, project, alice, profile="small")
    assert (chosen["profile"], chosen["cpu"], chosen["memory_bytes"]) == ("small", 0.5, 512 << 20)
    default = start_session(client, project, alice)
    assert (default["profile"], default["cpu"]) == ("std", 1.5)
    assert chosen["state"] == default["state"] == "running"
    assert "GPUs" in problem(
        client.post(f"{project}/sessions", json={"profile": "gpu"}, headers=alice.headers), 422
    )
    assert workload_count(engine) == 2


@pytest.mark.usefixtures("runner")
def test_sessions_and_terminals_are_confined_to_their_project_and_users(
    client: TestClient,
    engine: Engine,
    make_user: Any,
    alice: Account,
    bob: Account,
) -> None:
    project = make_project(client, alice)
    other = make_project(client, alice, name="other")
    viewer = make_user("vera")
    share(client, project, alice, viewer, "viewer")
    session = start_session(client, project, alice)
    sid = session["id"]
    assert session["state"] == "running"

    # Another project's path with this id: not found, for every verb.
    problem(client.get(f"{other}/sessions/{sid}", headers=alice.headers), 404)
    problem(client.delete(f"{other}/sessions/{sid}", headers=alice.headers), 404)
    problem(client.get(f"{project}/sessions/../sessions/nope", headers=alice.headers), 404)
    problem(client.get(f"{project}/sessions/{'é' * 40}", headers=alice.headers), 404)
    # Viewers see it but cannot stop it; strangers learn nothing.
    assert client.get(f"{project}/sessions/{sid}", headers=viewer.headers).status_code == 200
    problem(client.delete(f"{project}/sessions/{sid}", headers=viewer.headers), 403)
    problem(client.get(f"{project}/sessions/{sid}", headers=bob.headers), 404)
    problem(client.delete(f"{project}/sessions/{sid}", headers=bob.headers), 404)
    # The kept console: not for strangers, nor for viewers (a terminal shows what was typed).
    problem(client.get(f"{project}/sessions/{sid}/logs", headers=bob.headers), 404)
    problem(client.get(f"{other}/sessions/{sid}/logs", headers=alice.headers), 404)
    problem(client.get(f"{project}/sessions/{sid}/logs", headers=viewer.headers), 403)

    terminal = f"{project}/sessions/{sid}/terminal"
    assert refused(client, terminal, bob.headers) == 4404  # another user's session
    assert refused(client, terminal, viewer.headers) == 4403  # may look, may not type
    assert refused(client, f"{other}/sessions/{sid}/terminal", alice.headers) == 4404
    assert refused(client, terminal, {}) == 4401
    assert refused(client, terminal, {"Authorization": "Bearer kiln_nope"}) == 4401
    cookie = cookie_for(engine, "alice")
    foreign = {"cookie": cookie, "origin": "https://evil.example"}
    assert refused(client, terminal, foreign) == 4403
    assert refused(client, terminal, {"cookie": cookie}) == 4403  # browsers always send Origin
    bob_cookie = {"cookie": cookie_for(engine, "bob"), "origin": OWN_ORIGIN}
    assert refused(client, terminal, bob_cookie) == 4404

    # The positive control: the same cookie from our own origin gets a working shell.
    with client.websocket_connect(
        WSS + terminal, headers={"cookie": cookie, "origin": OWN_ORIGIN}
    ) as ws:
        ws.send_bytes(b"echo $((6 * 7))\n")
        read_line(ws, b"42")
    assert client.get(f"{project}/sessions/{sid}", headers=alice.headers).json()["state"] == (
        "running"
    )

    assert client.delete(f"{project}/sessions/{sid}", headers=alice.headers).status_code == 200
    assert refused(client, terminal, alice.headers) == 4409  # it has ended

    with make_sessionmaker(engine)() as db:
        lines = db.execute(
            select(AuditEvent.actor_name, AuditEvent.outcome)
            .where(AuditEvent.action == "session.terminal")
            .order_by(AuditEvent.id)
        ).all()
    # The viewer's attempt and the foreign-Origin one are on record; one shell was opened.
    assert [tuple(line) for line in lines] == [
        ("vera", "denied"),
        ("alice", "denied"),
        ("alice", "denied"),
        ("alice", "success"),
    ]
