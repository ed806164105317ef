"""The content proxy under attack and under load, with real apps in real sandboxes: signing
out of Kiln (or revoking the API key) ends access on the app's origin; a WebSocket carries
Kiln's ``Remote-User``, never the client's, and one from another origin never acts as the
user; a 10 GB answer streams through with the web tier's memory flat; slow-loris clients
and header floods are cut off while other apps stay reachable."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from kiln.apps import listener
from kiln.domain.session_access import ACCESS_COOKIE
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.apps_support import (
    Site,
    app_file,
    create_app,
    make_project,
    site_for,
    wait_for,
    wait_state,
)
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("runner")]


def rss_mb() -> float:
    """This process's resident memory (the live web tier runs in it)."""
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def site(live: LiveServer) -> Site:
    return site_for(live)


@pytest.fixture
def apps(site: Site, alice: Account) -> Iterator[str]:
    """alice's project with a Flask app (``web``) and a WebSocket echo (``echo``) running."""
    files = {"flask_app.py": app_file("flask_app.py"), "ws_echo.py": app_file("ws_echo.py")}
    with site.api(alice) as http:
        project = make_project(http, "shop", files)
        create_app(http, project, name="web", subdomain="web", script="flask_app.py")
        create_app(http, project, name="echo", subdomain="echo", script="ws_echo.py")
        wait_state(http, project, "web", "running")
        wait_state(http, project, "echo", "running")
        yield project
        for name in ("web", "echo"):
            http.post(f"{project}/applications/{name}/stop")


def test_signing_out_of_kiln_ends_access_on_the_apps_origin(
    site: Site, alice: Account, apps: str
) -> None:
    with site.api() as browser:
        login = browser.post(
            "/api/v1/auth/login",
            json={"username": "alice", "password": alice.password},
            headers={"Origin": site.base},
        )
        assert login.status_code == 200, login.text
        csrf = login.json()["csrf_token"]
        handed = browser.get("/open/web", follow_redirects=False)
        assert handed.status_code == 303, handed.text
        location = handed.headers["location"]
        path = location.split("kiln.localhost", 1)[1].split("/", 1)[1]
        answer = site.on("web", "GET", f"/{path}")
        cookie = {ACCESS_COOKIE: answer.cookies[ACCESS_COOKIE]}
        assert site.on("web", "GET", "/", cookie).json()["user"] == "alice"
        out = browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 204
    wait_for(lambda: site.on("web", "GET", "/", cookie).status_code == 303, 10, "sign-out")
    assert "/open/web" in site.on("web", "GET", "/", cookie).headers["location"]


def test_revoking_the_api_key_ends_the_access_it_opened(
    site: Site, alice: Account, apps: str
) -> None:
    with site.api(alice) as http:
        key = http.post("/api/v1/auth/api-keys", json={"name": "temporary"}).json()
    temporary = Account("alice", alice.password, key["key"])
    cookies = site.sign_in(temporary, f"{apps}/applications/web/open")
    assert site.on("web", "GET", "/", cookies).json()["user"] == "alice"
    with site.api(alice) as http:
        assert http.delete(f"/api/v1/auth/api-keys/{key['id']}").status_code == 204
    wait_for(lambda: site.on("web", "GET", "/", cookies).status_code == 303, 10, "revocation")


def test_websockets_carry_kilns_identity_only(site: Site, alice: Account, apps: str) -> None:
    cookies = site.sign_in(alice, f"{apps}/applications/echo/open")
    with site.websocket("echo", "/", cookies) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=10) == b"\x00\x01binary"
        ws.send("whoami")
        assert ws.recv(timeout=10) == "alice"
    # Another origin's page cannot ride alice's cookie: a private app refuses it.
    with pytest.raises(InvalidStatus) as refused:
        site.websocket("echo", "/", cookies, origin="https://web.kiln.localhost").close()
    assert refused.value.response.status_code == 403
    # No cookie at all: refused too (private); the hand-off is for browsers' pages.
    with pytest.raises(InvalidStatus):
        site.websocket("echo", "/", {}).close()


