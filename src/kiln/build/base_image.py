"""Kiln's own base image: Debian with Python and pip, from Debian's packages.

No image registry is reachable on a fresh machine, so Kiln makes the base its builds start
from: ``mmdebstrap`` installs a minimal Debian plus ``python3``, ``python3-pip`` and
``python3-venv`` from Debian's mirror into a tar, which becomes one reproducible layer
(entries in mmdebstrap's deterministic order, mtimes clamped by ``SOURCE_DATE_EPOCH``, no
device nodes: the sandbox brings its own ``/dev``). The result is an OCI image archive,
kept in a cache keyed by the recipe's hash, then pushed as ``runtimes/python:3.11`` and
added to the runtime catalog.

Two site-specific touches, both part of the recipe (and so of its hash):

- the site's own CA certificates (``/usr/local/share/ca-certificates/*.crt`` on this
  host, by default) are installed in the image, so ``pip`` inside builds and sessions
  trusts a TLS-intercepting proxy or a private package index the host trusts;
- Debian's ``EXTERNALLY-MANAGED`` marker is removed, so ``pip install`` works in the image
  the way data scientists expect (builds install into ``/opt/kiln/deps``, not ``/usr``);
- an empty ``/opt/kiln/deps`` exists: a build mounts its dependency prefix there (every
  base image a build starts from needs it).

Everything here runs as root on trusted input (Debian's packages): nothing a workload wrote
is read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.build.layers import (
    CONFIG,
    INDEX,
    MANIFEST,
    Blob,
    Layer,
    canonical_json,
    compress_file,
    image_manifest,
    json_blob,
)

RECIPE_VERSION = 2  # bump when this module's output changes for the same recipe
BASE_REPOSITORY = "runtimes/python"
BASE_TAG = "3.11"
DEFAULT_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


class BaseImageError(Exception):
    """The base image could not be built; the message says why (mmdebstrap's own words)."""


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that decides the base image's bytes."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    python_version: str = "3.11"
    source_date_epoch: int = 1_700_000_000
    # (file name, PEM bytes) of the site's CA certificates, sorted by name.
    ca_certificates: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @classmethod
    def for_site(cls, ca_dir: Path | None, **overrides: Any) -> BaseRecipe:
        certs: list[tuple[str, bytes]] = []
        if ca_dir is not None and ca_dir.is_dir():
            certs = sorted(
                (p.name, p.read_bytes())
                for p in ca_dir.iterdir()
                if p.suffix == ".crt" and p.is_file()
            )
        return cls(ca_certificates=tuple(certs), **overrides)

    @property
    def key(self) -> str:
        """The recipe's hash: the cache key of the image it makes."""
        data = asdict(self)
        data["ca_certificates"] = [
            [name, hashlib.sha256(pem).hexdigest()] for name, pem in self.ca_certificates
        ]
        data["recipe_version"] = RECIPE_VERSION
        return hashlib.sha256(canonical_json(data)).hexdigest()

    @property
    def created(self) -> str:
        return dt.datetime.fromtimestamp(self.source_date_epoch, dt.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )

    def sources(self) -> list[str]:
        return [
            f"deb {self.mirror} {self.suite} main",
            f"deb {self.mirror} {self.suite}-updates main",
            f"deb {self.security_mirror} {self.suite}-security main",
        ]


@dataclass(frozen=True)
class BaseArchive:
    """A built base image: its OCI archive and what the build needs to know about it."""

    path: Path
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]


def _mmdebstrap(recipe: BaseRecipe, out: Path, work: Path, progress: Progress) -> None:
    program = shutil.which("mmdebstrap")
    if program is None:
        raise BaseImageError(
            "building the base image needs mmdebstrap (Debian package mmdebstrap): "
            "apt-get install mmdebstrap"
        )
    argv = [
        program,
        "--variant=minbase",
        "--mode=root" if os.geteuid() == 0 else "--mode=unshare",
        "--format=tar",
        f"--include={','.join(recipe.packages)}",
        "--aptopt=Acquire::Retries=3",
    ]
    if recipe.ca_certificates:
        ca_dir = work / "ca"
        ca_dir.mkdir()
        for name, pem in recipe.ca_certificates:
            (ca_dir / name).write_bytes(pem)
            argv.append(
                f"--customize-hook=upload {ca_dir / name} /usr/local/share/ca-certificates/{name}"
            )
        argv.append('--customize-hook=chroot "$1" update-ca-certificates --fresh >/dev/null')
    argv.append('--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED')
    # The mount point of a build's dependency prefix (the image root is read-only there).
    argv.append('--customize-hook=mkdir -p "$1"/opt/kiln/deps')
    argv += [recipe.suite, str(out), *recipe.sources()]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch),
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(work),
    }
    # Its own process group: when creating the tarball fails, mmdebstrap tears its helpers
    # down with SIGHUP to its whole process group, which would otherwise be the builder's
    # (and under `kiln up` in a terminal, the supervisor's and the shell's).
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        process_group=0,
    )
    assert proc.stderr is not None
    tail: list[str] = []
    for line in proc.stderr:
        line = line.rstrip()
        tail = [*tail[-30:], line]
        if line.startswith("I: "):
            progress(line[3:])
    if proc.wait() != 0:
        raise BaseImageError("mmdebstrap failed:\n" + "\n".join(tail))


