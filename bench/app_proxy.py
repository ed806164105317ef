"""The application proxy's cost: the same requests through Kiln's proxy and straight at the
app, in one run.

Kiln runs as `kiln up` (web tier + runner, SQLite) on a temp data directory. One project
holds two applications from ``tests/apps``: a trivial WSGI app under gunicorn (2 workers x 8
threads, keep-alive) and a WebSocket echo server (the ``websockets`` library). Each request
goes either through the proxy — HTTPS to the web tier with the application's Host name and
the access cookie a browser gets from the sign-in hand-off — or straight at the host-side
port the proxy itself connects to (the runner's port forward into the sandbox; plain HTTP).

* ``app_proxy_overhead_p50``: one sequential keep-alive client (so queueing does not count),
  ``GET /`` (2-byte answer); requests alternate proxy / direct; p50(proxy) - p50(direct). The
  client is a minimal HTTP/1.1 client over a socket (the same code both ways), so its own
  cost is small and equal on both sides; TLS is part of the proxy's cost.
* ``app_proxy_ws_overhead_p50``: one WebSocket each way, sequential 32-byte text round trips,
  alternating; p50 difference.
* ``app_proxy_rps_ratio``: wrk, 50 keep-alive connections, 2 threads, ``GET /`` for
  DURATION_S, proxy then direct; requests/s through the proxy ÷ direct.
* ``app_proxy_stream_rss_growth``: the web tier's resident memory (VmRSS of the `kiln web`
  process) sampled every 50 ms while one client reads a 1 GiB answer through the proxy;
  the highest sample minus the one before.

Run:  .venv/bin/python bench/app_proxy.py   (as root: the runner's sandboxes need it;
needs `wrk`: apt-get install wrk). Writes bench/results/app_proxy.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from api_latency import free_port  # the sibling benchmark
from session_start import running_kiln
from sqlalchemy import create_engine, text
from websockets.sync.client import connect

from kiln.storage.volumes import unmount_below

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "app_proxy.json"
APPS = ROOT / "tests" / "apps"
REQUESTS = int(os.environ.get("KILN_BENCH_REQUESTS", "3000"))
ROUND_TRIPS = int(os.environ.get("KILN_BENCH_ROUND_TRIPS", "3000"))
DURATION_S = int(os.environ.get("KILN_BENCH_DURATION", "15"))
CLIENTS = 50
STREAM_MB = 1024
ADMIN, ADMIN_PASSWORD = "benchadmin", "bench-admin-pw-" + secrets.token_hex(4)
TARGETS = {
    "app_proxy_overhead_p50": 1.0,
    "app_proxy_ws_overhead_p50": 1.0,
    "app_proxy_rps_ratio": 0.5,
    "app_proxy_stream_rss_growth": 50.0,
}


# ---- a minimal keep-alive HTTP/1.1 client ---------------------------------------------------


class Conn:
    """One keep-alive connection sending a fixed request (a GET, or ``method`` with ``body``
    and extra ``headers``) and reading Content-Length answers. Also used by
    bench/model_serving.py."""

    def __init__(
        self,
        port: int,
        host_header: str,
        cookie: str | None,
        tls: bool,
        method: str = "GET",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            raw = context.wrap_socket(raw, server_hostname=host_header.split(":")[0])
        self.sock = raw
        lines = [f"{method} {{path}} HTTP/1.1", f"Host: {host_header}", "User-Agent: kiln-bench"]
        if cookie:
            lines.append(f"Cookie: {cookie}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method != "GET":
            lines.append(f"Content-Length: {len(body)}")
        self.template = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.body = body
        self.buffer = b""

    def request(self, path: str = "/", sink: bool = False) -> int:
        """One request; returns the body's size (read and dropped when ``sink``)."""
        self.sock.sendall(self.template.replace(b"{path}", path.encode()) + self.body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"{path}: {head.decode(errors='replace')[:300]}")
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if match is None:
            raise RuntimeError(f"{path}: no Content-Length in {head[:300]!r}")
        length = int(match.group(1))
        if sink:  # count the body as it arrives, keep none of it
            remaining = length - len(rest)
            while remaining > 0:
                remaining -= len(self._recv())
            self.buffer = b""
            return length
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return length

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise RuntimeError("connection closed")
        return data

    def close(self) -> None:
        self.sock.close()


