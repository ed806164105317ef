"""Model serving: a trivial function behind Kiln's model router against ``mlflow models
serve`` of the same function, in one run.

Kiln runs as ``kiln up`` (SQLite; web tier, runner and builder in their own processes, one
web worker). A project holds ``model.py`` with ``predict(args) -> {"sum": a + b}``; the
model is created, built (the S2I model build) and deployed through the REST API, and called
the way a CML client calls it: ``POST https://modelservice.<content domain>/model`` with
``{"accessKey": ..., "request": {"a": 1, "b": 2}}`` and ``Authorization: Bearer <model API
key>`` over HTTPS (the model's default serving mode: threads, 4 calls at once per replica).

The peer is ``mlflow models serve --env-manager local`` of the same function saved as an
MLflow pyfunc model, with as many workers as Kiln has replicas, over plain HTTP as users
run it, called with ``POST /invocations {"dataframe_records": [{"a": 1, "b": 2}]}``. MLflow
lives in a virtualenv of its own outside the repository (MLFLOW_VENV, made on the first run
with pip; it is not a test dependency).

* ``model_rps_ratio_vs_mlflow`` per replica count (1, 2) and concurrency (10, 50): wrk
  (2 threads, keep-alive, the same Lua POST script both sides) for DURATION_S each, Kiln and
  mlflow in turns; value = Kiln's requests/s, peer_value = mlflow's, ratio = Kiln/mlflow.
* ``router_overhead_p50``: one sequential keep-alive client (so queueing does not count),
  calls alternating through the router (HTTPS, auth) and straight at the replica's host
  port (the runner's port forward; plain HTTP, ``{"request": ...}`` as the router forwards
  it); p50(router) - p50(direct).
* ``redeploy_failed_requests``: REDEPLOY_CLIENTS async keep-alive clients call in a loop
  while a new build is deployed over the serving one and then the previous build again (a
  rollback); non-2xx answers and connection errors, counted.
* ``deploy_to_first_call``: the deploy API call of an existing build (nothing serving yet)
  until the first 200 through the router; ``deploy_to_first_call_code_change``: a code
  change written to the project, then build and deploy, until the first 200 answered by the
  new code.

Run:  .venv/bin/python bench/model_serving.py   (as root: the builder's and the runner's
sandboxes need it; needs `wrk`: apt-get install wrk, and the base image: make base-image).
Writes bench/results/model_serving.json.

``--profile-router``: no results; one model replica, and py-spy (PY_SPY, installed by hand:
``python3 -m venv /root/.cache/kiln-bench/py-spy-venv && .../bin/pip install py-spy``)
samples the web tier for PROFILE_S while one client calls through the router; prints the
functions (Python and native) that took its CPU time.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from api_latency import free_port, wait_ready, wrk  # the sibling benchmarks
from app_proxy import Conn, web_pid
from session_start import percentile, running_kiln, stop_process, wait_until
from sqlalchemy import create_engine, text

from kiln.pki.ca import content_domain
from kiln.storage.volumes import unmount_below
from kiln.testing.base_image import base_archive, base_cache_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "model_serving.json"
MLFLOW_VENV = Path(
    os.environ.get("KILN_BENCH_MLFLOW_VENV", "/root/.cache/kiln-bench/mlflow-venv")
).expanduser()
MLFLOW_REQUIREMENT = "mlflow==3.17.2"
DURATION_S = int(os.environ.get("KILN_BENCH_DURATION", "15"))
REQUESTS = int(os.environ.get("KILN_BENCH_REQUESTS", "2000"))
CONCURRENCIES = (10, 50)
REPLICAS = (1, 2)
REDEPLOY_CLIENTS = 10
PY_SPY = Path(os.environ.get("KILN_BENCH_PY_SPY", "/root/.cache/kiln-bench/py-spy-venv/bin/py-spy"))
PROFILE_S = 30
WRK_TIMEOUT_S = 10
TARGETS = {
    "model_rps_ratio_vs_mlflow": 1.5,
    "router_overhead_p50": 1.0,
    "redeploy_failed_requests": 0,
}
MODEL_FILE = """\
def predict(args):
    return {"sum": args["a"] + args["b"]}
