"""Build and rebuild: Kiln's builder against ``podman build`` of the equivalent Containerfile.

Against a real ``kiln up`` (SQLite; web, runner and builder in their own processes), the
python-starter project with one real dependency from PyPI (``humanize``) in
``requirements.txt``:

* **code-only rebuild**, 10 times: change one line of ``main.py`` in the project's files
  (as a session's editor would: on disk, uncommitted), then API call → image in the
  registry (the build has pushed its manifest); p50. Beside it, in the same run, ``podman
  build`` of the equivalent Containerfile (``FROM`` the same base, ``COPY
  requirements.txt``, ``RUN pip install``, ``COPY . .``) with its layer cache warm, to the
  image in podman's local store; p50.
* **cold build**: the same, installing the dependency (Kiln: ``no_cache``; podman:
  ``--no-cache``), pip's cache empty on both (Kiln's install sandbox never keeps one; podman's
  RUN step starts from the base image). The base image is already in both local stores
  (Kiln's runtime cache, podman's storage), as after any first build.

Targets (issue 9): code-only rebuild <= 2 s and <= 0.5x podman's.

Registry: Kiln's own (the default of ``kiln up``), or with ``--docker-registry`` Debian's
docker-registry (token auth, TLS) on this machine; the results say which.

Run:  .venv/bin/python bench/build_rebuild.py [--docker-registry]   (as root: sandboxes)
Writes bench/results/build_rebuild.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from api_latency import free_port, wait_ready  # the sibling benchmarks
from job_overhead import KEY, percentile, seed

from kiln.build.bases import push_archive
from kiln.build.registry_client import Reference
from kiln.build.target import RegistryTarget
from kiln.pki.ca import CertificateAuthority
from kiln.testing import docker_registry
from kiln.testing.base_image import base_archive, base_cache_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "build_rebuild.json"
REBUILDS = 10
TARGET_MS, TARGET_RATIO = 2000.0, 0.5
REQUIREMENTS = "humanize==4.9.0\n"
BASE = "runtimes/python:3.11"
CONTAINERFILE = """\
FROM localhost/kiln-base:3.11
WORKDIR /home/cdsw
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
CMD ["python3"]
"""


def start_kiln(data_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        KILN_ADMIN_PASSWORD="bench-admin-pw",
        KILN_ADMIN_USERNAME="benchadmin",
        KILN_RUNNER_PORT=str(free_port()),
        KILN_BUILDER_PORT=str(free_port()),
        **env,
    )
    env.pop("KILN_DATABASE_URL", None)
    log = (data_dir.parent / "kiln.log").open("wb")
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "kiln"), "up", "--data-dir", str(data_dir),
         "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(f"https://127.0.0.1:{port}/api/v1/openapi.json")
    except RuntimeError:
        proc.kill()
        raise
    return proc


def build(http: httpx.Client, project: str, **body: Any) -> tuple[float, dict[str, Any]]:
    """POST a build and poll it until it has ended: (milliseconds, the build)."""
    start = time.perf_counter()
    created = http.post(f"{project}/builds", json=body)
    created.raise_for_status()
    url = f"{project}/builds/{created.json()['number']}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found: dict[str, Any] = http.get(url).json()
        if found["state"] in ("succeeded", "failed", "timed_out", "stopped"):
            elapsed = (time.perf_counter() - start) * 1000
            if found["state"] != "succeeded":
                raise RuntimeError(f"build failed: {found}")
            return elapsed, found
        time.sleep(0.01)
    raise RuntimeError(f"build {url} did not end")


def change_a_line(path: Path, n: int) -> None:
    """One line of code changes (in place: the file keeps its owner, the workload uid)."""
    lines = path.read_text().splitlines()
    lines[-1] = f"    print('run {n}')"
    path.write_text("\n".join(lines) + "\n")


class Podman:
    def __init__(self, storage: Path) -> None:
        self.base = [
            "podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
            "--runtime", "runc",
        ]  # fmt: skip

    def run(self, *args: str) -> None:
        subprocess.run([*self.base, *args], check=True, capture_output=True)

    def build(self, context: Path, *extra: str) -> float:
        start = time.perf_counter()
        self.run("build", "-q", "-t", "localhost/bench-app:latest", *extra, str(context))
        return (time.perf_counter() - start) * 1000


@contextlib.contextmanager
def registry(work: Path, peer: bool) -> Iterator[tuple[dict[str, str], str]]:
    """Where Kiln pushes: its environment for ``kiln up``, and a description. By default
    Kiln's own registry (the builder pushes the base into it from the cache at start);
    ``--docker-registry``: Debian's docker-registry holding the base."""
    if not peer:
        yield {}, "Kiln's own (/v2/ on its web tier, builder service tokens, TLS)"
        return
    ca = CertificateAuthority(work / "registry-ca")
    with docker_registry.docker_registry(work / "registry", ca) as running:
        target = RegistryTarget.connect(
            running.url,
            username=running.username,
            password=running.password,
            ca_file=running.ca_file,
        )
        try:
            push_archive(target, base_archive(), Reference.parse(BASE), work)
        finally:
            target.close()
        yield (
            {
                "KILN_BUILDER_REGISTRY_URL": running.url,
                "KILN_BUILDER_REGISTRY_USERNAME": running.username,
                "KILN_BUILDER_REGISTRY_PASSWORD": running.password,
                "KILN_BUILDER_REGISTRY_CA_FILE": str(running.ca_file),
            },
            "Debian's docker-registry 2.8 on this machine (token auth, TLS)",
        )


