"""An application's life with a real runner: updates and restarts that never drop a request,
stop and start, crashes with back-off until it shows as crash-looping, apps that never
answer or answer on the wrong port, quotas, public applications and the site's setting, and
a runner restart that the app does not notice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.settings import Settings
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
from tests.integration.test_sessions_support import RunnerHandle, runner  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("runner")]

CRASHES = 'print("boom: DATABASE_URL is not set", flush=True)\nraise SystemExit(3)\n'
NEVER_LISTENS = 'import time\nprint("warming up the model", flush=True)\ntime.sleep(3600)\n'
WRONG_PORT = (
    "import http.server\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', 8200), "
    "http.server.SimpleHTTPRequestHandler).serve_forever()\n"
)


@pytest.fixture
def site(live: LiveServer) -> Site:
    return site_for(live)


@pytest.fixture
def shop(site: Site, alice: Account) -> Iterator[str]:
    """alice's project with every test app in it."""
    files = {
        "flask_app.py": app_file("flask_app.py"),
        "crash.py": CRASHES,
        "never.py": NEVER_LISTENS,
        "wrong_port.py": WRONG_PORT,
    }
    with site.api(alice) as http:
        project = make_project(http, "shop", files)
        yield project
        for app in http.get(f"{project}/applications").json():
            http.post(f"{project}/applications/{app['name']}/stop")


def test_updates_and_restarts_never_drop_a_request(site: Site, alice: Account, shop: str) -> None:
    with site.api(alice) as http:
        create_app(
            http,
            shop,
            name="web",
            subdomain="web",
            script="flask_app.py",
            env={"APP_VERSION": "1"},
        )
        first = wait_state(http, shop, "web", "running")
    cookies = site.sign_in(alice, f"{shop}/applications/web/open")
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            answer = site.on("web", "GET", "/", cookies, timeout=30)
            version = answer.json()["version"] if answer.status_code == 200 else answer.text
            seen.append((answer.status_code, version))
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        with site.api(alice) as http:
            changed = http.patch(f"{shop}/applications/web", json={"env": {"APP_VERSION": "2"}})
            assert changed.status_code == 200, changed.text
            assert changed.json()["restarting"] is True
            wait_for(lambda: seen and seen[-1] == (200, "2"), 90, "version 2 to serve")
            after_update = wait_state(http, shop, "web", "running")
            assert after_update["instance"]["id"] != first["instance"]["id"]
            restarted = http.post(f"{shop}/applications/web/restart")
            assert restarted.status_code == 200 and restarted.json()["restarting"] is True

            def replaced() -> bool:
                body = http.get(f"{shop}/applications/web").json()
                return body["instance"]["id"] != after_update["instance"]["id"] and (
                    not body["restarting"]
                )

            wait_for(replaced, 90, "the restart to take over")
            time.sleep(0.5)
    finally:
        done.set()
        asker.join()
    assert {status for status, _ in seen} == {200}, [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v in seen]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # once switched, never back to the old instance


def test_stop_and_start(site: Site, alice: Account, shop: str) -> None:
    with site.api(alice) as http:
        create_app(http, shop, name="web", subdomain="web", script="flask_app.py")
        wait_state(http, shop, "web", "running")
        cookies = site.sign_in(alice, f"{shop}/applications/web/open")
        stopped = http.post(f"{shop}/applications/web/stop").json()
        assert stopped["state"] == "stopped" and stopped["desired"] == "stopped"
        assert stopped["instance"]["state"] == "stopped"
        page = site.on("web", "GET", "/", cookies)
        assert page.status_code == 503 and "Application stopped" in page.text
        assert "stopped by alice" in page.text and 'http-equiv="refresh"' not in page.text
        started = http.post(f"{shop}/applications/web/start").json()
        assert started["state"] == "starting"
        starting = site.on("web", "GET", "/", cookies)
        if starting.status_code == 503:  # before it answers: a page that looks again
            assert 'http-equiv="refresh"' in starting.text
        wait_state(http, shop, "web", "running")
        assert site.on("web", "GET", "/", cookies).json()["user"] == "alice"


def test_a_crashing_app_backs_off_and_shows_why(site: Site, alice: Account, shop: str) -> None:
    with site.api(alice) as http:
        create_app(http, shop, name="web", subdomain="web", script="flask_app.py")
        create_app(http, shop, name="broken", subdomain="broken", script="crash.py")
        wait_state(http, shop, "web", "running")
        looping = wait_state(http, shop, "broken", "crash-looping", timeout=120)
    assert looping["crashes"] >= 3
    assert "exited with code 3" in looping["message"], looping["message"]
    assert "boom: DATABASE_URL is not set" in looping["last_output"]
    assert looping["restart_at"] is not None
    cookies = site.sign_in(alice, f"{shop}/applications/broken/open")
    page = site.on("broken", "GET", "/", cookies)
    assert page.status_code == 503 and "crash-looping" in page.text
    # Its neighbour never noticed.
    web = site.sign_in(alice, f"{shop}/applications/web/open")
    assert site.on("web", "GET", "/", web).status_code == 200