"""
CHANGED_FILE = """\
def predict(args):
    return {"sum": args["a"] + args["b"], "version": %d}
"""
# The same function, as an MLflow pyfunc model: each record of the DataFrame is one call.
MLFLOW_SAVE = f"""\
import sys

import mlflow.pyfunc

{MODEL_FILE}

class Adder(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [predict(record) for record in model_input.to_dict(orient="records")]


mlflow.pyfunc.save_model(sys.argv[1], python_model=Adder())
"""
REQUEST = {"a": 1, "b": 2}
MLFLOW_BODY = json.dumps({"dataframe_records": [REQUEST]})


# ---- Kiln ----------------------------------------------------------------------------------


@dataclass
class Model:
    """The benchmark's model ``adder``: the admin's API client, the model's access key, a
    model API key, and where its endpoint is."""

    http: httpx.Client
    project: str  # /api/v1/projects/{owner}/{slug}
    port: int
    data_dir: Path
    supervisor: int  # the pid of `kiln up`
    access_key: str = ""
    api_key: str = ""
    deployments: list[int] = field(default_factory=list)

    @property
    def host(self) -> str:
        domain = content_domain(os.environ.get("KILN_DOMAIN", "localhost"))
        return f"modelservice.{domain}:{self.port}"

    @property
    def path(self) -> str:
        return f"{self.project}/models/adder"

    def body(self, request: dict[str, Any] = REQUEST) -> str:
        return json.dumps({"accessKey": self.access_key, "request": request})

    def headers(self) -> dict[str, str]:
        return {
            "Host": self.host,
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
        }

    def write(self, text_: str) -> None:
        self.http.put(f"{self.project}/files/model.py", content=text_.encode()).raise_for_status()

    def build(self) -> int:
        made = self.http.post(f"{self.path}/builds", json={})
        made.raise_for_status()
        number = int(made.json()["number"])

        def ended() -> dict[str, Any] | None:
            found: dict[str, Any] = self.http.get(f"{self.path}/builds/{number}").json()
            state = found["build"]["state"]
            return found if state in ("succeeded", "failed", "timed_out", "stopped") else None

        built = wait_until(ended, 600, f"model build {number}")
        if built["build"]["state"] != "succeeded":
            raise RuntimeError(f"model build {number}: {json.dumps(built)[:2000]}")
        return number

    def deploy(self, build: int, replicas: int) -> int:
        made = self.http.post(
            f"{self.path}/deployments", json={"build": build, "replicas": replicas}
        )
        made.raise_for_status()
        number = int(made.json()["number"])
        self.deployments.append(number)
        return number

    def wait_state(self, number: int, state: str, timeout: float = 300) -> None:
        def look() -> bool:
            found = self.http.get(f"{self.path}/deployments/{number}").json()
            if found["state"] == "failed":
                raise RuntimeError(f"deployment {number} failed: {found['reason']}")
            return bool(found["state"] == state)

        wait_until(look, timeout, f"deployment {number} to be {state}")

    def query(self, sql: str) -> list[Any]:
        """The first column of ``sql``'s rows, read from Kiln's database."""
        engine = create_engine(f"sqlite:///{self.data_dir / 'kiln.db'}")
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql)).scalars())
        finally:
            engine.dispose()

    def count(self, sql: str) -> int:
        return int(self.query(sql)[0])

    def ready_endpoints(self) -> list[str]:
        """Host-side endpoints (host:port) of the ready replicas."""
        found = self.query(
            "SELECT w.endpoint FROM model_replicas r JOIN workloads w "
            "ON w.id = r.workload_id WHERE r.ready AND w.state = 'running'"
        )
        return [str(e) for e in found if e]

    def call(self, client: httpx.Client) -> httpx.Response:
        return client.post(
            f"https://127.0.0.1:{self.port}/model", content=self.body(), headers=self.headers()
        )

    def first_call(self, t0: float, code_version: int | None = None) -> float:
        """Seconds from ``t0`` until a call through the router answers 200 (from the code
        that says ``code_version``, when given)."""
        with httpx.Client(verify=False, timeout=60) as client:
            while time.perf_counter() - t0 < 600:
                try:
                    answer = self.call(client)
                    if answer.status_code == 200:
                        said = answer.json()["response"].get("version")
                        if code_version is None or said == code_version:
                            return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        raise RuntimeError("no successful call within 600 s")


@contextmanager
def kiln_model(tmp: Path) -> Iterator[Model]:
    """``kiln up`` with a project, its model ``adder`` (not built yet) and a model API key;
    the model deleted (its replicas stopped: they outlive ``kiln up`` by design) at the end."""
    data_dir = tmp / "data"
    data_dir.mkdir()
    env = {
        "KILN_RUNNER_PORT": str(free_port()),
        "KILN_BUILDER_PORT": str(free_port()),
        "KILN_BUILDER_BASE_CACHE_DIR": str(base_cache_dir()),
    }
    with running_kiln(data_dir, **env) as up:
        http = httpx.Client(
            base_url=up.base,
            verify=False,
            headers={"Authorization": f"Bearer {up.key}"},
            timeout=60,
        )
        made = http.post("/api/v1/projects", json={"name": "bench", "template": "python-starter"})
        made.raise_for_status()
        project = f"/api/v1/projects/{made.json()['owner']}/{made.json()['slug']}"
        model = Model(http, project, up.port, data_dir, up.pid)
        model.write(MODEL_FILE)
        created = http.post(
            f"{project}/models", json={"name": "adder", "file": "model.py", "function": "predict"}
        )
        created.raise_for_status()
        model.access_key = created.json()["access_key"]
        key = http.post("/api/v1/auth/model-api-keys", json={"name": "bench"})
        key.raise_for_status()
        model.api_key = key.json()["key"]
        try:
            yield model
        finally:
            http.delete(model.path).raise_for_status()
            # Its row goes once the runner stopped every replica.
            wait_until(lambda: model.count("SELECT count(*) FROM models") == 0, 180, "the model")
            http.close()


# ---- MLflow --------------------------------------------------------------------------------


def mlflow_python() -> Path:
    """The bench virtualenv's Python with MLflow, made on the first run."""
    python = MLFLOW_VENV / "bin" / "python"
    if not (MLFLOW_VENV / "bin" / "mlflow").exists():
        print(f"installing {MLFLOW_REQUIREMENT} into {MLFLOW_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", MLFLOW_REQUIREMENT], check=True)
    return python