# ---- Kiln ----------------------------------------------------------------------------------


class Site:
    def __init__(self, base: str, port: int, key: str, data_dir: Path, proc_pid: int) -> None:
        self.base, self.port, self.data_dir, self.pid = base, port, data_dir, proc_pid
        self.http = httpx.Client(
            base_url=base, verify=False, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def web_pid(self) -> int:
        return web_pid(self.pid)

    def endpoint(self, instance: str) -> int:
        """The host-side port the proxy connects to for ``instance`` (from the database)."""
        engine = create_engine(f"sqlite:///{self.data_dir / 'kiln.db'}")
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT endpoint FROM workloads WHERE id = :id"), {"id": instance}
            ).scalar_one()
        engine.dispose()
        return int(str(found).rsplit(":", 1)[1])

    def cookie(self, project: str, app: str) -> tuple[str, str]:
        """The browser's sign-in hand-off: (Host header of the app, its access cookie)."""
        opened = self.http.get(f"/api/v1/projects/{project}/applications/{app}/open")
        if opened.status_code != 303:
            raise RuntimeError(f"open: {opened.status_code} {opened.text}")
        location = urlsplit(opened.headers["location"])
        with httpx.Client(base_url=self.base, verify=False) as browser:
            answer = browser.get(
                f"{location.path}?{location.query}", headers={"Host": location.netloc}
            )
        if answer.status_code != 303:
            raise RuntimeError(f"hand-off: {answer.status_code} {answer.text}")
        return location.netloc, answer.headers["set-cookie"].split(";", 1)[0]


