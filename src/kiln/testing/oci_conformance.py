"""Running the OCI distribution-spec conformance suite against a Kiln registry and reading
its JUnit report (the test ``tests/integration/test_registry_conformance.py`` and the
benchmark ``bench/oci_conformance.py`` both use this).

Everything the suite can test is switched on: pull, push, content discovery (tag lists,
referrers) and content management (deletes), cancelled uploads, digest headers, anonymous
mounts, tag parameters, and all its kinds of test data except "sparse" manifests (an index
naming manifests that were never pushed, which Kiln refuses by design).
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS = {
    "OCI_VERSION": "1.1",
    "OCI_API_PULL": "true",
    "OCI_API_PUSH": "true",
    "OCI_API_BLOBS_ATOMIC": "true",
    "OCI_API_BLOBS_DELETE": "true",
    "OCI_API_BLOBS_DIGEST_HEADER": "true",
    "OCI_API_BLOBS_MOUNT_ANONYMOUS": "true",
    "OCI_API_BLOBS_UPLOAD_CANCEL": "true",
    "OCI_API_MANIFESTS_ATOMIC": "true",
    "OCI_API_MANIFESTS_DELETE": "true",
    "OCI_API_MANIFESTS_DIGEST_HEADER": "true",
    "OCI_API_MANIFESTS_TAG_PARAM": "true",
    "OCI_API_TAGS_ATOMIC": "true",
    "OCI_API_TAGS_DELETE": "true",
    "OCI_API_TAGS_LIST": "true",
    "OCI_API_REFERRER": "true",
    "OCI_DATA_SPARSE": "false",
}


@dataclass
class ConformanceResult:
    passed: int
    failed: int
    skipped: int
    total: int
    failures: list[str] = field(default_factory=list)
    report_dir: Path | None = None
    output: str = ""


def run_conformance(
    binary: Path,
    *,
    registry: str,
    ca_file: Path,
    username: str,
    password: str,
    repositories: tuple[str, str],
    results_dir: Path,
    timeout: float = 900,
) -> ConformanceResult:
    """Run the suite against ``registry`` (``host:port``, TLS verified with ``ca_file``)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **SETTINGS,
        "OCI_REGISTRY": registry,
        "OCI_TLS": "enabled",
        "SSL_CERT_FILE": str(ca_file),
        "OCI_REPO1": repositories[0],
        "OCI_REPO2": repositories[1],
        "OCI_USERNAME": username,
        "OCI_PASSWORD": password,
        "OCI_RESULTS_DIR": str(results_dir),
        "OCI_LOG": "error",
    }
    done = subprocess.run(
        [str(binary)],
        env=env,
        cwd=results_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = read_junit(results_dir / "junit.xml")
    result.report_dir = results_dir
    result.output = done.stdout[-20_000:] + done.stderr[-5_000:]
    return result


def read_junit(path: Path) -> ConformanceResult:
    """Counts as the suite reports them (its ``testsuite`` totals, which count every step of
    its test tree), and the names of the failed test cases."""
    root = ET.parse(path).getroot()  # noqa: S314
    total = failed = skipped = 0
    for suite in root.iter("testsuite"):
        total += int(suite.get("tests", "0"))
        failed += int(suite.get("failures", "0")) + int(suite.get("errors", "0"))
        skipped += int(suite.get("skipped", "0")) + int(suite.get("disabled", "0"))
    failures = [
        case.get("name", "?")
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return ConformanceResult(total - failed - skipped, failed, skipped, total, failures)
