"""The OCI distribution-spec conformance suite against Kiln's registry on a live server
(SQLite and PostgreSQL), with everything the suite tests switched on: every test passes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kiln.testing.live import LiveServer
from kiln.testing.oci_conformance import run_conformance
from kiln.testing.tools import require
from tests.conftest import Account

pytestmark = [pytest.mark.slow, pytest.mark.one_database]


def test_the_oci_conformance_suite_passes(
    live: LiveServer, make_user: Callable[..., Account], tmp_path: Path
) -> None:
    suite = require("oci-conformance", "the OCI distribution-spec conformance suite")
    alice = make_user("alice")
    with httpx.Client(base_url=live.url, verify=str(live.ca_file)) as http:
        created = http.post("/api/v1/projects", json={"name": "conformance"}, headers=alice.headers)
        assert created.status_code == 201
    result = run_conformance(
        suite,
        registry=live.url.removeprefix("https://").rstrip("/"),
        ca_file=live.ca_file,
        username=alice.username,
        password=alice.key,
        repositories=("alice/conformance/repo1", "alice/conformance/repo2"),
        results_dir=tmp_path / "results",
    )
    assert result.failed == 0, f"failed: {result.failures[:20]}\n{result.output[-4000:]}"
    assert result.skipped == 0 and result.passed > 900, result.output[-4000:]
