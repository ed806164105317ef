"""The terminal over a real HTTPS server (uvicorn, TLS from Kiln's CA) with a real WebSocket
client, as a browser reaches it: wss://, the session cookie and the page's Origin."""

from __future__ import annotations

import re
import ssl
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from kiln.db.engine import make_sessionmaker, transaction
from kiln.domain.identity import get_user, start_web_session
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("runner")]


def read_line(ws: ClientConnection, line: bytes) -> None:
    pattern = re.compile(rb"[\r\n]" + re.escape(line) + rb"\r\n")
    seen = b""
    while not pattern.search(seen):
        frame = ws.recv(timeout=20)
        assert isinstance(frame, bytes), frame  # output is binary
        seen += frame


def test_browser_style_terminal_over_tls(live: LiveServer, engine: Engine, alice: Account) -> None:
    base = live.url.rstrip("/")
    tls = ssl.create_default_context(cafile=str(live.ca_file))
    with httpx.Client(base_url=base, verify=tls, headers=alice.headers) as http:
        project = http.post("/api/v1/projects", json={"name": "demo", "template": "python-starter"})
        assert project.status_code == 201, project.text
        sessions = f"/api/v1/projects/alice/{project.json()['slug']}/sessions"
        session = http.post(sessions, json={"editor": "terminal"}).json()
        assert session["state"] == "running", session
        with transaction(make_sessionmaker(engine)) as db:
            token = start_web_session(db, get_user(db, "alice"), timedelta(hours=1)).token

        url = base.replace("https://", "wss://") + f"{sessions}/{session['id']}/terminal"
        cookie = {"Cookie": f"__Host-kiln_session={token}"}

        # A page on another site cannot use the victim's cookie: refused at the handshake.
        with pytest.raises(InvalidStatus) as caught:
            connect(url, ssl=tls, additional_headers=cookie, origin=Origin("https://evil.example"))
        assert caught.value.response.status_code == 403

        with connect(url, ssl=tls, additional_headers=cookie, origin=Origin(base)) as ws:
            ws.send(b"echo hello\n")
            read_line(ws, b"hello")
        # The terminal is gone, the session is not.
        again = http.get(f"{sessions}/{session['id']}").json()
        assert again["state"] == "running"
        assert http.delete(f"{sessions}/{session['id']}").json()["state"] == "stopped"
