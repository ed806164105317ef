"""Applications end to end: a real runner runs real apps (Flask) from a project in sandboxes,
a real HTTPS server proxies them on their own subdomains, and the test walks in as browsers
do — signed in through the hand-off, as other people, and as nobody."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

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

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("runner"),
    pytest.mark.one_database,
]


@pytest.fixture
def site(live: LiveServer) -> Site:
    return site_for(live)


@pytest.fixture
def flask_app(site: Site, alice: Account) -> Iterator[tuple[str, dict[str, Any]]]:
    """alice's project ``shop`` with a running Flask application at ``hello-flask``."""
    with site.api(alice) as http:
        project = make_project(http, "shop", {"flask_app.py": app_file("flask_app.py")})
        create_app(http, project, name="hello", subdomain="hello-flask", script="flask_app.py")
        app = wait_state(http, project, "hello", "running")
        yield project, app
        http.post(f"{project}/applications/hello/stop")


def test_a_flask_app_serves_its_signed_in_user(
    site: Site, alice: Account, flask_app: tuple[str, dict[str, Any]]
) -> None:
    project, app = flask_app
    assert app["url"] == f"https://hello-flask.kiln.localhost:{site.port}/"
    messages = [e["message"] for e in app["instance"]["timeline"]]
    assert messages[-1] == "the app answers: serving", messages
    cookies = site.sign_in(alice, f"{project}/applications/hello/open")

    # The user is whom Kiln says, whatever the browser claims; Kiln's cookies stay behind.
    seen = site.on(
        "hello-flask",
        "GET",
        "/",
        {**cookies, "__Host-kiln_session": "ui-cookie", "mine": "1"},
        headers={"Remote-User": "root", "Remote_Email": "root@evil", "X-Forwarded-For": "6.6.6.6"},
    )
    assert seen.status_code == 200, seen.text
    body = seen.json()
    assert body["user"] == "alice" and body["email"] in (None, "")
    assert body["cookies"] == {"mine": "1"}
    assert body["url"] == f"https://hello-flask.kiln.localhost:{site.port}/"  # X-Forwarded-*
    assert body["remote_addr"] == "127.0.0.1"
    assert "root" not in json.dumps(body["headers"]) and "6.6.6.6" not in json.dumps(body)

    # Without the cookie: sent to sign in on Kiln's UI, and back to the same path.
    anonymous = site.on("hello-flask", "GET", "/stream?mb=1")
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == (
        f"https://localhost:{site.port}/open/hello-flask?next=%2Fstream%3Fmb%3D1"
    )
    assert site.on("hello-flask", "POST", "/upload", content=b"x").status_code == 401


def test_streams_cross_the_proxy_without_buffering(
    site: Site, alice: Account, flask_app: tuple[str, dict[str, Any]]
) -> None:
    project, _ = flask_app
    cookies = site.sign_in(alice, f"{project}/applications/hello/open")
    headers = {
        "Host": site.host("hello-flask"),
        "Cookie": f"{ACCESS_COOKIE}={cookies[ACCESS_COOKIE]}",
    }
    with httpx.Client(verify=site.tls, timeout=60) as http:
        # A download far larger than any buffer, counted as it arrives.
        with http.stream("GET", f"{site.base}/stream?mb=256", headers=headers) as response:
            assert response.status_code == 200
            total = sum(len(chunk) for chunk in response.iter_raw())
        assert total == 256 * 1024 * 1024
        # Server-sent events arrive one by one, not when the answer ends.
        arrivals = []
        with http.stream("GET", f"{site.base}/events?gap=0.7", headers=headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 3 and arrivals[1] - arrivals[0] > 0.4, arrivals
        # An upload streamed in (chunked, no Content-Length), hashed by the app.
        blob = bytes(range(256)) * 40_000

        def parts() -> Iterator[bytes]:
            for start in range(0, len(blob), 1 << 20):
                yield blob[start : start + (1 << 20)]

        upload = http.post(f"{site.base}/upload", headers=headers, content=parts())
        assert upload.status_code == 200, upload.text
        assert upload.json()["size"] == len(blob)


def test_app_cookies_pass_host_only_and_never_as_kiln(
    site: Site, alice: Account, flask_app: tuple[str, dict[str, Any]]
) -> None:
    project, _ = flask_app
    cookies = site.sign_in(alice, f"{project}/applications/hello/open")
    answer = site.on("hello-flask", "GET", "/cookies?domain=.kiln.localhost", cookies)
    assert answer.status_code == 200
    set_cookies = answer.headers.get_list("set-cookie")
    assert any(c.startswith("app_session=mine;") and "HttpOnly" in c for c in set_cookies)
    tossed = next(c for c in set_cookies if c.startswith("tossed="))
    assert "domain" not in tossed.lower(), tossed  # host-only: siblings never get it
    assert not any("kiln" in c.split("=", 1)[0].lower() for c in set_cookies), set_cookies


def test_who_may_open_it(
    site: Site,
    alice: Account,
    bob: Account,
    make_user: Any,
    flask_app: tuple[str, dict[str, Any]],
) -> None:
    project, _ = flask_app
    carol = make_user("carol")
    with site.api(alice) as http:
        shared = http.put(f"{project}/collaborators/bob", json={"role": "viewer"})
        assert shared.status_code == 200, shared.text
    cookies = site.sign_in(bob, f"{project}/applications/hello/open")  # a viewer may
    assert site.on("hello-flask", "GET", "/", cookies).json()["user"] == "bob"

    # A stranger learns nothing: the API says no such project, and no hand-off exists.
    with site.api(carol) as http:
        assert http.get(f"{project}/applications/hello/open").status_code == 404
        assert http.get("/open/hello-flask").status_code == 404
        mine = http.get("/api/v1/applications").json()
        assert mine == []

    # bob removed: his cookie stops working within seconds (a 404 page, not the app).
    with site.api(alice) as http:
        assert http.delete(f"{project}/collaborators/bob").status_code == 204

    def refused() -> bool:
        answer = site.on("hello-flask", "GET", "/", cookies)
        return answer.status_code == 404 and "Hello" not in answer.text

    wait_for(refused, timeout=10, what="bob's access to end")


def test_the_site_list_and_the_logs(
    site: Site, alice: Account, flask_app: tuple[str, dict[str, Any]]
) -> None:
    project, _ = flask_app
    with site.api(alice) as http:
        listed = http.get("/api/v1/applications").json()
        assert [(a["name"], a["state"], a["project"]) for a in listed] == [
            ("hello", "running", "alice/shop")
        ]
        # Its resources: what it may use, and the memory its instance holds now.
        one = http.get(f"{project}/applications/hello").json()
        assert one["memory_bytes"] == 2 * 1024**3 and one["cpu"] == 1
        assert 5 * 1024**2 < one["memory_used_bytes"] < one["memory_bytes"], one
        assert listed[0]["memory_used_bytes"] is None  # lists do not ask the runner
        logs = http.get(f"{project}/applications/hello/logs")
        assert logs.status_code == 200 and "Running on http://127.0.0.1:8100" in logs.text
