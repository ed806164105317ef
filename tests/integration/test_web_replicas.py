"""Two `kiln web` processes behind one port (a round-robin TCP balancer, as a Service spreads
connections over the chart's web replicas): they share the database and the data volumes
and nothing else, and a user cannot tell which one answered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from kiln.bootstrap import prepare_data_dir
from kiln.db.engine import make_sessionmaker, transaction
from kiln.domain.identity import create_user
from kiln.pki.ca import CertificateAuthority, web_server_names
from kiln.settings import Settings
from kiln.testing.live import free_port

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


@pytest.fixture
def replicas(tmp_path: Path, db_url: str, engine: Engine) -> Iterator[tuple[RoundRobin, Path]]:
    data = tmp_path / "data"
    settings = Settings(env="test", data_dir=data, database_url=db_url, secret_key="k" * 32)
    prepare_data_dir(settings)
    with transaction(make_sessionmaker(engine)) as db:  # migrated; emptied after the test
        create_user(db, "carol", PASSWORD)
    CertificateAuthority(settings.pki_dir).ensure_leaf(
        "web-server", web_server_names(settings.domain)
    )  # made once, before the replicas start (in a cluster: delivered by kiln pki)
    ports = [free_port(), free_port()]
    env = dict(os.environ, KILN_DATABASE_URL=db_url, KILN_SECRET_KEY="k" * 32, KILN_ENV="test")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "web",
                "--data-dir",
                str(data),
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
