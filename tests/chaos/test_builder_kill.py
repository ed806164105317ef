"""Chaos: ``kill -9`` of the builder under ``kiln up`` while a build runs, on SQLite and
PostgreSQL. The supervisor restarts it; the build is retried once automatically (its old
sandbox stopped and removed); a second loss fails it with the reason; the registry never
shows anything of the lost attempts."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from kiln.build.registry_client import Reference, RegistryError
from kiln.testing import docker_registry as peer
from tests.conftest import Account
from tests.integration.build_support import (
    registry_target,
)
from tests.kiln_site import KilnSite

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
MARKER = "6007"  # the sleep of this test's build script: how its processes are recognised

if os.geteuid() != 0:  # pragma: no cover - the builder needs root for its sandboxes
    pytest.skip("NOTICE: chaos tests need root (the builder's sandboxes)", allow_module_level=True)


def sleepers() -> int:
    """Processes of this test's build script still alive (its ``sleep 6007``)."""
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\0" + MARKER.encode() + b"\0":
                found += 1
        except OSError:
            continue
    return found


@pytest.fixture
def site(
    tmp_path: Path,
    db_url: str,
    engine: Engine,
    build_registry: peer.RunningRegistry,
    shared_runtimes: Path,
) -> Iterator[KilnSite]:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "runtimes").symlink_to(shared_runtimes)
    env = {
        "KILN_BUILDER_REGISTRY_URL": build_registry.url,
        "KILN_BUILDER_REGISTRY_USERNAME": build_registry.username,
        "KILN_BUILDER_REGISTRY_PASSWORD": build_registry.password,
        "KILN_BUILDER_REGISTRY_CA_FILE": str(build_registry.ca_file),
        "KILN_BUILDER_NAME": f"chaos-{os.getpid()}",
    }
    s = KilnSite(tmp_path, db_url, env=env)
    try:
        s.wait_for_output("Kiln is up")
        s.wait_for_output(f"serving gRPC (mutual TLS) on 127.0.0.1:{s.builder_port}")
        yield s
    finally:
        s.stop()
        assert sleepers() == 0, "a build sandbox outlived kiln up"


def api(site: KilnSite, who: Account) -> httpx.Client:
    return httpx.Client(
        base_url=f"https://localhost:{site.port}/api/v1",
        verify=ssl.create_default_context(cafile=site.ca_file),
        headers=who.headers,
        timeout=30,
    )


def wait(http: httpx.Client, path: str, check: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        build: dict[str, Any] = http.get(path).json()
        if check(build):
            return build
        assert time.monotonic() < deadline, f"gave up waiting; last: {build}"
        time.sleep(0.3)


def test_a_build_lost_with_its_builder_is_retried_once_then_failed(
    site: KilnSite, alice: Account, build_registry: peer.RunningRegistry
) -> None:
    with api(site, alice) as http:
        created = http.post("/projects", json={"name": "chaos", "template": "python-starter"})
        assert created.status_code == 201, created.text
        script = f"echo attempt started; sleep {MARKER}\n"
        put = http.put("/projects/alice/chaos/files/cdsw-build.sh", content=script.encode())
        assert put.status_code in (200, 201), put.text
        assert http.post("/projects/alice/chaos/builds", json={}).status_code == 201
        path = "/projects/alice/chaos/builds/1"

        def attempt_running(number: int) -> Any:
            def check(build: dict[str, Any]) -> bool:
                if build["attempt"] != number or build["state"] != "running":
                    return False
                log = http.get(f"{path}/logs").text
                return log.count("attempt started") == number and sleepers() == 1

            return check

        wait(http, path, attempt_running(1))
        site.kill9("builder")
        # The restarted builder finds the build it had claimed: the old sandbox is stopped
        # (one sleeper, the new attempt's) and the build runs again.
        second = wait(http, path, attempt_running(2))
        assert second["reason"] == "" and second["state"] == "running"
        log = http.get(f"{path}/logs").text
        assert "the builder stopped mid-build" in log and "--- attempt 2 ---" in log

        site.kill9("builder")
        failed = wait(http, path, lambda b: b["state"] == "failed")
        assert "stopped mid-build on each of its 2 attempts" in failed["reason"]
        assert failed["image"] is None
        deadline = time.monotonic() + 30
        while sleepers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sleepers() == 0

    target = registry_target(build_registry)
    try:
        with pytest.raises(RegistryError, match="does not exist"):
            target.get_manifest(Reference("alice/chaos/build", "1"))
    finally:
        target.close()