def mlflow_version(python: Path) -> str:
    code = "from importlib.metadata import version; print(version('mlflow'))"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def save_mlflow_model(python: Path, work: Path) -> Path:
    script, path = work / "save_model.py", work / "adder-pyfunc"
    script.write_text(MLFLOW_SAVE)
    subprocess.run([str(python), str(script), str(path)], check=True, capture_output=True)
    return path


@contextmanager
def mlflow_serve(python: Path, model_dir: Path, workers: int, log: Path) -> Iterator[int]:
    port = free_port()
    env = dict(os.environ, PATH=f"{python.parent}:{os.environ['PATH']}")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                str(python.parent / "mlflow"),
                "models",
                "serve",
                "-m",
                str(model_dir),
                "--env-manager",
                "local",
                "-w",
                str(workers),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/ping")
            answer = httpx.post(
                f"http://127.0.0.1:{port}/invocations",
                content=MLFLOW_BODY,
                headers={"Content-Type": "application/json"},
            )
            if answer.status_code != 200 or answer.json()["predictions"] != [{"sum": 3}]:
                raise RuntimeError(f"mlflow answered {answer.status_code}: {answer.text}")
            yield port
        finally:
            stop_process(proc)


# ---- measurements ----------------------------------------------------------------------------


def kiln_wrk(model: Model, clients: int) -> dict[str, Any]:
    return wrk(
        f"https://127.0.0.1:{model.port}",
        ["/model"],
        model.headers(),
        clients=clients,
        duration_s=DURATION_S,
        method="POST",
        body=model.body(),
        timeout_s=WRK_TIMEOUT_S,
    )


