"""The OCI distribution-spec conformance suite against Kiln's registry, summarised.

Starts a real Kiln web tier (HTTPS, SQLite) with one user and project, runs the suite
(built by scripts/build_go_tools.sh) with pull, push, content discovery and content
management all enabled, and writes bench/results/oci_conformance.json with the metrics
``oci_conformance_passed`` and ``oci_conformance_failed``.

Run:  .venv/bin/python bench/oci_conformance.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.migrate import upgrade
from kiln.domain.identity import create_api_key, create_user
from kiln.domain.projects import new_project
from kiln.settings import Settings
from kiln.testing.live import live_server
from kiln.testing.oci_conformance import SETTINGS, run_conformance
from kiln.testing.tools import find, go_tool_pins

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "oci_conformance.json"


def main() -> int:
    suite = find("oci-conformance")
    if suite is None:
        print("oci-conformance is not built: run scripts/build_go_tools.sh", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        settings = Settings(data_dir=data, secret_key="conformance-bench-secret-0123456789")
        data.mkdir()
        engine = make_engine(settings.db_url)
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as db:
            user = create_user(db, "conformance", "conformance-password")
            _, key = create_api_key(db, user, "conformance")
            new_project(db, user, "suite")
        with live_server(settings, engine) as live:
            result = run_conformance(
                suite,
                registry=live.url.removeprefix("https://").rstrip("/"),
                ca_file=live.ca_file,
                username="conformance",
                password=key,
                repositories=("conformance/suite/repo1", "conformance/suite/repo2"),
                results_dir=Path(tmp) / "results",
            )
    version = go_tool_pins().get("oci-conformance", "?")
    enabled = ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
    conditions = (
        f"github.com/opencontainers/distribution-spec/conformance {version}, OCI_VERSION 1.1; "
        f"kiln web tier (uvicorn, TLS from Kiln's CA, SQLite), token auth with an API key; "
        f"{enabled}; counts as the suite's JUnit report gives them (every step of its tree)"
    )
    rows = [
        {
            "metric": "oci_conformance_passed",
            "unit": "tests",
            "value": result.passed,
            "target": result.total,
            "peer": None,
            "peer_value": None,
            "ratio": round(result.passed / result.total, 3) if result.total else None,
            "conditions": conditions,
        },
        {
            "metric": "oci_conformance_failed",
            "unit": "tests",
            "value": result.failed,
            "target": 0,
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "conditions": conditions,
            "failures": result.failures,
        },
    ]
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"passed {result.passed}, failed {result.failed}, skipped {result.skipped}")
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
