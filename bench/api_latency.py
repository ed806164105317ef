"""API latency under load: 50 concurrent clients against a real `kiln up`.

The database holds 1,000 users and 10,000 projects. Clients mix three requests — project
list, project get and file read — through wrk (a C load generator, so the client does not
steal the server's CPU as a Python client would). The peer is the floor: the same TLS
listener answering a constant JSON response from a bare FastAPI route in the same process
setup, so the ratio shows what Kiln's auth, authorization and DB work cost on top.

Run:  .venv/bin/python bench/api_latency.py   (needs `wrk`: apt-get install wrk)
Writes bench/results/api_latency.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from kiln.db.engine import make_engine
from kiln.db.migrate import upgrade
from kiln.db.models import ApiKey, OwnerKind, Project, User, Visibility, utcnow
from kiln.domain.passwords import hash_password, hash_token
from kiln.runtimes.local.ownership import adopt_tree
from kiln.storage.git import commit_all, init_repo, repo_owner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "api_latency.json"
USERS, PROJECTS, CLIENTS, DURATION_S = 1000, 10_000, 50, 15
TARGET_P99_MS = 50.0
PG_ADMIN = os.environ.get(
    "KILN_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/postgres"
)
KEY = "kiln_bench_" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(db_url: str, projects_dir: Path) -> list[str]:
    """1,000 users, 10,000 projects (10 each, a tenth public); returns readable file URLs."""
    engine = make_engine(db_url)
    upgrade(engine)
    password_hash = hash_password("bench-password")  # one hash: argon2 is slow on purpose
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(User),
            [
                {
                    "username": f"user{i:04d}",
                    "password_hash": password_hash,
                    "full_name": "",
                    "email": "",
                    "is_site_admin": False,
                    "is_active": True,
                    "created_at": now,
                }
                for i in range(USERS)
            ],
        )
        ids = dict(conn.execute(text("SELECT username, id FROM users")).all())
        rows = []
        for i in range(PROJECTS):
            owner = f"user{i % USERS:04d}"
            rows.append(
                {
                    "owner_name": owner,
                    "owner_kind": OwnerKind.user,
                    "owner_user_id": ids[owner],
                    "owner_team_id": None,
                    "name": f"Project {i}",
                    "slug": f"project-{i}",
                    "description": "",
                    "visibility": Visibility.public if i % 10 == 0 else Visibility.private,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        conn.execute(insert(Project), rows)
        conn.execute(
            insert(ApiKey),
            [
                {
                    "user_id": ids["user0000"],
                    "name": "bench",
                    "prefix": KEY[:11],
                    "key_hash": hash_token(KEY),
                    "created_at": now,
                }
            ],
        )
        owned = conn.execute(
            text("SELECT id, slug FROM projects WHERE owner_name = 'user0000' ORDER BY id")
        ).all()
    engine.dispose()
    urls = []
    for project_id, slug in owned:
        path = projects_dir / str(project_id)
        path.mkdir(parents=True)
        (path / "main.py").write_text("print('hello from a benchmark project')\n" * 20)
        owner = repo_owner()
        if owner is not None:  # Kiln keeps project trees owned by the workload uid
            adopt_tree(path, owner, owner)
        init_repo(path)
        commit_all(path, "bench")
        urls.append(f"/api/v1/projects/user0000/{slug}/files/main.py")
    return urls


def start_kiln(data_dir: Path, db_url: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        KILN_DATABASE_URL=db_url,
        KILN_ADMIN_PASSWORD="bench-admin-pw",
        KILN_ADMIN_USERNAME="benchadmin",
    )
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
    wait_ready(f"https://127.0.0.1:{port}/api/v1/openapi.json")
    return proc


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, verify=False, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not come up")


def wrk(
    base: str,
    paths: list[str],
    headers: dict[str, str],
    *,
    clients: int = CLIENTS,
    duration_s: int = DURATION_S,
    method: str = "GET",
    body: str | None = None,
    timeout_s: int = 5,
) -> dict[str, Any]:
    """Run wrk (2 threads, keep-alive) with a Lua script cycling through ``paths`` (each a
    ``method`` request with ``body``, if any); parse requests, errors and latency. Also used
    by bench/model_serving.py."""
    lua = textwrap.dedent(
        """
        local paths = {%s}
        local i = 0
        local body = %s
        %s
        request = function()
          i = i + 1
          return wrk.format(%s, paths[(i %% #paths) + 1], nil, body)
        end
        done = function(summary, latency, requests)
          io.write(string.format("RESULT %%d %%d %%d %%d %%.3f %%.3f %%.3f\\n",
            summary.requests, summary.errors.status, summary.errors.connect + summary.errors.read
            + summary.errors.write + summary.errors.timeout, summary.duration,
            latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000))
        end
        """
    ) % (
        ", ".join(json.dumps(p) for p in paths),
        "nil" if body is None else json.dumps(body),
        "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()),
        json.dumps(method),
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(clients),
            "-d",
            f"{duration_s}s",
            "--timeout",
            f"{timeout_s}s",
            "-s",
            f.name,
            base,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", out)
    if not m:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    requests, status_errors, socket_errors, duration_us = map(int, m.groups()[:4])
    p50, p99, mean = map(float, m.groups()[4:])
    return {
        "requests": requests,
        "errors": status_errors + socket_errors,
        "status_errors": status_errors,
        "socket_errors": socket_errors,
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": mean,
    }


async def _paced(
    base: str, paths: list[str], headers: dict[str, str], rate: float
) -> dict[str, Any]:
    """Open loop: CLIENTS keep-alive clients together send ``rate`` requests/s on a fixed
    schedule; each latency counts from the *scheduled* send time, so a stalled server cannot
    hide its queue (no coordinated omission)."""
    import asyncio

    per_client = rate / CLIENTS
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.5

    async def client(n: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, headers=headers, verify=False) as http:
            i = 0
            while True:
                due = start + (i + n / CLIENTS) / per_client
                if due > start + DURATION_S:
                    return
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    r = await http.get(paths[(i * CLIENTS + n) % len(paths)])
                    if r.status_code >= 400:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - due)
                i += 1

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / DURATION_S,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "mean_ms": sum(latencies) / len(latencies) * 1000,
    }


def paced(base: str, paths: list[str], headers: dict[str, str], rate: float) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_paced(base, paths, headers, rate))


FLOOR_APP = textwrap.dedent(
    """
    from fastapi import FastAPI
    app = FastAPI()

    @app.get("/floor")
    def floor() -> dict:
        return {"owner": "user0000", "slug": "project-0", "name": "Project 0"}
    """
)


def measure_floor(data_dir: Path) -> dict[str, Any]:
    """A bare FastAPI route on uvicorn with the same TLS certificate: the framework floor."""
    module_dir = data_dir / "floor"
    module_dir.mkdir()
    (module_dir / "floor_app.py").write_text(FLOOR_APP)
    port = free_port()
    pki = data_dir / "pki"
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "uvicorn"),
            "floor_app:app",
            "--port",
            str(port),
            "--ssl-certfile",
            str(pki / "web-server.crt"),
            "--ssl-keyfile",
            str(pki / "web-server.key"),
            "--log-level",
            "warning",
        ],
        cwd=module_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"https://127.0.0.1:{port}/floor")
        return measure(f"https://127.0.0.1:{port}", ["/floor"], {})
    finally:
        proc.terminate()
        proc.wait()


PACED_RATES = (100, 200)  # requests/s offered by all 50 clients together
WEB_WORKERS = 2  # one per core: the setting this guide recommends for a 2-core host


def measure(base: str, paths: list[str], headers: dict[str, str]) -> dict[str, Any]:
    out = {"closed": wrk(base, paths, headers)}
    for rate in PACED_RATES:
        out[f"paced_{rate}"] = paced(base, paths, headers, rate)
    return out


def run_backend(db_url: str, data_dir: Path) -> dict[str, Any]:
    urls = seed(db_url, data_dir / "projects")
    port = free_port()
    os.environ["KILN_WEB_WORKERS"] = str(WEB_WORKERS)
    proc = start_kiln(data_dir, db_url, port)
    try:
        paths = []
        for file_url in urls[:7]:
            slug = file_url.split("/")[5]
            paths += ["/api/v1/projects?limit=50", f"/api/v1/projects/user0000/{slug}", file_url]
        headers = {"Authorization": f"Bearer {KEY}"}
        for p in paths:  # every path must work before load means anything
            httpx.get(
                f"https://127.0.0.1:{port}{p}", verify=False, headers=headers
            ).raise_for_status()
        return measure(f"https://127.0.0.1:{port}", paths, headers)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def with_database(backend: str, data_dir: Path) -> dict[str, Any]:
    if backend == "sqlite":
        return run_backend(f"sqlite:///{data_dir / 'kiln.db'}", data_dir)
    name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return run_backend(make_url(PG_ADMIN).set(database=name).render_as_string(False), data_dir)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def result(
    metric: str,
    unit: str,
    value: float,
    target: float | None,
    floor: float,
    run: dict[str, Any],
    conditions: str,
) -> dict[str, Any]:
    return {
        "metric": metric,
        "unit": unit,
        "value": round(value, 2),
        "target": target,
        "peer": "bare FastAPI+uvicorn route returning constant JSON, same TLS cert, same load",
        "peer_value": round(floor, 2),
        "ratio": round(value / floor, 2) if floor else None,
        "errors": run["errors"],
        "requests": run["requests"],
        "conditions": conditions,
    }


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    results: list[dict[str, Any]] = []
    floor: dict[str, Any] | None = None
    base_conditions = (
        f"{CLIENTS} keep-alive clients over HTTPS; {USERS} users, {PROJECTS} projects in the DB; "
        "requests cycle through project list (limit 50), project get and file read as one "
        f"user; kiln up with KILN_WEB_WORKERS={WEB_WORKERS}; server and load generator share "
        f"{os.cpu_count()} cores"
    )
    for backend in ("sqlite", "postgresql"):
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            data_dir.mkdir()
            measured = with_database(backend, data_dir)
            if floor is None:
                floor = measure_floor(data_dir)
        print(f"{backend}: {json.dumps(measured, indent=1)}")
        closed, fclosed = measured["closed"], floor["closed"]
        cond = (
            f"closed loop (wrk, {DURATION_S}s, each client sends as soon as answered); "
            + base_conditions
        )
        results.append(
            result(
                f"api_mixed_closed_rps_{backend}",
                "requests/s",
                closed["rps"],
                None,
                fclosed["rps"],
                closed,
                cond,
            )
        )
        results.append(
            result(
                f"api_mixed_closed_p99_{backend}",
                "ms",
                closed["p99_ms"],
                TARGET_P99_MS,
                fclosed["p99_ms"],
                closed,
                cond,
            )
        )
        results.append(
            result(
                f"api_mixed_closed_p50_{backend}",
                "ms",
                closed["p50_ms"],
                None,
                fclosed["p50_ms"],
                closed,
                cond,
            )
        )
        for rate in PACED_RATES:
            run, frun = measured[f"paced_{rate}"], floor[f"paced_{rate}"]
            cond = (
                f"open loop: {rate} requests/s in all on a fixed schedule ({rate / CLIENTS:g}/s "
                f"per client), latency from the scheduled send time, {DURATION_S}s; "
                + base_conditions
            )
            results.append(
                result(
                    f"api_mixed_paced{rate}_p99_{backend}",
                    "ms",
                    run["p99_ms"],
                    TARGET_P99_MS,
                    frun["p99_ms"],
                    run,
                    cond,
                )
            )
            results.append(
                result(
                    f"api_mixed_paced{rate}_p50_{backend}",
                    "ms",
                    run["p50_ms"],
                    None,
                    frun["p50_ms"],
                    run,
                    cond,
                )
            )
    print(f"floor: {json.dumps(floor, indent=1)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
