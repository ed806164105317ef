"""Registry throughput: skopeo pulling and pushing a ~200 MB image (four 50 MB layers of
random bytes) to and from Kiln's registry and, in the same run on the same machine, Debian's
`docker-registry` (the CNCF distribution registry, v2.8). Both over TLS (certificates from
one CA) with authentication: Kiln's token flow with an API key, htpasswd for the peer.

Kiln runs as `kiln web` (one uvicorn process, SQLite), exactly as `kiln up` starts it. Each
push sends freshly generated layers (so no registry can skip or mount a blob it has seen);
each pull copies the same image into an empty `dir:` destination. Runs alternate between the
two registries; the median of RUNS is reported.

Run:  .venv/bin/python bench/registry_pull.py      (as root: installs docker-registry)
Writes bench/results/registry_pull.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.migrate import upgrade
from kiln.domain.identity import create_api_key, create_user
from kiln.domain.projects import new_project
from kiln.pki.ca import CertificateAuthority
from kiln.settings import Settings
from kiln.testing.live import free_port

with warnings.catch_warnings():  # bcrypt for the peer's htpasswd; gone in Python 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "registry_pull.json"
LAYERS, LAYER_BYTES = 4, 50 * 1024 * 1024
RUNS = int(os.environ.get("RUNS", "5"))
TARGET = 0.8
BCRYPT_COST = 5
PEER = "Debian docker-registry 2.8.2 (CNCF distribution), filesystem storage, TLS, htpasswd"
USER, PASSWORD = "bench", "bench-password-0123"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def layer_blob() -> bytes:
    """A tar holding one LAYER_BYTES file of random bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(f"data-{os.urandom(4).hex()}.bin")
        info.size = LAYER_BYTES
        tar.addfile(info, io.BytesIO(os.urandom(LAYER_BYTES)))
    return buffer.getvalue()


def write_layout(directory: Path) -> int:
    """An OCI image layout with fresh random layers; returns the image's total bytes."""
    if directory.exists():
        shutil.rmtree(directory)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    total = 0

    def put(data: bytes) -> tuple[str, int]:
        nonlocal total
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        total += len(data)
        return f"sha256:{digest}", len(data)

    layers = [put(layer_blob()) for _ in range(LAYERS)]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
        }
    ).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
        }
    ).encode()
    manifest_digest, manifest_size = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return total


