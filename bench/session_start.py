"""Session start latency: API request → terminal ready, and → JupyterLab ready, against
JupyterHub spawning the same JupyterLab.

Kiln runs as `kiln up` (web tier + runner, SQLite) on a temp data directory; one user (the
site admin, through an API key) starts sessions of one project, one at a time (stopping each
before the next: the default quota is 2 vCPU and a session takes 1).

* Terminal: t0 = POST .../sessions {"editor": "terminal"} sent; the POST answers once the
  sandbox runs; then the terminal WebSocket is opened and "ready" is the first byte of shell
  output (the prompt) arriving.
* JupyterLab: t0 = POST .../sessions {"editor": "jupyterlab"} sent; then GET the session every
  POLL_S until it is ``running`` (the web tier calls it running once JupyterLab answers
  inside the sandbox: the timeline's "jupyterlab ready"); then the hand-off a browser does
  (GET .../open → /_kiln/auth on ``<id>.kiln.localhost``) and "ready" is the first 200 from
  ``/api/status`` through Kiln's session proxy.
* Peer: JupyterHub (pip-installed into its own venv, with the same JupyterLab and
  jupyter_server versions as Kiln's), DummyAuthenticator, LocalProcessSpawner running
  ``jupyterhub-singleuser`` as a system user, configurable-http-proxy in front; a service API
  token. t0 = POST /hub/api/users/{name}/server sent; GET /hub/api/users/{name} every POLL_S
  until its server is ``ready``; "ready" is the first 200 from ``/user/{name}/api/status``
  through JupyterHub's proxy. DELETE between starts.

One unmeasured warm-up start of each kind comes first (cold page cache, first imports).

Run:  .venv/bin/python bench/session_start.py   (as root: the runner's sandboxes need it)
Needs: /tmp/jhub-sys (or KILN_BENCH_JUPYTERHUB_VENV) with jupyterhub installed, on a Python
the spawned system user can run (not one under root's 0700 home, such as pyenv's), and
configurable-http-proxy on PATH:
  /usr/bin/python3 -m venv /tmp/jhub-sys
  /tmp/jhub-sys/bin/pip install jupyterhub jupyterlab==<Kiln's> jupyter_server==<Kiln's>
  npm install -g configurable-http-proxy
Writes bench/results/session_start.json.
"""

from __future__ import annotations

