"""The file list with each entry's last commit: how long the page takes on a long history.

A project with 300 files in its top folder and 2,000 commits (each changing a few files).
The page asks git once (`kiln.storage.history.folder_history`: one bounded `git log
--name-only`); the peer is what a naive page would do, one `git log -1 -- ENTRY` per entry.
Both are timed as the function the page calls, and the whole page through the app.

Run:  .venv/bin/python bench/file_history.py
Writes bench/results/file_history.json.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from kiln.app import create_app
from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.migrate import upgrade
from kiln.domain.identity import create_api_key, create_user
from kiln.settings import Settings
from kiln.storage.git import run_git
from kiln.storage.history import SCAN_COMMITS, folder_history
from kiln.storage.safepath import parse_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "file_history.json"
FILES, COMMITS, REPEAT = 300, 2000, 15
TARGET_PAGE_P50_MS = 250.0


def build_history(repo: Path) -> None:
    """COMMITS commits over FILES files, written with git fast-import (seconds, not minutes)."""
    rng = random.Random(7)
    names = [f"file_{i:03d}.py" for i in range(FILES)]
    stream: list[bytes] = []
    mark = 0
    for n in range(COMMITS):
        touched = names if n == 0 else rng.sample(names, 3)
        blobs = []
        for name in touched:
            mark += 1
            data = f"# {name}, version {n}\n".encode()
            stream.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(data), data))
            blobs.append((mark, name))
        message = f"Change {len(touched)} files (commit {n})".encode()
        stream.append(b"commit refs/heads/main\n")
        stamp = 1_700_000_000 + n * 60
        stream.append(b"committer Bench <bench@example.com> %d +0000\n" % stamp)
        stream.append(b"data %d\n%s\n" % (len(message), message))
        for blob, name in blobs:
            stream.append(b"M 100644 :%d %s\n" % (blob, name.encode()))
        stream.append(b"\n")
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "fast-import", "--quiet"], input=b"".join(stream), check=True
    )
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "-f", "main"], check=True)


def timed(fn: Any, repeat: int = REPEAT) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def naive(repo: Path) -> None:
    """The peer: one `git log -1` per entry."""
    for entry in sorted(p.name for p in repo.iterdir() if p.name != ".git"):
        run_git(repo, "log", "-1", "--format=%H %aI %s", "--", f":(literal){entry}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            env="test",
            data_dir=Path(tmp) / "data",
            database_url=f"sqlite:///{tmp}/kiln.db",
            secret_key="x" * 32,
        )
        settings.data_dir.mkdir()
        engine = make_engine(settings.db_url)
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as db:
            user = create_user(db, "bench", "bench-password")
            _, key = create_api_key(db, user, "bench")
        app = create_app(settings, engine)
        client = TestClient(app, base_url="https://testserver", follow_redirects=False)
        auth = {"Authorization": f"Bearer {key}"}
        created = client.post("/api/v1/projects", json={"name": "history"}, headers=auth)
        assert created.status_code == 201, created.text
        (repo,) = [p for p in settings.projects_dir.iterdir() if p.name.isdigit()]
        # Replace the blank project's repository with the long history.
        subprocess.run(["rm", "-rf", str(repo)], check=True)
        build_history(repo)
        run_git(repo, "config", "receive.denyCurrentBranch", "updateInstead")

        top = parse_path("", allow_root=True)
        found = folder_history(repo, top)
        # The newest SCAN_COMMITS commits name almost every entry; the rest show "older".
        matched = len(found.last)
        assert not found.complete and matched > FILES * 0.9, matched
        one_log = timed(lambda: folder_history(repo, top))
        per_entry = timed(lambda: naive(repo), repeat=3)

        login = client.post("/login", data={"username": "bench", "password": "bench-password"})
        assert login.status_code == 303
        warm = client.get("/p/bench/history/files/")  # warms up the templates
        assert "Change 3 files" in warm.text and warm.text.count("data-relative") > FILES
        page = timed(lambda: client.get("/p/bench/history/files/").raise_for_status())

    conditions = (
        f"{FILES} files in one folder, {COMMITS} commits of 3 files each (git fast-import); "
        f"the newest {SCAN_COMMITS} commits scanned ({matched} of {FILES} entries matched, the "
        "rest shown as 'older'); "
        f"median of {REPEAT} runs (3 for the per-entry peer); in-process TestClient over "
        "SQLite; shared 2-core machine"
    )
    one, peer = statistics.median(one_log), statistics.median(per_entry)
    results = [
        {
            "metric": "file_list_history_lookup_p50",
            "unit": "ms",
            "value": round(one, 1),
            "target": None,
            "peer": "one `git log -1 -- ENTRY` per entry (a naive file list)",
            "peer_value": round(peer, 1),
            "ratio": round(one / peer, 3),
            "conditions": conditions,
        },
        {
            "metric": "file_list_page_p50",
            "unit": "ms",
            "value": round(statistics.median(page), 1),
            "target": TARGET_PAGE_P50_MS,
            "peer": "the history lookup alone (one bounded git log)",
            "peer_value": round(one, 1),
            "ratio": round(statistics.median(page) / one, 2),
            "conditions": conditions,
        },
    ]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
