"""Applications outlive Kiln itself: an application keeps serving while `kiln up` is stopped
and started again (its sandbox is not Kiln's child), and afterwards the new Kiln serves the
same instance on the same address; a runner killed with ``kill -9`` is restarted by the
supervisor and finds the application as it left it."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Workload
from kiln.domain.session_access import ACCESS_COOKIE
from tests.chaos.test_kill9 import wait_for
from tests.conftest import Account
from tests.integration.apps_support import app_file
from tests.kiln_site import KilnSite

pytestmark = pytest.mark.timeout(300)

if os.geteuid() != 0:  # pragma: no cover - the runner needs root for its sandboxes
    pytest.skip("NOTICE: chaos tests need root (the runner's sandboxes)", allow_module_level=True)

APPS = "/api/v1/projects/alice/shop/applications"


def api(site: KilnSite, who: Account) -> httpx.Client:
    tls = ssl.create_default_context(cafile=site.ca_file)
    return httpx.Client(
        base_url=f"https://localhost:{site.port}", verify=tls, headers=who.headers, timeout=30
    )


def signed_in_get(site: KilnSite, who: Account, path: str = "/") -> httpx.Response:
    """Open the application as a browser does (hand-off, cookie) and GET ``path`` on it."""
    tls = ssl.create_default_context(cafile=site.ca_file)
    with api(site, who) as http:
        opened = http.get(f"{APPS}/web/open")
    assert opened.status_code == 303, opened.text
    location = urlsplit(opened.headers["location"])
    host = {"Host": location.netloc}
    base = f"https://localhost:{site.port}"
    with httpx.Client(verify=tls, timeout=30) as browser:
        answer = browser.get(f"{base}{location.path}?{location.query}", headers=host)
        assert answer.status_code == 303, answer.text
        cookie = f"{ACCESS_COOKIE}={answer.cookies[ACCESS_COOKIE]}"
        return browser.get(f"{base}{path}", headers={**host, "Cookie": cookie})


@pytest.fixture
def first_site(tmp_path: Path, db_url: str, engine: Engine) -> Iterator[KilnSite]:
    site = KilnSite(tmp_path, db_url)
    try:
        site.wait_for_output("Kiln is up")
        site.wait_for_output("runner serving gRPC")
        yield site
    finally:
        site.stop()


def test_an_application_outlives_kiln_up(
    tmp_path: Path, db_url: str, engine: Engine, alice: Account, first_site: KilnSite
) -> None:
    with api(first_site, alice) as http:
        assert http.post("/api/v1/projects", json={"name": "shop"}).status_code == 201
        written = http.put(
            "/api/v1/projects/alice/shop/files/flask_app.py", content=app_file("flask_app.py")
        )
        assert written.is_success
        body = {"name": "web", "subdomain": "web", "script": "flask_app.py"}
        assert http.post(APPS, json=body).status_code == 201
        before = wait_for(running_on(http), 90, "the application to run")
    pid = signed_in_get(first_site, alice).json()["pid"]

    # kill -9 of the runner: the supervisor restarts it; the app never noticed.
    mark = first_site.kill9("runner")
    first_site.wait_for_output("re-attached", after=mark)
    assert signed_in_get(first_site, alice).json()["pid"] == pid

    # The whole of `kiln up` stopped: the sandbox keeps serving on its own port.
    first_site.stop()
    with make_sessionmaker(engine)() as db:
        endpoint = db.scalar(
            select(Workload.endpoint).where(Workload.id == before["instance"]["id"])
        )
    assert endpoint
    direct = httpx.get(f"http://{endpoint}/", timeout=10)
    assert direct.json()["pid"] == pid

    second = KilnSite(tmp_path, db_url)
    try:
        second.wait_for_output("Kiln is up")
        second.wait_for_output("runner serving gRPC")
        with api(second, alice) as http:
            again = wait_for(running_on(http), 30, "the application as it was")
        assert again["instance"]["id"] == before["instance"]["id"]
        assert signed_in_get(second, alice).json()["pid"] == pid
        with api(second, alice) as http:
            assert http.post(f"{APPS}/web/stop").json()["state"] == "stopped"
    finally:
        second.stop()


def running_on(http: httpx.Client) -> Callable[[], dict[str, Any] | None]:
    """A probe: the application once it is running (None before, or while Kiln restarts)."""

    def look() -> dict[str, Any] | None:
        try:
            app: dict[str, Any] = http.get(f"{APPS}/web").json()
        except httpx.TransportError:
            return None
        return app if app["state"] == "running" else None

    return look