import json
import math
import os
import platform
import pwd
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from api_latency import free_port, wait_ready  # the sibling benchmark
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "session_start.json"
STARTS = int(os.environ.get("KILN_BENCH_STARTS", "20"))
POLL_S = 0.05  # both systems are polled at this interval
TERMINAL_TARGET_MS = 300.0
JUPYTERLAB_TARGET_MS = 3000.0
JHUB_VENV = Path(os.environ.get("KILN_BENCH_JUPYTERHUB_VENV", "/tmp/jhub-sys"))
JHUB_USER = "kilnbench"
ADMIN, ADMIN_PASSWORD = "benchadmin", "bench-admin-pw-" + secrets.token_hex(4)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(POLL_S)
    raise RuntimeError(f"timed out waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group it leads (it was started in a new session), then KILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# ---- Kiln ----------------------------------------------------------------------------------


class Kiln:
    def __init__(self, base: str, port: int, key: str, project: str) -> None:
        self.base, self.port, self.key = base, port, key
        self.sessions = f"/api/v1/projects/{project}/sessions"
        self.http = httpx.Client(
            base_url=base, verify=False, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def start(self, editor: str) -> dict[str, Any]:
        response = self.http.post(self.sessions, json={"editor": editor})
        if response.status_code != 201:
            raise RuntimeError(f"start {editor}: {response.status_code} {response.text}")
        body: dict[str, Any] = response.json()
        if body["state"] in ("failed", "stopped", "queued"):
            raise RuntimeError(f"start {editor}: {json.dumps(body)}")
        return body

    def get(self, session_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"{self.sessions}/{session_id}").json()
        return body

    def stop(self, session_id: str) -> None:
        response = self.http.delete(f"{self.sessions}/{session_id}")
        if response.status_code == 409 and "already ended" in response.text:
            return  # it failed on its own: the caller reports why
        if response.status_code != 200 or response.json()["state"] not in ("stopped", "failed"):
            raise RuntimeError(f"stop: {response.status_code} {response.text}")

    def first_terminal_output(self, session_id: str) -> int:
        """Open the terminal and wait for the shell's first output; how many bytes came."""
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        url = f"wss://127.0.0.1:{self.port}{self.sessions}/{session_id}/terminal"
        headers = {"Authorization": f"Bearer {self.key}"}
        with connect(url, ssl=tls, additional_headers=headers, open_timeout=10) as ws:
            while True:
                message = ws.recv(timeout=10)
                if isinstance(message, bytes) and message:
                    return len(message)

    def jupyterlab_status(self, session: dict[str, Any]) -> int:
        """The browser's way in: the hand-off, then /api/status through the session proxy."""
        opened = self.http.get(session["editor_url"])
        if opened.status_code != 303:
            raise RuntimeError(f"open: {opened.status_code} {opened.text}")
        token = parse_qs(urlsplit(opened.headers["location"]).query)["token"][0]
        host = {"Host": f"{session['id']}.kiln.localhost:{self.port}"}
        with httpx.Client(base_url=self.base, verify=False, timeout=30) as proxy:
            auth = proxy.get(f"/_kiln/auth?token={token}", headers=host)
            if auth.status_code != 303:
                raise RuntimeError(f"hand-off: {auth.status_code} {auth.text}")
            cookie = auth.headers["set-cookie"].split(";", 1)[0]
            status = proxy.get("/api/status", headers={**host, "Cookie": cookie})
            return status.status_code


def timeline_offsets(session: dict[str, Any]) -> dict[str, float]:
    """Each timeline message's time after the first entry, in ms."""
    events = session["timeline"]
    first = datetime.fromisoformat(events[0]["at"])
    return {
        e["message"]: (datetime.fromisoformat(e["at"]) - first).total_seconds() * 1000
        for e in events
    }


def measure_terminal(kiln: Kiln) -> dict[str, float]:
    t0 = time.perf_counter()
    session = kiln.start("terminal")
    t_post = time.perf_counter()
    if session["state"] != "running":
        raise RuntimeError(f"terminal session not running after POST: {json.dumps(session)}")
    kiln.first_terminal_output(session["id"])
    t_ready = time.perf_counter()
    kiln.stop(session["id"])
    return {"ready_ms": (t_ready - t0) * 1000, "post_ms": (t_post - t0) * 1000}


def measure_jupyterlab(kiln: Kiln) -> dict[str, float]:
    t0 = time.perf_counter()
    session = kiln.start("jupyterlab")
    t_post = time.perf_counter()
    sid = session["id"]

    def running() -> dict[str, Any] | None:
        body = kiln.get(sid)
        if body["state"] not in ("starting", "running"):
            raise RuntimeError(f"jupyterlab session {body['state']}: {json.dumps(body)}")
        return body if body["state"] == "running" else None

    try:
        session = wait_until(running, 120, "the JupyterLab session to run")
        t_running = time.perf_counter()
        status = 0
        while status != 200:
            status = kiln.jupyterlab_status(session)
            if status != 200:
                time.sleep(POLL_S)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"/api/status through the proxy: {status}")
        t_ready = time.perf_counter()
    finally:
        kiln.stop(sid)
    offsets = timeline_offsets(session)
    return {
        "ready_ms": (t_ready - t0) * 1000,
        "post_ms": (t_post - t0) * 1000,
        "running_ms": (t_running - t0) * 1000,
        "timeline_sandbox_ms": offsets.get("sandbox started", math.nan),
        "timeline_lab_ms": offsets.get("jupyterlab ready", math.nan),
    }


@dataclass(frozen=True)
class RunningKiln:
    base: str
    port: int
    key: str  # the first admin's API key
    pid: int


@contextmanager
def running_kiln(data_dir: Path, **env: str) -> Iterator[RunningKiln]:
    """``kiln up`` on SQLite in ``data_dir`` (its output in kiln-up.log beside it), up and
    answering, with an API key of its first admin; stopped at the end."""
    port = free_port()
    full_env = dict(
        os.environ,
        KILN_DATABASE_URL=f"sqlite:///{data_dir / 'kiln.db'}",
        KILN_ADMIN_USERNAME=ADMIN,
        KILN_ADMIN_PASSWORD=ADMIN_PASSWORD,
        **env,
    )
    log = (data_dir.parent / "kiln-up.log").open("wb")
    port_args = ("--port", str(port))
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "kiln"), "up", "--data-dir", str(data_dir), *port_args],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"https://127.0.0.1:{port}"
        wait_ready(f"{base}/api/v1/openapi.json")
        made = httpx.post(
            f"{base}/api/v1/auth/api-keys",
            auth=(ADMIN, ADMIN_PASSWORD),
            json={"name": "bench"},
            verify=False,
        )
        made.raise_for_status()
        yield RunningKiln(base, port, made.json()["key"], proc.pid)
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def kiln_up(data_dir: Path) -> Iterator[Kiln]:
    with running_kiln(data_dir) as up:
        project = httpx.post(
            f"{up.base}/api/v1/projects",
            headers={"Authorization": f"Bearer {up.key}"},
            json={"name": "bench"},
            verify=False,
        )
        project.raise_for_status()
        made_project = project.json()
        kiln = Kiln(up.base, up.port, up.key, f"{made_project['owner']}/{made_project['slug']}")
        yield kiln
        kiln.http.close()