def project_dir(data_dir: Path) -> Path:
    found = [p for p in (data_dir / "projects").iterdir() if p.name.isdigit()]
    assert len(found) == 1, found
    return found[0]


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: Kiln's builds and podman's run in sandboxes")
    archive = base_archive(progress=True)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-build-"))
    storage = Path(tempfile.mkdtemp(prefix="kbp-"))  # podman wants a short runroot
    port = free_port()
    data_dir = work / "data"
    kiln = None
    try:
        with registry(work, "--docker-registry" in sys.argv) as (registry_env, registry_what):
            data_dir.mkdir()
            seed(f"sqlite:///{data_dir / 'kiln.db'}")
            env = {**registry_env, "KILN_BUILDER_BASE_CACHE_DIR": str(base_cache_dir())}
            kiln = start_kiln(data_dir, port, env)
            http = httpx.Client(
                base_url=f"https://localhost:{port}/api/v1",
                verify=str(data_dir / "pki" / "ca.crt"),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
            )
            created = http.post("projects", json={"name": "starter", "template": "python-starter"})
            created.raise_for_status()
            project = "projects/bench/starter"
            http.put(
                f"{project}/files/requirements.txt", content=REQUIREMENTS.encode()
            ).raise_for_status()
            main_py = project_dir(data_dir) / "main.py"

            # Warm-up: unpacks the base into Kiln's runtime cache (podman: `podman load`).
            build(http, project)
            cold_kiln, cold_build = build(http, project, no_cache=True)
            assert cold_build["dependencies_cached"] is False
            kiln_samples = []
            for n in range(REBUILDS + 1):
                change_a_line(main_py, n)
                elapsed, done = build(http, project)
                assert done["dependencies_cached"] is True, done
                if n:  # the first is a warm-up
                    kiln_samples.append(elapsed)

            podman = Podman(storage)
            podman.run("load", "-q", "-i", str(archive.path))
            podman.run("tag", "localhost/3.11:latest", "localhost/kiln-base:3.11")
            context = work / "context"
            shutil.copytree(project_dir(data_dir), context, ignore=shutil.ignore_patterns(".git"))
            (context / "Containerfile").write_text(CONTAINERFILE)
            cold_podman = podman.build(context, "--no-cache")
            podman_samples = []
            for n in range(REBUILDS + 1):
                change_a_line(context / "main.py", n)
                elapsed = podman.build(context)
                if n:
                    podman_samples.append(elapsed)
    finally:
        if kiln is not None:
            kiln.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                kiln.wait(30)
        subprocess.run(["podman", "--root", str(storage / "root"), "--runroot",
                        str(storage / "run"), "system", "reset", "-f"],
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    kiln_p50 = statistics.median(kiln_samples)
    podman_p50 = statistics.median(podman_samples)
    conditions = (
        f"kiln up (SQLite; web, runner, builder in their own processes), python-starter with "
        f"{REQUIREMENTS.strip()} from PyPI; base runtimes/python:3.11 (Kiln's Debian bookworm "
        f"base, {archive.manifest_digest[:19]}) already in both local stores; registry: "
        f"{registry_what}; Kiln: one line of main.py changed on disk (uncommitted) then POST "
        f".../builds, polled every 10 ms until succeeded (manifest pushed), {REBUILDS} runs "
        f"after a warm-up, p95 {percentile(kiln_samples, 0.95):.0f} ms; podman 4.3 (runc, "
        f"overlay) build -q of FROM base / COPY requirements.txt / RUN pip install / COPY . . "
        f"with a warm layer cache, {REBUILDS} runs after a warm-up, p95 "
        f"{percentile(podman_samples, 0.95):.0f} ms; {os.cpu_count()} cores shared"
    )
    results = [
        {
            "metric": "code_only_rebuild_p50",
            "unit": "ms",
            "value": round(kiln_p50, 1),
            "target": TARGET_MS,
            "peer": "podman build, warm layer cache",
            "peer_value": round(podman_p50, 1),
            "ratio": round(kiln_p50 / podman_p50, 3),
            "conditions": conditions,
        },
        {
            "metric": "code_only_rebuild_ratio_vs_podman",
            "unit": "ratio",
            "value": round(kiln_p50 / podman_p50, 3),
            "target": TARGET_RATIO,
            "peer": "podman build, warm layer cache",
            "peer_value": 1.0,
            "ratio": round(kiln_p50 / podman_p50, 3),
            "conditions": conditions,
        },
        {
            "metric": "cold_build_ratio_vs_podman",
            "unit": "ratio",
            "value": round(cold_kiln / cold_podman, 3),
            "target": None,
            "peer": "podman build --no-cache",
            "peer_value": 1.0,
            "ratio": round(cold_kiln / cold_podman, 3),
            "conditions": (
                f"Kiln cold build {cold_kiln:.0f} ms (no_cache: the install runs again in a "
                f"fresh sandbox, pip's cache empty) vs podman build --no-cache "
                f"{cold_podman:.0f} ms (RUN pip install from the base, pip's cache empty); "
                + conditions
            ),
        },
    ]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
