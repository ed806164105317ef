"""Helpers for the applications tests (no tests here): a live Kiln (HTTPS, uvicorn) with a
real runner, seen the way a browser sees it — the UI's origin and one origin per label under
``kiln.localhost`` (addressed with explicit Host headers: browsers resolve ``*.localhost`` to
the loopback, this resolver does not) — and the real apps in ``tests/apps``."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from kiln.domain import session_access
from kiln.testing.live import LiveServer
from tests.conftest import Account

APPS_DIR = Path(__file__).resolve().parent.parent / "apps"
PROJECTS = "/api/v1/projects"


@dataclass
class Site:
    live: LiveServer
    tls: ssl.SSLContext

    @property
    def port(self) -> int:
        return int(self.live.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def base(self) -> str:
        return self.live.url.rstrip("/")

    def api(self, who: Account | None = None, **kw: Any) -> httpx.Client:
        headers = who.headers if who is not None else {}
        return httpx.Client(base_url=self.base, verify=self.tls, headers=headers, timeout=60, **kw)

    def host(self, label: str) -> str:
        return f"{label}.kiln.localhost:{self.port}"

    def origin(self, label: str) -> str:
        return f"https://{self.host(label)}"

    def on(
        self,
        label: str,
        method: str,
        path: str,
        cookies: dict[str, str] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        """One request to ``label``'s origin, as a browser with ``cookies`` sends it."""
        headers = {"Host": self.host(label), **kw.pop("headers", {})}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        with httpx.Client(verify=self.tls, timeout=kw.pop("timeout", 60)) as http:
            return http.request(method, f"{self.base}{path}", headers=headers, **kw)

    def websocket(
        self, label: str, path: str, cookies: dict[str, str], origin: str | None = None
    ) -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", self.port))
        return connect(
            f"wss://{self.host(label)}{path}",
            sock=sock,
            ssl=self.tls,
            additional_headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())},
            origin=Origin(origin or self.origin(label)),
            open_timeout=20,
            max_size=None,
        )

    def sign_in(self, who: Account, open_path: str) -> dict[str, str]:
        """Follow an "open" link (an API path that redirects with a hand-off token) the way
        the browser does; the access cookie for that origin."""
        with self.api(who) as http:
            response = http.get(open_path)
        assert response.status_code == 303, response.text
        location = urlsplit(response.headers["location"])
        label = location.netloc.split(".", 1)[0]
        token = parse_qs(location.query)["token"][0]
        answer = self.on(label, "GET", f"{session_access.AUTH_PATH}?{location.query}")
        assert answer.status_code == 303, answer.text
        assert token not in answer.headers["location"]
        name, value = answer.headers["set-cookie"].split(";", 1)[0].split("=", 1)
        assert name == session_access.ACCESS_COOKIE
        return {name: value}


def site_for(live: LiveServer) -> Site:
    return Site(live, ssl.create_default_context(cafile=str(live.ca_file)))


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def make_project(http: httpx.Client, name: str, files: dict[str, str | bytes]) -> str:
    """A project with ``files`` (name -> content, or a file of tests/apps by its name)."""
    made = http.post(PROJECTS, json={"name": name, "template": "python-starter"})
    assert made.status_code == 201, made.text
    path = f"{PROJECTS}/{made.json()['owner']}/{made.json()['slug']}"
    for target, content in files.items():
        data = content if isinstance(content, bytes) else content.encode()
        written = http.put(f"{path}/files/{target}", content=data)
        assert written.status_code in (200, 201), written.text
    return path


def app_file(name: str) -> bytes:
    return (APPS_DIR / name).read_bytes()


def create_app(http: httpx.Client, project: str, **fields: Any) -> dict[str, Any]:
    response = http.post(f"{project}/applications", json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_state(
    http: httpx.Client, project: str, name: str, state: str, timeout: float = 90
) -> dict[str, Any]:
    """The application once its state is ``state``."""

    def look() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"{project}/applications/{name}").json()
        return body if body["state"] == state else None

    found: dict[str, Any] = wait_for(look, timeout, f"application {name} to be {state}")
    return found