def mlflow_wrk(port: int, clients: int) -> dict[str, Any]:
    return wrk(
        f"http://127.0.0.1:{port}",
        ["/invocations"],
        {"Content-Type": "application/json"},
        clients=clients,
        duration_s=DURATION_S,
        method="POST",
        body=MLFLOW_BODY,
        timeout_s=WRK_TIMEOUT_S,
    )


def throughput(
    model: Model, python: Path, mlflow_model: Path, replicas: int, log: Path
) -> dict[int, dict[str, dict[str, Any]]]:
    """Kiln and mlflow (as many workers as Kiln's replicas) at each concurrency, in turns;
    mlflow runs only while it is measured (both idle while the other is)."""
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    with mlflow_serve(python, mlflow_model, replicas, log) as port:
        for clients in CONCURRENCIES:
            kiln_wrk(model, clients)  # warm-up: connections, the decision cache, threads
            mlflow_wrk(port, clients)
            runs[clients] = {"kiln": kiln_wrk(model, clients), "mlflow": mlflow_wrk(port, clients)}
            print(f"{replicas} replica(s), {clients} clients: {json.dumps(runs[clients])}")
    return runs


def router_conn(model: Model) -> Conn:
    """A keep-alive HTTPS connection to the router sending CML's call."""
    headers = model.headers()
    host = headers.pop("Host")
    body = model.body().encode()
    return Conn(model.port, host, None, tls=True, method="POST", body=body, headers=headers)


def router_overhead(model: Model) -> dict[str, float]:
    (endpoint,) = model.ready_endpoints()
    direct_port = int(endpoint.rsplit(":", 1)[1])
    through = router_conn(model)
    direct = Conn(
        direct_port,
        f"127.0.0.1:{direct_port}",
        None,
        tls=False,
        method="POST",
        body=json.dumps({"request": REQUEST}).encode(),
        headers={"Content-Type": "application/json"},
    )
    times: dict[str, list[float]] = {"router": [], "direct": []}
    web = web_pid(model.supervisor)
    try:
        for _ in range(200):  # warm-up
            through.request("/model")
            direct.request("/model")
        cpu_before = cpu_seconds(web)
        for i in range(REQUESTS):
            pair = [("router", through), ("direct", direct)]
            for name, conn in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                conn.request("/model")
                times[name].append((time.perf_counter() - t0) * 1000)
        web_cpu_ms = (cpu_seconds(web) - cpu_before) * 1000 / REQUESTS
    finally:
        through.close()
        direct.close()
    return {
        "web_cpu_ms": web_cpu_ms,
        "router_p50": statistics.median(times["router"]),
        "direct_p50": statistics.median(times["direct"]),
        "router_p99": percentile(times["router"], 0.99),
        "direct_p99": percentile(times["direct"], 0.99),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (the web tier has no children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile_router(model: Model, out: Path) -> None:
    """py-spy samples the web tier (``PROFILE_S`` s, 250 Hz, on CPU only, with native
    frames) while one client
    calls through the router in a loop; prints where the web tier's CPU time went."""
    pid = str(web_pid(model.supervisor))
    args = [str(PY_SPY), "record", "-p", pid, "-r", "250", "-d", str(PROFILE_S), "-f", "raw"]
    args += ["-o", str(out), "--native"]  # native frames: OpenSSL, the event loop's C code
    spy = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    conn = router_conn(model)
    calls, t0 = 0, time.perf_counter()
    try:
        while spy.poll() is None:
            conn.request("/model")
            calls += 1
    finally:
        conn.close()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode})")
    elapsed = time.perf_counter() - t0
    print(f"{calls} calls in {elapsed:.1f} s ({elapsed / calls * 1000:.3f} ms each)")
    summarize_profile(out)


