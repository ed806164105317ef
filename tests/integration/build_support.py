"""Fixtures for tests that run real builds: Kiln's base image (from the tools cache), a real
registry peer (Debian's docker-registry, token auth) that holds it as runtimes/python:3.11,
one runtime cache shared by the session (the base is unpacked once), and a running builder."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kiln.build.base_image import BaseArchive
from kiln.build.bases import push_archive
from kiln.build.registry_client import Reference
from kiln.build.target import RegistryTarget
from kiln.builder.process import RunningBuilder, start_builder
from kiln.pki.ca import CertificateAuthority
from kiln.settings import Settings
from kiln.testing import docker_registry as peer
from kiln.testing.base_image import base_archive
from tests.conftest import Account
from tests.kiln_site import KilnSite

BASE = "runtimes/python:3.11"
ENDED = ("succeeded", "failed", "timed_out", "stopped")


@pytest.fixture(scope="session")
def kiln_base() -> BaseArchive:
    """Built by `make base-image` (or here, the first time: a minute or two)."""
    return base_archive()


@pytest.fixture(scope="session")
def build_registry(
    tmp_path_factory: pytest.TempPathFactory, kiln_base: BaseArchive
) -> Iterator[peer.RunningRegistry]:
    if not peer.available():
        pytest.skip("NOTICE: docker-registry is not installed (make test installs it)")
    work = tmp_path_factory.mktemp("registry")
    with peer.docker_registry(work, CertificateAuthority(work / "ca")) as running:
        target = registry_target(running)
        try:
            push_archive(target, kiln_base, Reference.parse(BASE), work)
        finally:
            target.close()
        yield running


@pytest.fixture
def own_registry_site(
    tmp_path: Path, db_url: str, engine: Any, kiln_base: BaseArchive, shared_runtimes: Path
) -> Iterator[KilnSite]:
    """``kiln up`` on its defaults, so builds push to Kiln's own registry; its builder takes
    the base image from the tools cache `make test` filled (no mirror needed). ``engine``
    first: the test database is made before the site starts on it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "runtimes").symlink_to(shared_runtimes)
    site = KilnSite(tmp_path, db_url, env={"KILN_BUILDER_NAME": f"own-registry-{os.getpid()}"})
    try:
        site.wait_for_output("Kiln is up")
        yield site
    finally:
        site.stop()


def registry_target(running: peer.RunningRegistry) -> RegistryTarget:
    return RegistryTarget.connect(
        running.url,
        username=running.username,
        password=running.password,
        ca_file=running.ca_file,
    )


@pytest.fixture(scope="session")
def shared_runtimes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtimes")


def use_registry(settings: Settings, running: peer.RunningRegistry, runtimes: Path) -> Settings:
    settings.builder.registry_url = running.url
    settings.builder.registry_username = running.username
    settings.builder.registry_password = running.password
    settings.builder.registry_ca_file = running.ca_file
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.runtimes_dir.exists():
        settings.runtimes_dir.symlink_to(runtimes)
    return settings


@pytest.fixture
def build_settings(
    settings: Settings, build_registry: peer.RunningRegistry, shared_runtimes: Path
) -> Settings:
    return use_registry(settings, build_registry, shared_runtimes)


@pytest.fixture
def builder(build_settings: Settings, engine: Any) -> Iterator[RunningBuilder]:
    running = start_builder(build_settings, port=0)
    build_settings.builder.port = running.port  # the web tier's client finds it there
    try:
        yield running
    finally:
        running.stop(grace=1)


def start_build(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/builds", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    build: dict[str, Any] = response.json()
    return build


def wait_build(
    client: TestClient,
    project: str,
    who: Account,
    number: int,
    until: tuple[str, ...] = ENDED,
    timeout: float = 240,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        build: dict[str, Any] = client.get(f"{project}/builds/{number}", headers=who.headers).json()
        if build["state"] in until:
            return build
        if time.monotonic() > deadline:
            raise AssertionError(f"build {number} is still {build['state']}: {build}")
        time.sleep(0.2)


def build_log(client: TestClient, project: str, who: Account, number: int) -> str:
    response = client.get(f"{project}/builds/{number}/logs", headers=who.headers)
    assert response.status_code == 200, response.text
    return response.text


def write_files(client: TestClient, project: str, who: Account, files: dict[str, str]) -> None:
    for path, text in files.items():
        response = client.put(f"{project}/files/{path}", content=text.encode(), headers=who.headers)
        assert response.status_code in (200, 201), response.text
