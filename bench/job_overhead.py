"""Job overhead: a trivial job (``print(1)``) from API call to "run succeeded, log stored".

Against a real ``kiln up`` (SQLite, the embedded default; the runner in its own process):

* latency, 20 runs one after another: POST .../jobs/{job}/runs, then poll the run until it
  has succeeded and its log reads "1"; p50/p95;
* the floor, in the same run: the same script started directly in a bare bubblewrap
  sandbox (new namespaces, read-only host /usr, no Kiln at all), p50/p95; the overhead is
  Kiln's p50 minus the floor's p50;
* throughput: 200 runs queued at once (max_concurrent_runs 100, a small resource profile and
  a quota with room for them), from the first POST to the last run succeeded.

Targets (issue 3): overhead p50 <= 100 ms; >= 20 runs/s on 2 cores.

Run:  .venv/bin/python bench/job_overhead.py   (as root: the runner builds sandboxes)
Writes bench/results/job_overhead.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from api_latency import free_port, wait_ready  # the sibling benchmark
from sqlalchemy import insert

from kiln.db.engine import make_engine
from kiln.db.migrate import upgrade
from kiln.db.models import ApiKey, User, utcnow
from kiln.db.workload_models import Quota, ResourceProfile
from kiln.domain.passwords import hash_password, hash_token

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "job_overhead.json"
KEY = "kiln_bench_" + uuid.uuid4().hex
LATENCY_RUNS, THROUGHPUT_RUNS = 20, 200
TARGET_OVERHEAD_MS, TARGET_RPS = 100.0, 20.0
SCRIPT = "print(1)\n"
ENDED = ("succeeded", "failed", "timed_out", "stopped")


def seed(db_url: str) -> None:
    """A user with an API key, a quota with room for 200 small runs, a small profile."""
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        user_id = conn.execute(
            insert(User).returning(User.id),
            {
                "username": "bench",
                "password_hash": hash_password("bench-password"),
                "full_name": "",
                "email": "",
                "is_site_admin": False,
                "is_active": True,
                "created_at": utcnow(),
            },
        ).scalar_one()
        conn.execute(
            insert(ApiKey),
            {
                "user_id": user_id,
                "name": "bench",
                "prefix": KEY[:11],
                "key_hash": hash_token(KEY),
                "created_at": utcnow(),
            },
        )
        conn.execute(
            insert(Quota),
            {"user_id": user_id, "cpu_millis": 400_000, "memory_bytes": 2**40, "gpu": 0},
        )
        conn.execute(
            insert(ResourceProfile),
            {
                "name": "tiny",
                "cpu_millis": 500,
                "memory_bytes": 256 * 1024**2,
                "gpu": 0,
                "is_default": False,
                "created_at": utcnow(),
            },
        )
    engine.dispose()


def start_kiln(data_dir: Path, port: int, runner_port: int) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        KILN_ADMIN_PASSWORD="bench-admin-pw",
        KILN_ADMIN_USERNAME="benchadmin",
        KILN_RUNNER_PORT=str(runner_port),
    )
    env.pop("KILN_DATABASE_URL", None)
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "kiln"),
            "up",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"https://127.0.0.1:{port}/api/v1/openapi.json")
    except RuntimeError:
        proc.kill()
        raise
    time.sleep(2)  # the runner starts beside the web tier
    return proc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_succeeded(http: httpx.Client, url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = http.get(url).json()
        if run["state"] in ENDED:
            if run["state"] != "succeeded":
                raise RuntimeError(f"run failed: {run}")
            return run
        time.sleep(0.003)
    raise RuntimeError(f"run {url} did not end")


def kiln_latencies(http: httpx.Client, job: str) -> list[float]:
    samples = []
    for _ in range(LATENCY_RUNS + 2):  # two warm-up runs, not counted
        start = time.perf_counter()
        run = http.post(f"{job}/runs").json()
        wait_succeeded(http, f"{job}/runs/{run['id']}")
        log = http.get(f"{job}/runs/{run['id']}/logs").text
        samples.append((time.perf_counter() - start) * 1000)
        assert log == "1\n", log
    return samples[2:]


def floor_latencies(project_dir: Path) -> list[float]:
    """The same script in a bare bubblewrap sandbox: namespaces, read-only system, no Kiln,
    and the same interpreter Kiln's built-in runtime uses (the host's own Python)."""
    argv = [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--ro-bind", "/etc", "/etc",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--bind", str(project_dir), "/home/cdsw",
        "--chdir", "/home/cdsw",
        "--ro-bind", sys.base_prefix, sys.base_prefix,
        "--uid", "1000",
        "--gid", "1000",
        f"{sys.base_prefix}/bin/python3", "one.py",
    ]  # fmt: skip
    samples = []
    for _ in range(LATENCY_RUNS + 2):
        start = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, check=True).stdout
        samples.append((time.perf_counter() - start) * 1000)
        assert out == b"1\n", out
    return samples[2:]


def throughput(http: httpx.Client, job: str) -> float:
    """Queue THROUGHPUT_RUNS at once, then watch the job's run list (one request every
    100 ms, so the client does not compete with the server for the 2 cores)."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(lambda _: http.post(f"{job}/runs").json()["id"], range(THROUGHPUT_RUNS)))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        items = http.get(f"{job}/runs", params={"limit": 200}).json()["items"]
        ended = {r["id"]: r["state"] for r in items if r["id"] in ids and r["state"] in ENDED}
        if len(ended) == len(ids):
            failed = [i for i, state in ended.items() if state != "succeeded"]
            if failed:
                raise RuntimeError(f"runs did not succeed: {failed}")
            return THROUGHPUT_RUNS / (time.perf_counter() - start)
        time.sleep(0.1)
    raise RuntimeError("the runs did not end in time")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the runner builds sandboxes")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-jobs-"))
    data_dir = work / "data"
    data_dir.mkdir(mode=0o700)
    seed(f"sqlite:///{data_dir / 'kiln.db'}")
    port, runner_port = free_port(), free_port()
    proc = start_kiln(data_dir, port, runner_port)
    try:
        ca = str(data_dir / "pki" / "ca.crt")
        base = f"https://localhost:{port}/api/v1"
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=base, verify=ca, headers=headers, timeout=60) as http:
            slug = http.post("/projects", json={"name": "bench"}).json()["slug"]
            project = f"/projects/bench/{slug}"
            http.put(f"{project}/files/one.py", content=SCRIPT.encode()).raise_for_status()
            # Latency on the site's default resources (1 vCPU); throughput with a small
            # profile so that many runs fit the quota at once.
            http.post(
                f"{project}/jobs", json={"name": "one", "script": "one.py"}
            ).raise_for_status()
            http.post(
                f"{project}/jobs",
                json={
                    "name": "many",
                    "script": "one.py",
                    "profile": "tiny",
                    "max_concurrent_runs": 100,
                },
            ).raise_for_status()
            kiln = kiln_latencies(http, f"{project}/jobs/one")
            floor_dir = work / "floor"
            floor_dir.mkdir()
            (floor_dir / "one.py").write_text(SCRIPT)
            os.chown(floor_dir, 1000, 1000)
            floor = floor_latencies(floor_dir)
            rps = throughput(http, f"{project}/jobs/many")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", f"{data_dir}"], check=False)
        shutil.rmtree(work, ignore_errors=True)

    conditions = (
        "kiln up (SQLite, runner in its own process, reconciler woken by the API and by "
        "workload exits; sandboxes with the default egress, i.e. a slirp4netns network each); "
        "client polls the run every 3 ms over HTTPS and then reads the log; "
        f"{LATENCY_RUNS} sequential runs after 2 warm-ups; floor = bwrap with new namespaces "
        "and read-only /usr running the same script with the same interpreter (the host Python "
        f"{sys.version.split()[0]} at {sys.base_prefix}); 2 cores shared by client, web, runner "
        "and sandboxes"
    )
    p50, p95 = statistics.median(kiln), percentile(kiln, 0.95)
    f50, f95 = statistics.median(floor), percentile(floor, 0.95)
    results = [
        {
            "metric": "job_api_to_succeeded_p50",
            "unit": "ms",
            "value": round(p50, 1),
            "target": None,
            "peer": "same script in a bare bubblewrap sandbox",
            "peer_value": round(f50, 1),
            "ratio": round(p50 / f50, 2),
            "conditions": conditions,
        },
        {
            "metric": "job_api_to_succeeded_p95",
            "unit": "ms",
            "value": round(p95, 1),
            "target": None,
            "peer": "same script in a bare bubblewrap sandbox",
            "peer_value": round(f95, 1),
            "ratio": round(p95 / f95, 2),
            "conditions": conditions,
        },
        {
            "metric": "job_overhead_p50",
            "unit": "ms",
            "value": round(p50 - f50, 1),
            "target": TARGET_OVERHEAD_MS,
            "peer": "Prefect's published per-task overhead (~120 ms)",
            "peer_value": 120.0,
            "ratio": round((p50 - f50) / 120.0, 2),
            "conditions": "Kiln p50 minus the bare-sandbox p50, same run; " + conditions,
        },
        {
            "metric": "job_throughput",
            "unit": "runs/s",
            "value": round(rps, 1),
            "target": TARGET_RPS,
            "peer": "bare sandbox, sequential (1000 / floor p50)",
            "peer_value": round(1000 / f50, 1),
            "ratio": round(rps / (1000 / f50), 2),
            "conditions": f"{THROUGHPUT_RUNS} runs queued at once by 8 client threads "
            "(max_concurrent_runs 100, profile 0.5 vCPU / 256 MiB), first POST to last "
            "run succeeded (watched through the run list every 100 ms); " + conditions,
        },
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
