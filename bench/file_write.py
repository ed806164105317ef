"""File-API writes and git clones with server-side git sandboxed, against the code before.

Since issue 7 every server-side git command runs in a bubblewrap sandbox as the workload
uid, and each project lives on its own loop-mounted filesystem. This measures what that
costs, side by side in one run:

- a 4 KiB ``PUT .../files/...`` (each one a git commit), one sequential client over HTTPS
  with keep-alive, p50/p95 over 200 writes, on Kiln as it is now and on the commit before
  the change (checked out beside it with ``git worktree``, run with the same interpreter and
  dependencies), the two sites taking turns every 20 writes so both see the same load;
- ``git clone`` over HTTPS of a project with 1,000 files, p50 of 5, on both.

Run:  .venv/bin/python bench/file_write.py [--before REV]   (as root: the runner needs it)
Writes bench/results/file_write.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kiln.storage.volumes import unmount_below

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_latency import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "file_write.json"
# The last commit before server-side git was sandboxed (issue 7).
BEFORE = "b7322a6"
WRITES, ROUND, CLONES, FILES = 200, 20, 5, 1000
ADMIN, PASSWORD = "benchadmin", "bench-admin-password"


class Site:
    """One ``kiln up`` (web + runner) from a source tree, with an API key and a project."""

    def __init__(self, label: str, src: Path, work: Path) -> None:
        self.label = label
        self.data_dir = work / f"data-{label}"
        self.port, runner_port = free_port(), free_port()
        env = dict(
            os.environ,
            PYTHONPATH=str(src),
            KILN_ADMIN_USERNAME=ADMIN,
            KILN_ADMIN_PASSWORD=PASSWORD,
            KILN_RUNNER_PORT=str(runner_port),
        )
        env.pop("KILN_DATABASE_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli.main", "up", "--data-dir", str(self.data_dir),
             "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_ready(f"https://127.0.0.1:{self.port}/api/v1/openapi.json")
        self.ca = self.data_dir / "pki" / "ca.crt"
        self.url = f"https://localhost:{self.port}/"
        key = httpx.post(
            f"{self.url}api/v1/auth/api-keys", auth=(ADMIN, PASSWORD), verify=str(self.ca)
        ).json()["key"]
        self.key = key
        self.http = httpx.Client(
            base_url=self.url, verify=str(self.ca), headers={"Authorization": f"Bearer {key}"}
        )
        made = self.http.post("api/v1/projects", json={"name": "writes"})
        assert made.status_code == 201, made.text
        self.samples: list[float] = []

    def write_round(self, start: int) -> None:
        body = os.urandom(2048).hex().encode()  # 4 KiB
        for i in range(start, start + ROUND):
            began = time.perf_counter()
            r = self.http.put(
                f"api/v1/projects/{ADMIN}/writes/files/notes/f{i % 50}.txt", content=body
            )
            self.samples.append((time.perf_counter() - began) * 1000)
            assert r.status_code in (200, 201), r.text

    def upload_files_project(self) -> None:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            for i in range(FILES):
                content = f"# file {i}\n".encode() + os.urandom(512).hex().encode()
                info = tarfile.TarInfo(f"many/d{i // 100}/f{i}.py")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        r = self.http.post(
            "api/v1/projects/upload",
            files={"file": ("many.tar.gz", data.getvalue(), "application/gzip")},
            data={"name": "many"},
            timeout=120,
        )
        assert r.status_code == 201, r.text

    def clone_times(self, work: Path) -> list[float]:
        env = dict(os.environ, GIT_SSL_CAINFO=str(self.ca), GIT_TERMINAL_PROMPT="0")
        url = f"https://{ADMIN}:{self.key}@localhost:{self.port}/git/{ADMIN}/many.git"
        times = []
        for i in range(CLONES + 1):  # one warm-up
            dest = work / f"clone-{self.label}-{i}"
            began = time.perf_counter()
            subprocess.run(["git", "clone", "-q", url, str(dest)], env=env, check=True)
            times.append((time.perf_counter() - began) * 1000)
            assert len(list(dest.rglob("f*.py"))) == FILES  # (the upload hoists "many/")
            shutil.rmtree(dest)
        return times[1:]

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        unmount_below(self.data_dir)  # the projects' filesystems


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def result(metric: str, unit: str, value: float, target: float | None, peer: str,
           peer_value: float | None, conditions: str) -> dict[str, Any]:  # fmt: skip
    ratio = round(value / peer_value, 2) if peer_value else None
    return {"metric": metric, "unit": unit, "value": round(value, 1), "target": target,
            "peer": peer, "peer_value": None if peer_value is None else round(peer_value, 1),
            "ratio": ratio, "conditions": conditions}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-write-"))
    before_src = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before_src),
                    args.before], check=True)  # fmt: skip
    sites: list[Site] = []
    try:
        sites = [Site("now", ROOT / "src", work), Site("before", before_src / "src", work)]
        now, before = sites
        for site in sites:  # warm-up: first commits, connection, caches
            site.write_round(0)
            site.samples.clear()
        for start in range(0, WRITES, ROUND):
            for site in sites if (start // ROUND) % 2 == 0 else sites[::-1]:
                site.write_round(start)
        clones = {}
        for site in sites:
            site.upload_files_project()
            clones[site.label] = site.clone_times(work)
    finally:
        for site in sites:
            site.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_src)],
                       check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    conditions = (
        f"kiln up on SQLite, one sequential HTTPS client with keep-alive, 4 KiB PUTs over 50 "
        f"files (each a git commit), {WRITES} writes per site after a warm-up, the two sites "
        f"taking turns every {ROUND} writes; now = {rev} (git in a bubblewrap sandbox as the "
        f"workload uid, project on a loop-mounted ext4 image), before = {args.before} (git as "
        f"root on a plain directory); git clone of {FILES} files (~1 KiB each) p50 of "
        f"{CLONES} after a warm-up; 2 cores shared by client and server"
    )
    now_p50, before_p50 = percentile(now.samples, 0.5), percentile(before.samples, 0.5)
    results = [
        result("file_write_p50", "ms", now_p50, 100.0, f"Kiln before ({args.before})",
               before_p50, conditions),
        result("file_write_p95", "ms", percentile(now.samples, 0.95), None,
               f"Kiln before ({args.before})", percentile(before.samples, 0.95), conditions),
        {**result("file_write_ratio_vs_before", "ratio", now_p50 / before_p50, 1.5,
                  f"Kiln before ({args.before})", 1.0, conditions),
         "value": round(now_p50 / before_p50, 2), "ratio": round(now_p50 / before_p50, 2)},
        result("git_clone_1000_files", "ms", percentile(clones["now"], 0.5), None,
               f"Kiln before ({args.before})", percentile(clones["before"], 0.5), conditions),
    ]  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
