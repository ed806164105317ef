"""JupyterLab sessions end to end: a real runner starts JupyterLab from the built-in runtime in
a sandbox, a real HTTPS server (uvicorn) proxies it on the session's own origin
``<id>.kiln.localhost``, and the test walks in as a browser does — the UI's "Open
JupyterLab" link, the hand-off, /lab, the Jupyter API, a kernel over WebSocket running 1+1 —
and as people who must not get in."""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import Engine, select
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from kiln.db.engine import make_sessionmaker
from kiln.db.models import Project, User
from kiln.db.workload_models import SessionHandoff, Workload
from kiln.domain import session_access
from kiln.runtimes.catalog import builtin_runtime
from kiln.storage.git import run_git
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.test_sessions_support import runner, wait_for  # noqa: F401  (fixture)

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("runner")]

if "jupyterlab" not in builtin_runtime().editors:  # pragma: no cover - a broken install
    pytest.skip("NOTICE: jupyterlab is not installed beside Kiln", allow_module_level=True)


@dataclass
class Site:
    """The live server, seen from the test as a browser would (with explicit Host headers:
    ``*.kiln.localhost`` resolves to the loopback in browsers, not in this resolver)."""

    live: LiveServer
    tls: ssl.SSLContext

    @property
    def port(self) -> int:
        return int(self.live.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def base(self) -> str:
        return self.live.url.rstrip("/")

    def api(self, who: Account) -> httpx.Client:
        return httpx.Client(base_url=self.base, verify=self.tls, headers=who.headers, timeout=30)

    def host(self, session_id: str) -> str:
        return f"{session_id}.kiln.localhost:{self.port}"

    def origin(self, session_id: str) -> str:
        return f"https://{self.host(session_id)}"

    def on_session(
        self, session_id: str, method: str, path: str, cookies: dict[str, str], **kw: Any
    ) -> httpx.Response:
        headers = {"Host": self.host(session_id), **kw.pop("headers", {})}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        with httpx.Client(verify=self.tls, timeout=30) as http:
            return http.request(method, f"{self.base}{path}", headers=headers, **kw)

    def websocket(
        self, session_id: str, path: str, cookies: dict[str, str], origin: str | None = None
    ) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", self.port))
        return connect(
            f"wss://{self.host(session_id)}{path}",
            sock=sock,
            ssl=self.tls,
            additional_headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())},
            origin=Origin(origin or self.origin(session_id)),
            open_timeout=20,
        )


@pytest.fixture
def site(live: LiveServer) -> Site:
    return Site(live, ssl.create_default_context(cafile=str(live.ca_file)))


@pytest.fixture
def jupyter(site: Site, alice: Account) -> Iterator[dict[str, Any]]:
    """A running JupyterLab session of alice's project ``demo``."""
    with site.api(alice) as http:
        made = http.post("/api/v1/projects", json={"name": "demo", "template": "python-starter"})
        assert made.status_code == 201, made.text
        sessions = "/api/v1/projects/alice/demo/sessions"
        started = http.post(sessions, json={"editor": "jupyterlab"})
        assert started.status_code == 201, started.text
        session = started.json()
        assert session["runtime"] == "builtin"
        assert session["editor_url"] == f"{sessions}/{session['id']}/open"

        def running() -> dict[str, Any] | None:
            body: dict[str, Any] = http.get(f"{sessions}/{session['id']}").json()
            assert body["state"] in ("starting", "running"), json.dumps(body, indent=1)
            return body if body["state"] == "running" else None

        session = wait_for(running, timeout=90, what="JupyterLab to answer")
        yield session
        http.delete(f"{sessions}/{session['id']}")


def hand_off(site: Site, who: Account, session: dict[str, Any]) -> str:
    """The "Open JupyterLab" link: the redirect and its token."""
    with site.api(who) as http:
        response = http.get(session["editor_url"])
    assert response.status_code == 303, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == site.origin(session["id"])
    assert location.path == session_access.AUTH_PATH
    assert response.headers["cache-control"] == "no-store"
    return parse_qs(location.query)["token"][0]


def redeem(site: Site, session_id: str, token: str) -> httpx.Response:
    return site.on_session(session_id, "GET", f"{session_access.AUTH_PATH}?token={token}", {})