# ---- JupyterHub ----------------------------------------------------------------------------

JHUB_CONFIG = """
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{tmp}/proxy.pid"
c.JupyterHub.db_url = "sqlite:///{tmp}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/cookie_secret"
c.JupyterHub.pid_file = "{tmp}/hub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{"{user}"}}
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = ["{venv}/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.JupyterHub.services = [{{"name": "bench", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [
    {{"name": "bench", "scopes": ["admin:users", "admin:servers", "access:servers"],
      "services": ["bench"]}}
]
c.JupyterHub.log_level = "WARN"
"""


class Hub:
    def __init__(self, base: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"token {token}"}, timeout=60
        )

    def measure(self) -> dict[str, float]:
        t0 = time.perf_counter()
        posted = self.http.post(f"/hub/api/users/{JHUB_USER}/server")
        t_post = time.perf_counter()
        if posted.status_code not in (201, 202):
            raise RuntimeError(f"spawn: {posted.status_code} {posted.text}")
        try:

            def ready() -> bool:
                user = self.http.get(f"/hub/api/users/{JHUB_USER}").json()
                server = user.get("servers", {}).get("")
                return bool(server and server.get("ready"))

            wait_until(ready, 120, "the JupyterHub server to be ready")
            t_running = time.perf_counter()
            wait_until(
                lambda: self.http.get(f"/user/{JHUB_USER}/api/status").status_code == 200,
                120,
                "/api/status through JupyterHub's proxy",
            )
            t_ready = time.perf_counter()
        finally:
            self.stop()
        return {
            "ready_ms": (t_ready - t0) * 1000,
            "post_ms": (t_post - t0) * 1000,
            "running_ms": (t_running - t0) * 1000,
        }

    def stop(self) -> None:
        self.http.delete(f"/hub/api/users/{JHUB_USER}/server")

        def stopped() -> bool:
            user = self.http.get(f"/hub/api/users/{JHUB_USER}").json()
            return not user.get("servers") and user.get("pending") is None

        wait_until(stopped, 60, "the JupyterHub server to stop")


@contextmanager
def system_user() -> Iterator[None]:
    """LocalProcessSpawner runs the server as a system user: make one, and remove it after."""
    try:
        pwd.getpwnam(JHUB_USER)
        created = False
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", JHUB_USER], check=True)
        created = True
    try:
        yield
    finally:
        if created:
            subprocess.run(["userdel", "-r", JHUB_USER], check=False, capture_output=True)


