"""Two `kiln web` processes behind one port (a round-robin TCP balancer, as a Service spreads
connections over the chart's web replicas): they share the database and the data volumes
and nothing else, and a user cannot tell which one answered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from websockets.sync.client import connect
from websockets.typing import Origin

from kiln.bootstrap import prepare_data_dir
from kiln.db.engine import make_sessionmaker, transaction
from kiln.domain.identity import create_user
from kiln.pki.ca import CertificateAuthority, web_server_names
from kiln.settings import Settings
from kiln.testing.live import free_port
from tests.integration.test_sessions_live import read_line
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
PASSWORD = "correct-horse-battery"


class RoundRobin:
    """A TCP balancer on one port: each new connection goes to the next backend."""

    def __init__(self, backends: list[int]) -> None:
        self.backends, self.port, self.count = backends, free_port(), 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        ready.set()
        self.loop.run_until_complete(server.serve_forever())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self.backends[self.count % len(self.backends)]
        self.count += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.contextmanager
def web_replicas(settings: Settings, count: int = 2) -> Iterator[tuple[RoundRobin, Path]]:
    """``count`` ``kiln web`` processes on one data directory and database (and the runner
    ``settings.runner.port`` names, if any), behind one round-robin port."""
    CertificateAuthority(settings.pki_dir).ensure_leaf(
        "web-server", web_server_names(settings.domain)
    )  # made once, before the replicas start (in a cluster: delivered by kiln pki)
    ports = [free_port() for _ in range(count)]
    env = dict(
        os.environ,
        KILN_DATABASE_URL=str(settings.database_url),
        KILN_SECRET_KEY=str(settings.secret_key),
        KILN_ENV="test",
        KILN_RUNNER_PORT=str(settings.runner.port),
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "web",
                "--data-dir",
                str(settings.data_dir),
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"https://127.0.0.1:{port}/api/v1/auth/me", verify=False)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "a web replica did not start"
                    time.sleep(0.2)
        yield RoundRobin(ports), settings.pki_dir / "ca.crt"
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture
def replicas(settings: Settings, engine: Engine) -> Iterator[tuple[RoundRobin, Path]]:
    prepare_data_dir(settings)
    with transaction(make_sessionmaker(engine)) as db:  # migrated; emptied after the test
        create_user(db, "carol", PASSWORD)
    with web_replicas(settings) as replicas:
        yield replicas


def test_a_login_on_one_replica_works_on_the_other(replicas: tuple[RoundRobin, Path]) -> None:
    balancer, ca = replicas
    base = f"https://localhost:{balancer.port}"
    # A new connection per request: the balancer alternates between the replicas.
    login = httpx.post(
        f"{base}/api/v1/auth/login",
        json={"username": "carol", "password": PASSWORD},
        verify=str(ca),
    )
    assert login.status_code == 200, login.text
    cookies = login.cookies
    csrf = login.json().get("csrf_token", "")
    for _ in range(4):
        me = httpx.get(f"{base}/api/v1/auth/me", cookies=cookies, verify=str(ca))
        assert me.status_code == 200 and me.json()["username"] == "carol"
    created = httpx.post(
        f"{base}/api/v1/projects",
        json={"name": "shared"},
        cookies=cookies,
        headers={"X-CSRF-Token": csrf, "Origin": base},
        verify=str(ca),
    )
    assert created.status_code == 201, created.text
    for _ in range(2):  # each replica lists it (one database)
        listed = httpx.get(f"{base}/api/v1/projects", cookies=cookies, verify=str(ca))
        assert [p["slug"] for p in listed.json()["items"]] == ["shared"]
    assert balancer.count >= 8


def test_failed_logins_count_across_replicas(replicas: tuple[RoundRobin, Path]) -> None:
    balancer, ca = replicas
    base = f"https://localhost:{balancer.port}"
    wrong = {"username": "carol", "password": "not-the-password"}
    for _ in range(3):  # spread over both replicas by the balancer
        assert (
            httpx.post(f"{base}/api/v1/auth/login", json=wrong, verify=str(ca)).status_code == 401
        )
    right = {"username": "carol", "password": PASSWORD}
    for _ in range(2):  # whichever replica answers, it knows
        assert (
            httpx.post(f"{base}/api/v1/auth/login", json=right, verify=str(ca)).status_code == 429
        )


def test_terminals_and_sessions_work_whichever_replica_answers(
    settings: Settings,
    engine: Engine,
    runner: Any,  # noqa: F811 (the fixture)
) -> None:
    """One runner, two web replicas: a session started through one is opened, typed into
    and stopped through the other; each terminal connection may land on either."""
    prepare_data_dir(settings)
    with transaction(make_sessionmaker(engine)) as db:
        create_user(db, "carol", PASSWORD)
    with web_replicas(settings) as (balancer, ca):
        base = f"https://localhost:{balancer.port}"
        tls = ssl.create_default_context(cafile=str(ca))
        credentials = {"username": "carol", "password": PASSWORD}
        login = httpx.post(f"{base}/api/v1/auth/login", json=credentials, verify=tls)
        assert login.status_code == 200, login.text
        cookie = login.cookies.get("__Host-kiln_session")
        assert cookie
        headers = {"X-CSRF-Token": login.json()["csrf_token"], "Origin": base}
        with httpx.Client(base_url=base, verify=tls, cookies=login.cookies, headers=headers,
                          timeout=60) as http:  # fmt: skip
            project = http.post(
                "/api/v1/projects", json={"name": "term", "template": "python-starter"}
            )
            assert project.status_code == 201, project.text
            sessions = f"/api/v1/projects/carol/{project.json()['slug']}/sessions"
            session = http.post(sessions, json={"editor": "terminal"}).json()
            assert session["state"] == "running", session
            url = base.replace("https://", "wss://") + f"{sessions}/{session['id']}/terminal"
            jar = {"Cookie": f"__Host-kiln_session={cookie}"}
            before = balancer.count
            for word in (b"first", b"second"):  # two connections: one to each replica
                with connect(url, ssl=tls, origin=Origin(base), additional_headers=jar) as ws:
                    ws.send(b"echo " + word + b"-$((6*7))\n")
                    read_line(ws, word + b"-42")
            assert balancer.count - before == 2
            for _ in range(2):
                assert http.get(f"{sessions}/{session['id']}").json()["state"] == "running"
            assert http.delete(f"{sessions}/{session['id']}").json()["state"] == "stopped"


SERVE_UIS = (
    "mkdir -p /tmp/ui && echo 'accuracy 0.93' > /tmp/ui/index.html && "
    "for port in $CDSW_APP_PORT $CDSW_READONLY_PORT; do setsid nohup python -m http.server "
    "--bind 127.0.0.1 --directory /tmp/ui $port > /tmp/ui-$port.log 2>&1 < /dev/null & done; "
    "echo serving-uis\n"
)


def test_a_sessions_web_uis_answer_whichever_replica_proxies(
    settings: Settings,
    engine: Engine,
    make_user: Any,
    runner: Any,  # noqa: F811 (the fixture)
) -> None:
    """The subdomain proxy across replicas: the hand-off to ``app-<id>`` is issued by one
    replica and redeemed on the other, and the access cookie works on both (each request
    is a new connection, so they alternate)."""
    from types import SimpleNamespace

    from tests.integration.apps_support import Site, make_project, wait_for

    prepare_data_dir(settings)
    dana = make_user("dana")
    with web_replicas(settings) as (balancer, ca):
        live = SimpleNamespace(url=f"https://localhost:{balancer.port}", ca_file=ca)
        site = Site(live, ssl.create_default_context(cafile=str(ca)))  # type: ignore[arg-type]
        with site.api(dana) as http:
            project = make_project(http, "uis", {})
            session = http.post(f"{project}/sessions", json={"editor": "terminal"}).json()
            assert session["state"] == "running", session
        url = f"wss://localhost:{balancer.port}{project}/sessions/{session['id']}/terminal"
        with connect(url, ssl=site.tls, additional_headers=dana.headers) as ws:
            ws.send(SERVE_UIS.encode())
            read_line(ws, b"serving-uis")
            for label in (f"app-{session['id']}", f"read-only-{session['id']}"):
                before = balancer.count
                cookies = site.sign_in(dana, f"/open/{label}")
                assert balancer.count - before >= 2  # issued on one replica, redeemed on the other

                def page(label: str = label, cookies: dict[str, str] = cookies) -> bool:
                    return "accuracy 0.93" in site.on(label, "GET", "/", cookies).text

                wait_for(page, 30, f"{label} to answer")
                before = balancer.count
                assert page() and page()  # once through each replica
                assert balancer.count - before == 2
        with site.api(dana) as http:
            stopped = http.delete(f"{project}/sessions/{session['id']}")
            assert stopped.json()["state"] == "stopped", stopped.text