def wait_for(url: str, ca: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, verify=str(ca), timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


@contextmanager
def kiln_web(work: Path) -> Iterator[tuple[str, str, Path]]:
    """`kiln web` on a fresh data dir; yields (host:port, API key, CA file)."""
    data = work / "kiln-data"
    env = {
        **os.environ,
        "KILN_DATA_DIR": str(data),
        "KILN_SECRET_KEY": "registry-bench-secret-0123456789",
    }
    env.pop("KILN_DATABASE_URL", None)
    settings = Settings(data_dir=data, secret_key=env["KILN_SECRET_KEY"])
    data.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    with transaction(make_sessionmaker(engine)) as db:
        user = create_user(db, USER, PASSWORD)
        _, key = create_api_key(db, user, "bench")
        new_project(db, user, "images")
    engine.dispose()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln.cli.main",
            "web",
            "--data-dir",
            str(data),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(work / "kiln-web.log").open("w"),
    )
    ca = data / "pki" / "ca.crt"
    try:
        deadline = time.monotonic() + 30
        while not ca.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_for(f"https://localhost:{port}/v2/", ca)
        yield f"localhost:{port}", key, ca
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def distribution(work: Path, ca_dir: Path) -> Iterator[str]:
    """Debian's docker-registry (CNCF distribution) over TLS with htpasswd."""
    binary = shutil.which("docker-registry")
    if binary is None:
        if os.geteuid() != 0:
            raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
        subprocess.run(["apt-get", "install", "-y", "-qq", "docker-registry"], check=True)
        binary = "/usr/bin/docker-registry"
    cert, key = CertificateAuthority(ca_dir).ensure_leaf(
        "peer-registry", ["localhost", "127.0.0.1"]
    )
    htpasswd = work / "htpasswd"
    # bcrypt cost 5, what `htpasswd -B` writes by default: distribution checks the password
    # on every request, so the cost is part of what the peer pays per request.
    salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**BCRYPT_COST)
    htpasswd.write_text(f"{USER}:{crypt.crypt(PASSWORD, salt)}\n")
    port = free_port()
    config = work / "distribution.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(work / "distribution-data")}},
                "http": {
                    "addr": f"127.0.0.1:{port}",
                    "tls": {"certificate": str(cert), "key": str(key)},
                },
                "auth": {"htpasswd": {"realm": "bench", "path": str(htpasswd)}},
            }
        )
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(work / "distribution.log").open("w"),
    )
    try:
        wait_for(f"https://localhost:{port}/v2/", ca_dir / "ca.crt")
        yield f"localhost:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def skopeo(*args: str) -> None:
    done = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args[:2])} failed: {done.stderr[-1500:]}")


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    if shutil.which("skopeo") is None:
        print("skopeo is not installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kiln-registry-bench-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        certs.mkdir()
        layout = work / "layout"
        auth = ["--authfile", str(work / "auth.json")]
        with kiln_web(work) as (kiln_host, key, ca), distribution(work, ca.parent) as peer_host:
            shutil.copy(ca, certs / "ca.crt")
            skopeo("login", *auth, "--cert-dir", str(certs), "-u", USER, "-p", key, kiln_host)
            skopeo("login", *auth, "--cert-dir", str(certs), "-u", USER, "-p", PASSWORD, peer_host)
            targets = {
                "kiln": f"{kiln_host}/{USER}/images/bench",
                "peer": f"{peer_host}/bench/images",
            }
            push: dict[str, list[float]] = {"kiln": [], "peer": []}
            pull: dict[str, list[float]] = {"kiln": [], "peer": []}
            size = 0
            for run in range(RUNS):
                for name in ("kiln", "peer") if run % 2 == 0 else ("peer", "kiln"):
                    size = write_layout(layout)
                    ref = f"docker://{targets[name]}:run{run}"
                    push[name].append(
                        timed(
                            lambda ref=ref: skopeo(
                                "copy",
                                *auth,
                                "--dest-cert-dir",
                                str(certs),
                                f"oci:{layout}:bench",
                                ref,
                            )
                        )
                    )
                    out = work / f"pulled-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    pull[name].append(
                        timed(
                            lambda ref=ref, out=out: skopeo(
                                "copy", *auth, "--src-cert-dir", str(certs), ref, f"dir:{out}"
                            )
                        )
                    )
                    shutil.rmtree(out, ignore_errors=True)
                    took = f"push {push[name][-1]:.2f} s, pull {pull[name][-1]:.2f} s"
                    print(f"run {run} {name}: {took}", flush=True)
    mb = size / 1e6
    rows = []
    for metric, times in (("registry_pull_ratio", pull), ("registry_push_ratio", push)):
        ours = mb / statistics.median(times["kiln"])
        theirs = mb / statistics.median(times["peer"])
        rows.append(
            {
                "metric": metric,
                "unit": "MB/s",
                "value": round(ours, 1),
                "target": TARGET,
                "peer": PEER,
                "peer_value": round(theirs, 1),
                "ratio": round(ours / theirs, 2),
                "conditions": (
                    f"skopeo {'pull to dir:' if 'pull' in metric else 'push from an oci: layout'}, "
                    f"{LAYERS} uncompressed layers of {LAYER_BYTES // 2**20} MiB random bytes "
                    f"({mb:.0f} MB), median of {RUNS} alternating runs; value and peer_value in "
                    "MB/s, target applies to the ratio; kiln web (one uvicorn process, "
                    "httptools, TLS, SQLite) with token auth from an API key vs distribution "
                    f"with htpasswd (bcrypt cost {BCRYPT_COST}, htpasswd -B's default); "
                    "both on the same 2 shared cores and disk, same run; fresh "
                    "random layers for every push"
                ),
                "runs_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            }
        )
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        figures = f"kiln {row['value']} MB/s, peer {row['peer_value']} MB/s"
        print(f"{row['metric']}: {figures}, ratio {row['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