def user_id(engine: Engine, username: str) -> int:
    with make_sessionmaker(engine)() as db:
        found = db.scalar(select(User.id).where(User.username == username))
        assert found is not None
        return found


def execute(ws: ClientConnection, code: str) -> str:
    """Run ``code`` on the kernel (Jupyter's JSON WebSocket protocol); its text result."""
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {"code": code, "silent": False, "allow_stdin": False},
            }
        )
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = json.loads(ws.recv(timeout=60))
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "execute_result":
            result: str = message["content"]["data"]["text/plain"]
            return result
        if message["msg_type"] == "error":
            raise AssertionError(message["content"])
    raise AssertionError(f"no result for {code!r}")


def test_lab_via_proxy(site: Site, engine: Engine, alice: Account, jupyter: dict[str, Any]) -> None:
    sid = jupyter["id"]
    messages = [e["message"] for e in jupyter["timeline"]]
    assert messages.index("sandbox started") < messages.index("jupyterlab ready"), messages
    assert any(m.startswith("waiting for jupyterlab") for m in messages), messages

    # The hand-off: a host-only, Secure, HttpOnly, Lax cookie for this origin, then /lab.
    token = hand_off(site, alice, jupyter)
    answer = redeem(site, sid, token)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/lab"
    cookie_header = answer.headers["set-cookie"]
    name, value = cookie_header.split(";", 1)[0].split("=", 1)
    assert name == session_access.ACCESS_COOKIE
    attributes = {a.strip().split("=")[0].lower() for a in cookie_header.split(";")[1:]}
    assert {"secure", "httponly", "samesite", "path"} <= attributes
    assert "domain" not in attributes and "samesite=lax" in cookie_header.lower()
    # Spent: the same link never works twice.
    again = redeem(site, sid, token)
    assert again.status_code == 403 and "already used" in again.text

    with make_sessionmaker(engine)() as db:
        before = db.get(Workload, sid).last_activity_at  # type: ignore[union-attr]
    cookies = {name: value}
    lab = site.on_session(sid, "GET", "/lab", cookies)
    assert lab.status_code == 200, lab.text[:500]
    assert "JupyterLab" in lab.text
    xsrf = lab.cookies.get("_xsrf") or ""
    assert xsrf, "JupyterLab sets its own XSRF cookie through the proxy"
    cookies["_xsrf"] = xsrf

    status = site.on_session(sid, "GET", "/api/status", cookies)
    assert status.status_code == 200 and "kernels" in status.json()
    listing = site.on_session(sid, "GET", "/api/contents", cookies).json()
    assert "README.md" in {item["name"] for item in listing["content"]}  # the project's files

    # Traffic through the proxy is activity (for the idle timeout).
    def newer() -> bool:
        with make_sessionmaker(engine)() as db:
            after = db.get(Workload, sid).last_activity_at  # type: ignore[union-attr]
        return after is not None and (before is None or after > before)

    wait_for(newer, what="last_activity_at to move")

    # A kernel, created through the API (with JupyterLab's XSRF token) and run over WebSocket.
    created = site.on_session(
        sid,
        "POST",
        "/api/kernels",
        cookies,
        json={"name": "python3"},
        headers={"X-XSRFToken": xsrf, "Origin": site.origin(sid)},
    )
    assert created.status_code == 201, created.text
    kernel = created.json()["id"]
    with site.websocket(sid, f"/api/kernels/{kernel}/channels", cookies) as ws:
        assert execute(ws, "1+1") == "2"
        # Notebooks run on the runtime's one interpreter: the terminal's and the jobs' python.
        here = execute(ws, "import sys; sys.prefix, sys.executable")
        assert here in {f"('/opt/kiln', '/opt/kiln/bin/{n}')" for n in ("python", "python3")}

    # A page of another origin cannot use the cookie: not for the API, not for a WebSocket.
    foreign = site.on_session(
        sid,
        "POST",
        "/api/kernels",
        cookies,
        json={},
        headers={"X-XSRFToken": xsrf, "Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        site.websocket(sid, f"/api/kernels/{kernel}/channels", cookies, "https://evil.example")
    assert refused.value.response.status_code == 403

    # Once the session is stopped, its origin says so instead of proxying.
    with site.api(alice) as http:
        stopped = http.delete(f"/api/v1/projects/alice/demo/sessions/{sid}")
        # 409 when the runner's reconciler recorded the end first.
        assert stopped.status_code in (200, 409), stopped.text
        after = http.get(f"/api/v1/projects/alice/demo/sessions/{sid}").json()
    assert after["state"] == "stopped", after
    gone = site.on_session(sid, "GET", "/lab", cookies)
    assert gone.status_code == 409 and "stopped" in gone.text

    # JupyterLab, a kernel and IPython ran: none of their state is in the project's files.
    with make_sessionmaker(engine)() as db:
        project_id = db.scalar(select(Project.id).where(Project.slug == "demo"))
    files = site.live.settings.projects_dir / str(project_id)
    assert sorted(p.name for p in files.iterdir()) == [
        ".git",
        ".gitignore",
        "README.md",
        "main.py",
        "requirements.txt",
    ]
    assert run_git(files, "status", "--porcelain").stdout == b""


def test_lab_refusals(
    site: Site,
    engine: Engine,
    alice: Account,
    bob: Account,
    make_user: Any,
    jupyter: dict[str, Any],
) -> None:
    sid, secret = jupyter["id"], site.live.settings.secret
    carol = make_user("carol")
    with site.api(alice) as http:
        shared = http.put(
            "/api/v1/projects/alice/demo/collaborators/carol", json={"role": "viewer"}
        )
        assert shared.status_code == 200, shared.text

    # At the hand-off, on the UI's origin: bob cannot see the project, carol may only view.
    with site.api(bob) as http:
        assert http.get(jupyter["editor_url"]).status_code == 404
    with site.api(carol) as http:
        assert http.get(jupyter["editor_url"]).status_code == 403

    def refused(response: httpx.Response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in response.text
        assert "jupyter" not in response.text.lower()  # a Kiln page, nothing proxied

    # On the session's origin: no cookie, a forged one, one signed for someone else.
    refused(site.on_session(sid, "GET", "/lab", {}), 403, "no access to it yet")
    alice_id, bob_id = user_id(engine, "alice"), user_id(engine, "bob")
    now = time.time()
    good = session_access.access_cookie(secret, sid, alice_id, now, 3600)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    refused(
        site.on_session(sid, "GET", "/lab", {session_access.ACCESS_COOKIE: forged}),
        403,
        "signature",
    )
    for_bob = session_access.access_cookie(secret, sid, bob_id, now, 3600)
    refused(
        site.on_session(sid, "GET", "/lab", {session_access.ACCESS_COOKIE: for_bob}),
        404,
        "no session",
    )
    carol_cookie = session_access.access_cookie(secret, sid, user_id(engine, "carol"), now, 3600)
    refused(
        site.on_session(sid, "GET", "/api/status", {session_access.ACCESS_COOKIE: carol_cookie}),
        403,
        "contributor",
    )
    # Alice's own cookie for this session opens no other session's origin.
    other = "0123456789abcdef"
    refused(
        site.on_session(other, "GET", "/lab", {session_access.ACCESS_COOKIE: good}),
        403,
        "another session",
    )
    with pytest.raises(InvalidStatus) as no_cookie:
        site.websocket(sid, "/api/kernels/x/channels", {})
    assert no_cookie.value.response.status_code == 403

    # Tokens: forged, expired, for another session, for a stranger.
    token = session_access.handoff_token(secret, sid, alice_id, now)
    refused(redeem(site, sid, token[:-3] + "xyz"), 403, "signature")
    expired = session_access.handoff_token(secret, sid, alice_id, now - 3600)
    refused(redeem(site, sid, expired), 403, "expired")
    refused(redeem(site, other, token), 403, "another session")
    refused(redeem(site, sid, "not-a-token"), 403, "malformed")
    refused(redeem(site, sid, ""), 403, "malformed")
    stranger = session_access.handoff_token(secret, sid, bob_id, now)
    refused(redeem(site, sid, stranger), 404, "no session")
    # None of these set a cookie; the expired token's nonce is purged, a used one is kept.
    with make_sessionmaker(engine)() as db:
        kept = db.scalars(select(SessionHandoff.expires_at)).all()
    assert all(at.timestamp() > now for at in kept)