def summarize_profile(path: Path, top: int = 40) -> None:
    """Inclusive and own samples per function of a py-spy raw (collapsed stacks) file."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [re.sub(r" \(.*/(site-packages|src)/", " (", f) for f in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    print(f"{total} samples")
    for title, table in (("inclusive", inclusive), ("own", own)):
        print(f"-- {title}")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{count / total * 100:5.1f}%  {frame}")


@dataclass
class Load:
    """REDEPLOY_CLIENTS async keep-alive clients calling the model in a loop on a thread of
    their own, counting answers that are not 200 and connection errors."""

    model: Model
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    async def _run(self) -> None:
        async with httpx.AsyncClient(
            verify=False,
            timeout=60,
            limits=httpx.Limits(max_connections=REDEPLOY_CLIENTS),
        ) as client:
            await asyncio.gather(*(self._client(client) for _ in range(REDEPLOY_CLIENTS)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        url = f"https://127.0.0.1:{self.model.port}/model"
        body, headers = self.model.body(), self.model.headers()
        while not self._stop.is_set():
            try:
                answer = await client.post(url, content=body, headers=headers)
                if answer.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{answer.status_code} {answer.text[:200]}")
            except httpx.HTTPError as exc:
                self.failed.append(repr(exc))


def redeploy_under_load(model: Model, serving_build: int, replicas: int) -> dict[str, Any]:
    """A new build deployed over the serving one, then the serving build again (a
    rollback), under load; the clients keep calling until the replaced replicas stopped."""
    model.write(CHANGED_FILE % 3)
    new_build = model.build()
    t0 = time.perf_counter()
    with Load(model) as load:
        time.sleep(2)
        for build in (new_build, serving_build):
            old = model.deployments[-1]
            number = model.deploy(build, replicas)
            model.wait_state(number, "serving")
            model.wait_state(old, "stopped", timeout=120)
        time.sleep(2)
    return {
        "ok": load.ok,
        "failed": len(load.failed),
        "examples": load.failed[:5],
        "seconds": time.perf_counter() - t0,
    }


# ---- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    load_before: float = 0.0
    load_after: float = 0.0
    started: float = field(default_factory=time.time)
    build_s: float = 0.0
    deploy_s: float = 0.0
    change_s: float = 0.0
    change_build_s: float = 0.0
    throughput: dict[int, dict[int, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)
    redeploy: dict[str, Any] = field(default_factory=dict)
    mlflow: str = ""


def measure(model: Model, python: Path, work: Path, run: Run) -> None:
    mlflow_model = save_mlflow_model(python, work)
    t0 = time.perf_counter()
    first_build = model.build()
    run.build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.deploy(first_build, 1)
    run.deploy_s = model.first_call(t0)
    print(f"build {run.build_s:.1f} s; deploy to first call {run.deploy_s:.2f} s", flush=True)
    model.wait_state(model.deployments[-1], "serving")

    run.overhead = router_overhead(model)
    print(f"router overhead: {json.dumps(run.overhead)}", flush=True)
    run.throughput[1] = throughput(model, python, mlflow_model, 1, work / "mlflow.log")

    scaled = model.http.post(f"{model.path}/scale", json={"replicas": 2})
    scaled.raise_for_status()
    wait_until(lambda: len(model.ready_endpoints()) == 2, 300, "two ready replicas")
    time.sleep(2)  # the router re-reads its routes every second
    run.throughput[2] = throughput(model, python, mlflow_model, 2, work / "mlflow.log")

    # A code change: written, built and deployed, until the new code answers.
    t0 = time.perf_counter()
    model.write(CHANGED_FILE % 2)
    changed_build = model.build()
    run.change_build_s = time.perf_counter() - t0
    model.deploy(changed_build, 2)
    run.change_s = model.first_call(t0, code_version=2)
    print(f"code change built and deployed in {run.change_s:.2f} s", flush=True)
    model.wait_state(model.deployments[-1], "serving")
    model.wait_state(model.deployments[-2], "stopped", timeout=120)

    run.redeploy = redeploy_under_load(model, changed_build, 2)
    print(f"redeploy under load: {json.dumps(run.redeploy)}", flush=True)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the builder's and the runner's sandboxes need it")
    base_archive(progress=True)  # the builder's base image, made once into the cache
    if "--profile-router" in sys.argv:  # no results: where the router's time goes
        with tempfile.TemporaryDirectory(prefix="kiln-bench-models-") as tmp_name:
            try:
                with kiln_model(Path(tmp_name)) as model:
                    model.deploy(model.build(), 1)
                    model.wait_state(model.deployments[-1], "serving")
                    profile_router(model, Path(tempfile.gettempdir()) / "kiln-model-router.pyspy")
            finally:
                unmount_below(Path(tmp_name))
        return
    python = mlflow_python()
    run = Run(load_before=os.getloadavg()[0], mlflow=mlflow_version(python))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-models-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with kiln_model(tmp) as model:
                measure(model, python, tmp, run)
        finally:
            unmount_below(tmp)  # the project's own filesystem
    run.load_after = os.getloadavg()[0]
    results = report(run)
    for row in results:
        print(json.dumps(row))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def report(run: Run) -> list[dict[str, Any]]:
    minutes = (time.time() - run.started) / 60
    machine = (
        f"{os.cpu_count()} cores shared by Kiln (web tier, runner, builder, the replicas' "
        f"sandboxes), mlflow, the load generator, and by other work on the machine (a busy "
        f"shared machine: other engineers' builds and test runs; 1-minute load average "
        f"{run.load_before:.1f} at the start, {run.load_after:.1f} at the end; the run took "
        f"{minutes:.0f} min); kiln up on SQLite, one web worker. Kiln {version('kiln')} (git "
        f"{git_head()}), uvicorn {version('uvicorn')}; mlflow {run.mlflow} (its own "
        f"virtualenv, --env-manager local); wrk {wrk_version()}; Python "
        f"{platform.python_version()}, Linux {platform.release()}"
    )
    kiln_side = (
        "Kiln: POST https://modelservice.kiln.localhost/model with CML's body "
        '{"accessKey", "request": {"a": 1, "b": 2}} and a Bearer model API key (HTTPS, auth '
        "checked, decision cached 2 s), the model server's default threads mode (4 calls at "
        "once per replica)"
    )
    results: list[dict[str, Any]] = []
    for replicas, runs in run.throughput.items():
        for clients, pair in runs.items():
            kiln, peer = pair["kiln"], pair["mlflow"]
            results.append(
                {
                    "metric": "model_rps_ratio_vs_mlflow",
                    "unit": "requests/s",
                    "value": round(kiln["rps"], 1),
                    "target": TARGETS["model_rps_ratio_vs_mlflow"],
                    "peer": (
                        f"mlflow models serve --env-manager local -w {replicas} of the same "
                        "function as a pyfunc model, POST /invocations "
                        '{"dataframe_records": [{"a": 1, "b": 2}]} over plain HTTP'
                    ),
                    "peer_value": round(peer["rps"], 1),
                    "ratio": round(kiln["rps"] / peer["rps"], 2),
                    "conditions": (
                        f"{replicas} replica(s) / {replicas} mlflow worker(s), {clients} "
                        f"concurrent keep-alive clients: wrk -t2 -c{clients} -d{DURATION_S}s "
                        f"--timeout {WRK_TIMEOUT_S}s with the same Lua POST script both "
                        f"sides, after an unmeasured run of the same length each; Kiln then "
                        f"mlflow. Kiln p50 {kiln['p50_ms']:.1f} ms, p99 {kiln['p99_ms']:.1f} ms, "
                        f"{kiln['requests']} calls, {kiln['status_errors']} non-2xx, "
                        f"{kiln['socket_errors']} socket errors; mlflow p50 "
                        f"{peer['p50_ms']:.1f} ms, p99 {peer['p99_ms']:.1f} ms, "
                        f"{peer['requests']} calls, {peer['status_errors']} non-2xx, "
                        f"{peer['socket_errors']} socket errors. {kiln_side}. {machine}"
                    ),
                }
            )
    o = run.overhead
    results.append(
        {
            "metric": "router_overhead_p50",
            "unit": "ms",
            "value": round(o["router_p50"] - o["direct_p50"], 3),
            "target": TARGETS["router_overhead_p50"],
            "peer": (
                "the same call straight at the replica's host-side port (the runner's port "
                'forward into the sandbox), plain HTTP, {"request": ...} as the router '
                "forwards it, in the same run"
            ),
            "peer_value": round(o["direct_p50"], 3),
            "ratio": round(o["router_p50"] / o["direct_p50"], 2),
            "conditions": (
                f"One sequential keep-alive client (a minimal HTTP/1.1 client over a socket, "
                f"the same both ways), 1 replica, {REQUESTS} calls each way after 200 warm-up, "
                f"alternating; through the router: HTTPS (TLS is part of the overhead), CML's "
                f"body and a Bearer model API key. p50 through the router "
                f"{o['router_p50']:.3f} ms, direct {o['direct_p50']:.3f} ms; p99 "
                f"{o['router_p99']:.3f} vs {o['direct_p99']:.3f} ms. The web tier's own CPU "
                f"time per call through the router (its user+system time over the measured "
                f"calls, /proc): {o['web_cpu_ms']:.3f} ms. {machine}"
            ),
        }
    )
    r = run.redeploy
    results.append(
        {
            "metric": "redeploy_failed_requests",
            "unit": "requests",
            "value": r["failed"],
            "target": TARGETS["redeploy_failed_requests"],
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "conditions": (
                f"{REDEPLOY_CLIENTS} async keep-alive httpx clients calling through the router "
                f"in a loop (no pause) for {r['seconds']:.0f} s while a new build (a code "
                f"change) was deployed over the serving one (2 replicas) and then the previous "
                f"build again (a rollback), each until its replaced replicas had stopped: "
                f"{r['ok']} calls answered 200, {r['failed']} not (non-2xx or connection "
                f"errors){': ' + '; '.join(r['examples']) if r['examples'] else ''}. "
                f"{machine}"
            ),
        }
    )
    results.append(
        {
            "metric": "deploy_to_first_call",
            "unit": "s",
            "value": round(run.deploy_s, 2),
            "target": None,
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "conditions": (
                "POST .../models/adder/deployments of an existing build (built just before "
                f"in {run.build_s:.1f} s; the model's first deployment, so the runner also "
                "unpacked the image), 1 replica, until the first 200 through the router "
                f"(calls every 20 ms). {machine}"
            ),
        }
    )
    results.append(
        {
            "metric": "deploy_to_first_call_code_change",
            "unit": "s",
            "value": round(run.change_s, 2),
            "target": None,
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "conditions": (
                "A code change of model.py written through the files API, then POST .../builds "
                f"(the build succeeded after {run.change_build_s:.1f} s), then POST "
                ".../deployments of it with 2 replicas over the serving deployment, until the "
                f"first 200 answered by the new code (calls every 20 ms). {machine}"
            ),
        }
    )
    return results


def git_head() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).split()[1] if (out.stdout + out.stderr).split() else "?"


if __name__ == "__main__":
    main()