@contextmanager
def jupyterhub(tmp: Path) -> Iterator[Hub]:
    tmp.mkdir()
    token = secrets.token_hex(24)
    port = free_port()
    (tmp / "jupyterhub_config.py").write_text(
        JHUB_CONFIG.format(
            port=port,
            hub_port=free_port(),
            proxy_api_port=free_port(),
            tmp=tmp,
            user=JHUB_USER,
            venv=JHUB_VENV,
            token=token,
        )
    )
    log = (tmp / "jupyterhub.log").open("wb")
    env = dict(os.environ, PATH=f"{JHUB_VENV / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        [str(JHUB_VENV / "bin" / "jupyterhub"), "-f", str(tmp / "jupyterhub_config.py")],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/hub/api/")

        def hub_routed() -> bool:  # the proxy answers 404 until the hub has added its route
            return httpx.get(f"{base}/hub/api/", timeout=5).status_code == 200

        wait_until(hub_routed, 60, "JupyterHub's API behind its proxy")
        hub = Hub(base, token)
        created = hub.http.post(f"/hub/api/users/{JHUB_USER}")
        if created.status_code not in (201, 409):
            raise RuntimeError(f"create hub user: {created.status_code} {created.text}")
        yield hub
        hub.http.close()
    except BaseException:
        log.flush()
        print((tmp / "jupyterhub.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        stop_process(proc)
        log.close()


# ---- the run -------------------------------------------------------------------------------


def run_series(name: str, once: Callable[[], dict[str, float]]) -> list[dict[str, float]]:
    once()  # warm-up, not counted
    samples = []
    for i in range(STARTS):
        sample = once()
        samples.append(sample)
        print(f"{name} {i + 1}/{STARTS}: " + ", ".join(f"{k}={v:.0f}" for k, v in sample.items()))
    return samples


def run_paired(
    kiln: Callable[[], dict[str, float]], hub: Callable[[], dict[str, float]]
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Kiln's and JupyterHub's JupyterLab starts taken in turns (who goes first alternates), so
    both see the same background load on a shared machine; each is idle while the other
    measures."""
    kiln(), hub()  # warm-ups, not counted
    kiln_samples, hub_samples = [], []
    for i in range(STARTS):
        order = ((kiln, kiln_samples, "kiln"), (hub, hub_samples, "jupyterhub"))
        for once, samples, name in order if i % 2 == 0 else order[::-1]:
            sample = once()
            samples.append(sample)
            shown = ", ".join(f"{k}={v:.0f}" for k, v in sample.items())
            print(f"{name} jupyterlab {i + 1}/{STARTS}: {shown}")
    return kiln_samples, hub_samples


def summary(samples: list[dict[str, float]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples if not math.isnan(s[key])]
    return {
        "p50": round(statistics.median(values), 1),
        "p95": round(percentile(values, 0.95), 1),
    }


def pkg(venv_python: Path, name: str) -> str:
    code = f"from importlib.metadata import version; print(version({name!r}))"
    out = subprocess.run(
        [
            str(venv_python),
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the runner's sandboxes and LocalProcessSpawner's setuid need it")
    if not (JHUB_VENV / "bin" / "jupyterhub").exists():
        sys.exit(f"no JupyterHub at {JHUB_VENV}: see this script's docstring")
    if not shutil.which("configurable-http-proxy"):
        sys.exit("configurable-http-proxy is needed: npm install -g configurable-http-proxy")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "data").mkdir()
        with kiln_up(tmp / "data") as kiln, system_user(), jupyterhub(tmp / "jhub") as hub:
            terminal = run_series("kiln terminal", lambda: measure_terminal(kiln))
            lab, peer = run_paired(lambda: measure_jupyterlab(kiln), hub.measure)

    jhub_python = JHUB_VENV / "bin" / "python"
    versions = (
        f"Kiln {version('kiln')} (git {git_head()}), JupyterLab {version('jupyterlab')}, "
        f"jupyter_server {version('jupyter_server')} in Kiln's venv; JupyterHub "
        f"{pkg(jhub_python, 'jupyterhub')} with JupyterLab {pkg(jhub_python, 'jupyterlab')}, "
        f"jupyter_server {pkg(jhub_python, 'jupyter_server')}, configurable-http-proxy "
        f"{chp_version()}; Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}"
    )
    machine = (
        f"{os.cpu_count()} cores shared by Kiln, JupyterHub and this client and by other work "
        f"on the machine (1-minute load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} after); {STARTS} starts each after one unmeasured warm-up, "
        "one at a time, each stopped (DELETE, waited for) before the next; Kiln's and "
        "JupyterHub's JupyterLab starts taken in turns (alternating who goes first), both "
        "services up throughout; "
        f"polling every {POLL_S * 1000:.0f} ms"
    )
    lab_running = summary(lab, "running_ms")
    hub_running = summary(peer, "running_ms")
    lab_timeline = (
        f"Kiln's own timeline (median): sandbox started "
        f"{summary(lab, 'timeline_sandbox_ms')['p50']:.0f} ms, jupyterlab ready "
        f"{summary(lab, 'timeline_lab_ms')['p50']:.0f} ms after queued; the API said running "
        f"after {lab_running['p50']:.0f} ms (p50) vs JupyterHub's server ready after "
        f"{hub_running['p50']:.0f} ms (p50)"
    )
    peer_desc = (
        "JupyterHub: POST /hub/api/users/{name}/server → first 200 from /user/{name}/api/status "
        "through configurable-http-proxy (LocalProcessSpawner, jupyterhub-singleuser, no sandbox)"
    )
    terminal_cond = (
        "Kiln: POST .../sessions {editor: terminal} (answers once the bubblewrap sandbox runs) "
        "→ terminal WebSocket opened → first byte of shell output, as the site admin with an "
        "API key over HTTPS; kiln up on SQLite. The peer is JupyterHub's spawn (its way to a "
        "shell is the terminal of the JupyterLab it spawns, so its terminal is at best as fast "
        f"as that): not the same work, shown for scale. Median POST alone: "
        f"{summary(terminal, 'post_ms')['p50']:.0f} ms. {machine}. {versions}"
    )
    lab_cond = (
        "Kiln: POST .../sessions {editor: jupyterlab} → GET the session until running (Kiln's "
        "readiness probe saw JupyterLab answer inside the sandbox) → hand-off (GET .../open, "
        "/_kiln/auth on <id>.kiln.localhost) → first 200 from /api/status through Kiln's "
        f"session proxy; kiln up on SQLite. {lab_timeline}. Same JupyterLab version on both "
        f"sides. {machine}. {versions}"
    )
    results = []
    peer_ready = summary(peer, "ready_ms")
    for q in ("p50", "p95"):
        term = summary(terminal, "ready_ms")[q]
        results.append(
            entry(
                f"session_start_terminal_ready_{q}",
                term,
                TERMINAL_TARGET_MS if q == "p50" else None,
                peer_desc,
                peer_ready[q],
                terminal_cond,
            )
        )
    for q in ("p50", "p95"):
        results.append(
            entry(
                f"session_start_jupyterlab_ready_{q}",
                summary(lab, "ready_ms")[q],
                JUPYTERLAB_TARGET_MS if q == "p50" else None,
                peer_desc,
                peer_ready[q],
                lab_cond,
            )
        )
    for row in results:
        print(json.dumps(row))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def entry(
    metric: str, value: float, target: float | None, peer: str, peer_value: float, cond: str
) -> dict[str, Any]:
    return {
        "metric": metric,
        "unit": "ms",
        "value": value,
        "target": target,
        "peer": peer,
        "peer_value": peer_value,
        "ratio": round(value / peer_value, 2) if peer_value else None,
        "conditions": cond,
    }


def git_head() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def chp_version() -> str:
    out = subprocess.run(["configurable-http-proxy", "--version"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    main()