@pytest.mark.one_database  # the proxy's memory, not the database's
def test_a_10_gb_answer_streams_with_flat_memory(site: Site, alice: Account, apps: str) -> None:
    cookies = site.sign_in(alice, f"{apps}/applications/web/open")
    headers = {"Host": site.host("web"), "Cookie": f"{ACCESS_COOKIE}={cookies[ACCESS_COOKIE]}"}
    echo = site.sign_in(alice, f"{apps}/applications/echo/open")
    budget = 2 * 1024**3  # read 2 GB of the 10 GB, then walk away
    received = 0
    start = rss_mb()
    peak = start
    with httpx.Client(verify=site.tls, timeout=60) as http:
        url = f"{site.base}/stream?mb={10 * 1024}"
        with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw(1024 * 1024):
                received += len(chunk)
                if received % (256 * 1024**2) < len(chunk):
                    peak = max(peak, rss_mb())
                    # Other apps answer meanwhile.
                    assert site.on("echo", "GET", "/", echo).status_code == 200
                if received >= budget:
                    break
    assert received >= budget
    growth = peak - start
    assert growth < 100, f"the web tier grew by {growth:.0f} MB while streaming"
    # The app noticed the browser leave: its stream ended, and it serves the next request.
    assert site.on("web", "GET", "/", cookies).json()["user"] == "alice"


def test_slow_and_idle_clients_cannot_exhaust_the_listener(
    site: Site, alice: Account, apps: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "HEADER_SECONDS", 2.0)
    cookies = site.sign_in(alice, f"{apps}/applications/web/open")
    tls = site.tls
    slow: list[ssl.SSLSocket] = []
    for index in range(150):
        raw = socket.create_connection(("127.0.0.1", site.port))
        conn = tls.wrap_socket(raw, server_hostname="web.kiln.localhost")
        if index % 2:  # half send a request line and stall; half send nothing at all
            conn.sendall(b"GET / HTTP/1.1\r\nHost: web.kiln.localhost\r\nX-Slow: ")
        slow.append(conn)
    started = time.monotonic()
    answer = site.on("web", "GET", "/", cookies)  # others are served meanwhile
    assert answer.status_code == 200 and time.monotonic() - started < 5
    time.sleep(3)
    closed = 0
    for conn in slow:
        conn.settimeout(5)
        try:
            data: bytes | None = conn.recv(4096)
        except TimeoutError:
            data = None  # still open: the listener kept it
        except (OSError, ssl.SSLError):
            data = b""  # reset: closed on us
        closed += data is not None and (data == b"" or data.startswith(b"HTTP/1.1 408"))
        conn.close()
    assert closed == len(slow), f"only {closed} of {len(slow)} slow connections were cut off"

    # A header flood is refused, not buffered.
    raw = socket.create_connection(("127.0.0.1", site.port))
    with tls.wrap_socket(raw, server_hostname="web.kiln.localhost") as flood:
        flood.sendall(b"GET / HTTP/1.1\r\nHost: web.kiln.localhost\r\n")
        try:
            for _ in range(40):
                flood.sendall(b"X-Flood: " + b"a" * 4000 + b"\r\n")
        except OSError:
            pass  # closed on us mid-flood: what should happen
        flood.settimeout(5)
        assert flood.recv(4096).startswith(b"HTTP/1.1 431")
    assert site.on("web", "GET", "/", cookies).status_code == 200


def test_a_client_cannot_claim_to_be_someone(site: Site, alice: Account, apps: str) -> None:
    cookies = site.sign_in(alice, f"{apps}/applications/web/open")
    spoofed: dict[str, Any] = site.on(
        "web",
        "GET",
        "/",
        cookies,
        headers={"REMOTE-USER": "admin", "Remote-Name": "The Admin", "remote_email": "a@b"},
    ).json()
    assert spoofed["user"] == "alice"
    assert "admin" not in json.dumps(spoofed["headers"]).lower().replace("alice", "")
    anonymous = site.on("web", "GET", "/", headers={"Remote-User": "admin"})
    assert anonymous.status_code == 303  # not signed in: to Kiln, whatever it claims