@pytest.mark.parametrize(
    ("script", "printed"), [("never.py", "warming up the model"), ("wrong_port.py", "")]
)
def test_an_app_that_does_not_answer_fails_its_start(
    site: Site, alice: Account, shop: str, settings: Settings, script: str, printed: str
) -> None:
    settings.runner.app_start_seconds = 6
    with site.api(alice) as http:
        create_app(http, shop, name="quiet", subdomain="quiet", script=script)
        crashed = wait_state(http, shop, "quiet", "crashed", timeout=60)
    assert "did not answer on port 8100 within 6 s" in crashed["message"], crashed
    assert printed in crashed["last_output"]
    timeline = [e["message"] for e in crashed["instance"]["timeline"]]
    assert any("did not answer" in m for m in timeline), timeline


def test_applications_count_against_the_quota(
    site: Site, alice: Account, admin: Account, shop: str
) -> None:
    with site.api(admin) as http:
        quota = {"cpu": 1.5, "memory_mib": 8192}
        assert http.put("/api/v1/quotas/users/alice", json=quota).status_code == 200
    with site.api(alice) as http:
        create_app(http, shop, name="one", subdomain="one", script="flask_app.py")
        wait_state(http, shop, "one", "running")
        create_app(http, shop, name="two", subdomain="two", script="flask_app.py")
        waiting = wait_state(http, shop, "two", "waiting", timeout=30)
        assert "waiting for quota: alice uses 1 of 1.5 vCPU" in waiting["message"]
        http.post(f"{shop}/applications/one/stop")
        wait_state(http, shop, "two", "running")


def test_applications_count_against_their_teams_quota(
    site: Site, alice: Account, admin: Account
) -> None:
    """In a team's project the team's quota bounds them too, whoever created them."""
    with site.api(alice) as http:
        assert http.post("/api/v1/teams", json={"name": "lab"}).status_code == 201
    with site.api(admin) as http:
        quota = {"cpu": 1.5, "memory_mib": 8192}
        assert http.put("/api/v1/quotas/teams/lab", json=quota).status_code == 200
    with site.api(alice) as http:
        made = http.post("/api/v1/projects", json={"name": "board", "owner": "lab"})
        assert made.status_code == 201, made.text
        project = "/api/v1/projects/lab/board"
        written = http.put(f"{project}/files/flask_app.py", content=app_file("flask_app.py"))
        assert written.status_code in (200, 201), written.text
        create_app(http, project, name="one", subdomain="lab-one", script="flask_app.py")
        wait_state(http, project, "one", "running")
        create_app(http, project, name="two", subdomain="lab-two", script="flask_app.py")
        waiting = wait_state(http, project, "two", "waiting", timeout=30)
        assert "waiting for quota: team lab uses 1 of 1.5 vCPU" in waiting["message"]
        http.post(f"{project}/applications/one/stop")
        wait_state(http, project, "two", "running")
        http.post(f"{project}/applications/two/stop")


def test_public_applications_follow_the_site_setting(
    site: Site, alice: Account, admin: Account, shop: str
) -> None:
    with site.api(alice) as http:
        create_app(http, shop, name="web", subdomain="open-web", script="flask_app.py", public=True)
        app = wait_state(http, shop, "web", "running")
    assert app["public"] is True and app["reachable_publicly"] is False
    assert site.on("open-web", "GET", "/").status_code == 303  # off by default: sign in

    with site.api(admin) as http:
        on = http.patch("/api/v1/site-settings", json={"public_applications": True})
        assert on.status_code == 200 and on.json() == {"public_applications": True}

    def anonymous_ok() -> bool:
        answer = site.on("open-web", "GET", "/")
        return answer.status_code == 200 and answer.json()["user"] is None

    wait_for(anonymous_ok, 10, "the public application to answer anyone")
    # A cross-site POST rides no identity: anonymous, like any other visitor.
    cookies = site.sign_in(alice, f"{shop}/applications/web/open")
    posted = site.on(
        "open-web",
        "POST",
        "/upload",
        cookies,
        content=b"abc",
        headers={"Origin": "https://evil.example"},
    )
    assert posted.status_code == 200 and posted.json()["size"] == 3

    with site.api(admin) as http:
        assert http.patch("/api/v1/site-settings", json={"public_applications": False}).is_success
    wait_for(lambda: site.on("open-web", "GET", "/").status_code == 303, 10, "it to go private")
    assert site.on("open-web", "GET", "/", cookies).json()["user"] == "alice"  # signed in: yes


def test_a_runner_restart_goes_unnoticed(
    site: Site,
    alice: Account,
    shop: str,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    with site.api(alice) as http:
        create_app(http, shop, name="web", subdomain="web", script="flask_app.py")
        before = wait_state(http, shop, "web", "running")
    cookies = site.sign_in(alice, f"{shop}/applications/web/open")
    pid = site.on("web", "GET", "/", cookies).json()["pid"]
    runner.stop()
    assert site.on("web", "GET", "/", cookies).json()["pid"] == pid  # served without a runner
    runner.start_again()
    time.sleep(3)  # a few reconciler passes
    with site.api(alice) as http:
        after: dict[str, Any] = http.get(f"{shop}/applications/web").json()
    assert after["state"] == "running" and after["instance"]["id"] == before["instance"]["id"]
    assert site.on("web", "GET", "/", cookies).json()["pid"] == pid