def _normalized_rootfs(source: Path, dest: Path) -> None:
    """mmdebstrap's tar as an OCI layer: names without ``./``, no device nodes (nor the
    rest of ``/dev``), owners by number only. Entry order and mtimes are mmdebstrap's own,
    which are reproducible under ``SOURCE_DATE_EPOCH``."""
    with tarfile.open(source) as src, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for member in src:
            name = member.name.removeprefix("./").rstrip("/")
            if not name or name.startswith("dev/"):
                continue
            member.name = name
            if member.islnk():
                member.linkname = member.linkname.removeprefix("./")
            member.uname = member.gname = ""
            member.pax_headers = {}
            if member.isreg():
                out.addfile(member, src.extractfile(member))
            elif member.isdir() or member.issym() or member.islnk():
                out.addfile(member)
            # character/block devices and FIFOs are dropped


def _config(recipe: BaseRecipe, layer: Layer) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": recipe.created,
        "config": {
            "Env": [f"PATH={PATH}", "LANG=C.UTF-8", f"PYTHON_VERSION={recipe.python_version}"],
            "Cmd": ["python3"],
            "WorkingDir": "/",
            "Labels": {
                "io.kiln.base.recipe": recipe.key,
                "io.kiln.base.suite": f"debian {recipe.suite}",
                "io.kiln.base.packages": " ".join(recipe.packages),
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [
            {
                "created": recipe.created,
                "created_by": f"mmdebstrap --variant=minbase {recipe.suite} "
                f"--include={','.join(recipe.packages)} (Kiln base recipe {recipe.key[:12]})",
            }
        ],
    }


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_oci_archive(
    dest: Path,
    manifest: tuple[Blob, bytes],
    config: tuple[Blob, bytes],
    layers: list[tuple[Layer, Path]],
    tag: str,
) -> None:
    """An OCI image layout in a tar (what ``skopeo copy ... oci-archive:`` writes),
    deterministic: fixed order, mtime 0, root-owned entries."""
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {**manifest[0].descriptor(), "annotations": {"org.opencontainers.image.ref.name": tag}}
        ],
    }
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", canonical_json(index))
        for blob, data in (manifest, config):
            _add_bytes(tar, f"blobs/sha256/{blob.digest.split(':')[1]}", data)
        for layer, path in layers:
            info = tarfile.TarInfo(f"blobs/sha256/{layer.digest.split(':')[1]}")
            info.size, info.mode, info.mtime = layer.size, 0o644, 0
            with path.open("rb") as f:
                tar.addfile(info, f)


def read_archive(path: Path) -> BaseArchive:
    """The manifest and layers of an OCI archive written by ``write_oci_archive``."""
    with tarfile.open(path) as tar:
        index = json.loads(_member(tar, "index.json"))
        digest = index["manifests"][0]["digest"]
        manifest = json.loads(_member(tar, f"blobs/sha256/{digest.split(':')[1]}"))
        config_digest = manifest["config"]["digest"]
        config = json.loads(_member(tar, f"blobs/sha256/{config_digest.split(':')[1]}"))
    diff_ids = config["rootfs"]["diff_ids"]
    layers = tuple(
        Layer(d["digest"], d["size"], d["mediaType"], diff_id)
        for d, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    )
    return BaseArchive(path, digest, config_digest, layers)


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise BaseImageError(f"{name} is missing from the base archive")
    return f.read()


@contextlib.contextmanager
def archive_blobs(archive: Path, work: Path) -> Iterator[Callable[[str], Path]]:
    """Blobs of an OCI archive as files (for an upload), extracted on demand."""
    with tarfile.open(archive) as tar:

        def open_blob(digest: str) -> Path:
            dest = work / digest.split(":")[1]
            if not dest.exists():
                source = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
                if source is None:
                    raise BaseImageError(f"blob {digest} is missing from {archive}")
                with dest.open("wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
            return dest

        yield open_blob


def build_base_archive(recipe: BaseRecipe, cache_dir: Path, progress: Progress) -> BaseArchive:
    """The base image for ``recipe``: from the cache, or built (a few minutes: mmdebstrap
    downloads and installs ~200 MB of packages) and put in the cache. Concurrent callers
    (the builder's background build and ``kiln runtimes build-base``) wait for each other."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = cache_dir / f"{recipe.key}.oci.tar"
    lock_fd = os.open(cache_dir / f".{recipe.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another process is building this base image; waiting for it")
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if dest.exists():
            progress(f"base image found in the cache ({dest.name[:12]}…)")
            return read_archive(dest)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
            work = Path(tmp)
            progress(f"installing Debian {recipe.suite} with {', '.join(recipe.packages)}")
            _mmdebstrap(recipe, work / "rootfs.tar", work, progress)
            progress("writing the image layer")
            _normalized_rootfs(work / "rootfs.tar", work / "layer.tar")
            (work / "rootfs.tar").unlink()
            layer = compress_file(work / "layer.tar", work / "layer.tar.gz")
            (work / "layer.tar").unlink()
            config = json_blob(_config(recipe, layer), CONFIG)
            manifest = json_blob(image_manifest(config[0], [layer]), MANIFEST)
            partial = work / "image.oci.tar"
            write_oci_archive(partial, manifest, config, [(layer, work / "layer.tar.gz")], BASE_TAG)
            os.replace(partial, dest)
        progress(f"base image built: {manifest[0].digest}")
        return read_archive(dest)
    finally:
        os.close(lock_fd)
