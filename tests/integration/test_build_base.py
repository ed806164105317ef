"""Kiln's base image on a fresh site: the builder makes it in the background on its first start
(the first build waits, saying so), or `kiln runtimes build-base` makes it on demand with
progress; either way it is pushed as runtimes/python:3.11 and becomes a catalog runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.builder import base
from kiln.builder.process import start_builder
from kiln.db.engine import make_sessionmaker
from kiln.db.workload_models import Runtime
from kiln.pki.ca import CertificateAuthority
from kiln.settings import Settings
from kiln.testing import docker_registry as peer
from kiln.testing.base_image import base_archive, base_cache_dir
from tests.conftest import Account
from tests.integration.build_support import (
    build_log,
    start_build,
    use_registry,
    wait_build,
)
from tests.integration.test_sessions_support import make_project

pytestmark = pytest.mark.slow


@pytest.fixture
def empty_registry(tmp_path: Path) -> Iterator[peer.RunningRegistry]:
    if not peer.available():
        pytest.skip("NOTICE: docker-registry is not installed (make test installs it)")
    base_archive()  # made once into the tools cache (make base-image)
    with peer.docker_registry(tmp_path / "registry", CertificateAuthority(tmp_path / "rca")) as r:
        yield r


def catalog(engine: Engine) -> list[str]:
    with make_sessionmaker(engine)() as db:
        return list(db.scalars(select(Runtime.name)))


def test_first_start_makes_the_base_and_the_first_build_waits_for_it(
    client: TestClient,
    alice: Account,
    settings: Settings,
    engine: Engine,
    empty_registry: peer.RunningRegistry,
    shared_runtimes: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_registry(settings, empty_registry, shared_runtimes)
    settings.builder.base_cache_dir = base_cache_dir()
    # The base comes from the tools cache in seconds: hold it until the build is seen
    # waiting for it, so the test does not depend on which is faster.
    gate = threading.Event()
    real_publish = base.publish_base

    def held_publish(*args: Any, **kwargs: Any) -> str:
        assert gate.wait(120), "the build never waited for the base"
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(base, "publish_base", held_publish)
    project = make_project(client, alice)
    running = start_builder(settings, port=0)
    settings.builder.port = running.port
    try:
        number = start_build(client, project, alice)["number"]
        deadline = time.monotonic() + 60
        while "waiting for the base image runtimes/python:3.11" not in build_log(
            client, project, alice, number
        ):
            assert time.monotonic() < deadline, build_log(client, project, alice, number)
            time.sleep(0.2)
        gate.set()
        build = wait_build(client, project, alice, number)
        assert build["state"] == "succeeded", build
        assert running.builder.bases.error is None
    finally:
        gate.set()
        running.stop(grace=1)
    assert "python3.11" in catalog(engine)


def test_build_base_command_shows_progress_and_adds_the_runtime(
    settings: Settings,
    engine: Engine,
    empty_registry: peer.RunningRegistry,
    shared_runtimes: Path,
) -> None:
    use_registry(settings, empty_registry, shared_runtimes)
    env = dict(
        os.environ,
        KILN_DATABASE_URL=settings.db_url,
        KILN_SECRET_KEY="x" * 32,
        KILN_BUILDER_REGISTRY_URL=empty_registry.url,
        KILN_BUILDER_REGISTRY_USERNAME=empty_registry.username,
        KILN_BUILDER_REGISTRY_PASSWORD=empty_registry.password,
        KILN_BUILDER_REGISTRY_CA_FILE=str(empty_registry.ca_file),
        KILN_BUILDER_BASE_CACHE_DIR=str(base_cache_dir()),
    )
    data = ["--data-dir", str(settings.data_dir)]
    cli = [sys.executable, "-m", "kiln.cli.main", "runtimes"]
    made = subprocess.run(
        [*cli, "build-base", *data], env=env, capture_output=True, text=True, timeout=280
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "base image found in the cache" in made.stdout
    assert "pushing it to" in made.stdout
    assert "base image runtimes/python:3.11 ready: sha256:" in made.stdout
    listed = subprocess.run(
        [*cli, "list", "--json", *data], env=env, capture_output=True, text=True, timeout=60
    )
    runtimes = {r["name"]: r for r in json.loads(listed.stdout)}
    assert runtimes["python3.11"]["python"] == "3.11"
    # Once there, the registry's base is found at once by the next run.
    again = subprocess.run(
        [*cli, "build-base", *data], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "adding runtime" not in again.stdout