def web_pid(supervisor: int) -> int:
    """The `kiln web` process among the children of `kiln up` (``supervisor``), from /proc.
    Also used by bench/model_serving.py."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == supervisor and b"web" in cmdline:
            return int(entry)
    raise RuntimeError("no web tier process found under kiln up")


@contextmanager
def kiln_up(data_dir: Path) -> Iterator[Site]:
    with running_kiln(data_dir, KILN_RUNNER_PORT=str(free_port())) as up:
        site = Site(up.base, up.port, up.key, data_dir, up.pid)
        yield site
        site.http.close()


def start_apps(site: Site) -> tuple[str, dict[str, Any]]:
    project = site.http.post("/api/v1/projects", json={"name": "bench"})
    project.raise_for_status()
    path = f"{project.json()['owner']}/{project.json()['slug']}"
    for name in ("wsgi_app.py", "gunicorn_app.sh", "ws_echo.py"):
        written = site.http.put(
            f"/api/v1/projects/{path}/files/{name}", content=(APPS / name).read_bytes()
        )
        written.raise_for_status()
    apps = {"wsgi": "gunicorn_app.sh", "echo": "ws_echo.py"}
    for name, script in apps.items():
        body = {"name": name, "subdomain": f"bench-{name}", "script": script}
        site.http.post(f"/api/v1/projects/{path}/applications", json=body).raise_for_status()
    found: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while len(found) < len(apps):
        for name in apps:
            app = site.http.get(f"/api/v1/projects/{path}/applications/{name}").json()
            if app["state"] == "running":
                found[name] = app
            elif app["state"] in ("crashed", "crash-looping"):
                raise RuntimeError(f"{name}: {app['message']}\n{app['last_output']}")
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark's applications did not start")
        time.sleep(0.2)
    return path, found


# ---- measurements ----------------------------------------------------------------------------


def http_overhead(site: Site, host: str, cookie: str, direct_port: int) -> dict[str, float]:
    proxied = Conn(site.port, host, cookie, tls=True)
    direct = Conn(direct_port, f"127.0.0.1:{direct_port}", None, tls=False)
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    try:
        for _ in range(200):  # warm-up: connections, caches, the admission cache
            proxied.request()
            direct.request()
        for i in range(REQUESTS):
            pair = [("proxy", proxied), ("direct", direct)]
            for name, conn in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                conn.request()
                times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        proxied.close()
        direct.close()
    return {
        "proxy_p50": statistics.median(times["proxy"]),
        "direct_p50": statistics.median(times["direct"]),
        "proxy_p99": sorted(times["proxy"])[int(0.99 * len(times["proxy"]))],
        "direct_p99": sorted(times["direct"])[int(0.99 * len(times["direct"]))],
    }


def ws_overhead(site: Site, host: str, cookie: str, direct_port: int) -> dict[str, float]:
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", site.port))
    message = "x" * 32
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    with (
        connect(
            f"wss://{host}/",
            sock=sock,
            ssl=tls,
            additional_headers={"Cookie": cookie},
            origin=f"https://{host}",  # type: ignore[arg-type]
            compression=None,
        ) as proxied,
        connect(f"ws://127.0.0.1:{direct_port}/", compression=None) as direct,
    ):
        for _ in range(200):
            for ws in (proxied, direct):
                ws.send(message)
                ws.recv()
        for i in range(ROUND_TRIPS):
            pair = [("proxy", proxied), ("direct", direct)]
            for name, ws in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                ws.send(message)
                if ws.recv() != message:
                    raise RuntimeError("the echo did not echo")
                times[name].append((time.perf_counter() - t0) * 1000)
    return {
        "proxy_p50": statistics.median(times["proxy"]),
        "direct_p50": statistics.median(times["direct"]),
    }


def wrk(url: str, headers: dict[str, str]) -> dict[str, float]:
    args = ["wrk", "-t", "2", "-c", str(CLIENTS), "-d", f"{DURATION_S}s", "--timeout", "10s"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw error answers:\n{out}")
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = sum(map(int, socket_errors.groups())) if socket_errors else 0
    return {"rps": float(rps.group(1)), "socket_errors": float(errors)}


def stream_rss(site: Site, host: str, cookie: str) -> dict[str, float]:
    pid = site.web_pid()

    def rss_mb() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb())
            time.sleep(0.05)

    before = rss_mb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    conn = Conn(site.port, host, cookie, tls=True)
    t0 = time.perf_counter()
    try:
        size = conn.request(f"/big?mb={STREAM_MB}", sink=True)
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        conn.close()
    if size != STREAM_MB * 1024 * 1024:
        raise RuntimeError(f"streamed {size} bytes")
    return {
        "before_mb": before,
        "peak_mb": max(samples),
        "growth_mb": max(samples) - before,
        "seconds": elapsed,
        "mb_per_s": STREAM_MB / elapsed,
    }


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def git_commit() -> str:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return found.stdout.strip() or "unknown"


def measure(site: Site, project: str, apps: dict[str, Any]) -> tuple[dict[str, float], ...]:
    wsgi_host, wsgi_cookie = site.cookie(project, "wsgi")
    echo_host, echo_cookie = site.cookie(project, "echo")
    wsgi_port = site.endpoint(apps["wsgi"]["instance"]["id"])
    echo_port = site.endpoint(apps["echo"]["instance"]["id"])
    print("HTTP, one client ...", flush=True)
    http = http_overhead(site, wsgi_host, wsgi_cookie, wsgi_port)
    print(json.dumps(http), flush=True)
    print("WebSocket, one client ...", flush=True)
    ws = ws_overhead(site, echo_host, echo_cookie, echo_port)
    print(json.dumps(ws), flush=True)
    print(f"wrk, {CLIENTS} clients ...", flush=True)
    through = wrk(f"https://127.0.0.1:{site.port}/", {"Host": wsgi_host, "Cookie": wsgi_cookie})
    straight = wrk(f"http://127.0.0.1:{wsgi_port}/", {})
    print(json.dumps({"proxy": through, "direct": straight}), flush=True)
    print("1 GiB through the proxy ...", flush=True)
    stream = stream_rss(site, wsgi_host, wsgi_cookie)
    print(json.dumps(stream), flush=True)
    return http, ws, through, straight, stream


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the runner's sandboxes need it")
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-apps-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        try:
            with kiln_up(data_dir) as site:
                project, apps = start_apps(site)
                try:
                    http, ws, through, straight, stream = measure(site, project, apps)
                finally:  # sandboxes outlive `kiln up` by design: stop ours
                    for name in apps:
                        site.http.post(f"/api/v1/projects/{project}/applications/{name}/stop")
        finally:
            unmount_below(Path(tmp))  # the project's own filesystem
    write_results(http, ws, through, straight, stream, load_before, loadavg())


def write_results(
    http: dict[str, float],
    ws: dict[str, float],
    through: dict[str, float],
    straight: dict[str, float],
    stream: dict[str, float],
    load_before: str,
    load_after: str,
) -> None:
    machine = (
        f"{os.cpu_count()} cores shared by Kiln (web tier, runner, the apps' sandboxes) and the "
        f"client, and by other work on the machine (1-minute load average {load_before} before "
        f"the run, {load_after} after); kiln up on SQLite, one web worker. Kiln 0.1.0 (git "
        f"{git_commit()}), uvicorn {version('uvicorn')}, httpx {version('httpx')}, websockets "
        f"{version('websockets')}, gunicorn {version('gunicorn')}; Python "
        f"{platform.python_version()}, Linux {platform.release()}"
    )
    direct = "straight at the host-side port the proxy connects to (the runner's port forward "
    direct += "into the sandbox), plain HTTP, in the same run"
    results = [
        {
            "metric": "app_proxy_overhead_p50",
            "unit": "ms",
            "value": round(http["proxy_p50"] - http["direct_p50"], 3),
            "target": TARGETS["app_proxy_overhead_p50"],
            "peer": f"GET / of a trivial WSGI app (gunicorn) {direct}",
            "peer_value": round(http["direct_p50"], 3),
            "ratio": round(http["proxy_p50"] / http["direct_p50"], 2),
            "conditions": (
                f"One sequential keep-alive client (a minimal HTTP/1.1 client over a socket, "
                f"the same both ways), {REQUESTS} requests each way after 200 warm-up, "
                f"alternating; through the proxy: HTTPS (TLS is part of the overhead) with the "
                f"app's Host name and the access cookie of the sign-in hand-off. p50 through "
                f"the proxy {http['proxy_p50']:.3f} ms, direct {http['direct_p50']:.3f} ms; p99 "
                f"{http['proxy_p99']:.3f} vs {http['direct_p99']:.3f} ms. {machine}"
            ),
        },
        {
            "metric": "app_proxy_ws_overhead_p50",
            "unit": "ms",
            "value": round(ws["proxy_p50"] - ws["direct_p50"], 3),
            "target": TARGETS["app_proxy_ws_overhead_p50"],
            "peer": f"a 32-byte WebSocket echo round trip (websockets server) {direct}",
            "peer_value": round(ws["direct_p50"], 3),
            "ratio": round(ws["proxy_p50"] / ws["direct_p50"], 2),
            "conditions": (
                f"One WebSocket each way (wss through the proxy, signed in; ws direct), "
                f"{ROUND_TRIPS} sequential round trips each after 200 warm-up, alternating. p50 "
                f"through the proxy {ws['proxy_p50']:.3f} ms, direct {ws['direct_p50']:.3f} ms. "
                f"{machine}"
            ),
        },
        {
            "metric": "app_proxy_rps_ratio",
            "unit": "ratio",
            "value": round(through["rps"] / straight["rps"], 2),
            "target": TARGETS["app_proxy_rps_ratio"],
            "peer": f"wrk at the app {direct}",
            "peer_value": round(straight["rps"], 1),
            "ratio": round(through["rps"] / straight["rps"], 2),
            "conditions": (
                f"wrk -t2 -c{CLIENTS} for {DURATION_S} s each, GET / (2 bytes) of the WSGI app "
                f"under gunicorn (2 workers x 8 threads, gthread); through the proxy "
                f"{through['rps']:.0f} requests/s over HTTPS, direct {straight['rps']:.0f}/s "
                f"(socket errors/timeouts of 10 s: {through['socket_errors']:.0f} through the "
                f"proxy, {straight['socket_errors']:.0f} direct). {machine}"
            ),
        },
        {
            "metric": "app_proxy_stream_rss_growth",
            "unit": "MB",
            "value": round(stream["growth_mb"], 1),
            "target": TARGETS["app_proxy_stream_rss_growth"],
            "peer": None,
            "peer_value": None,
            "ratio": None,
            "conditions": (
                f"The `kiln web` process's VmRSS sampled every 50 ms while one client read a "
                f"{STREAM_MB} MiB answer of the WSGI app through the proxy (HTTPS) at "
                f"{stream['mb_per_s']:.0f} MiB/s: {stream['before_mb']:.0f} MB before, "
                f"{stream['peak_mb']:.0f} MB at most. {machine}"
            ),
        },
    ]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
