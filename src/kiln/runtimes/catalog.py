"""The runtime catalog's pure logic: what a runtime is and what it offers (no database).

A runtime is either the built-in one (the host's own Python, nothing to download) or an image
unpacked by :mod:`kiln.build.oci` into a root filesystem that the local runtime consumes as
``WorkloadSpec.runtime_root``. Detection here never follows a symlink out of an image's root:
an image's ``/usr/bin/jupyter-lab -> /etc/shadow`` is resolved *inside* the image, the way the
sandbox would see it, never on the host.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EDITOR_TERMINAL = "terminal"
EDITOR_JUPYTERLAB = "jupyterlab"
BUILTIN_NAME = "builtin"
# Where the built-in runtime shows the Python environment Kiln itself runs from (its virtual
# environment, read-only), which holds JupyterLab: a fixed path, so the host's layout (where
# Kiln was installed) stays out of the sandbox.
KILN_ENV_DIR = "/opt/kiln"
SOURCE_BUILTIN = "builtin"
# Docker's default when an image's config sets no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_SYMLINKS = 40  # Linux's own limit when resolving a path
_PYTHON_NAME = re.compile(r"^python(\d+\.\d+)$")
_PYTHON_LIB = re.compile(r"^python(\d+)\.(\d+)$")
_VERSION = re.compile(r"^(\d+)\.(\d+)")


@dataclass(frozen=True)
class RuntimeImage:
    """One catalog entry. ``rootfs`` is None for the built-in runtime (the local runtime then
    binds the host's /usr and Python); ``digest`` is the image ID (``sha256:`` of its config)."""

    name: str
    digest: str | None
    rootfs: Path | None
    editors: tuple[str, ...]
    python_version: str | None  # "3.11" (major.minor) when detectable
    size_bytes: int | None  # unpacked bytes of regular files
    source: str  # "builtin" | "oci-archive" | "docker-archive"
    env: tuple[tuple[str, str], ...] = field(default=())  # the image config's Env, in order

    @property
    def builtin(self) -> bool:
        return self.rootfs is None

    @property
    def has_jupyterlab(self) -> bool:
        return EDITOR_JUPYTERLAB in self.editors

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "rootfs": None if self.rootfs is None else str(self.rootfs),
            "editors": list(self.editors),
            "python_version": self.python_version,
            "size_bytes": self.size_bytes,
            "source": self.source,
            "env": [list(pair) for pair in self.env],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuntimeImage:
        rootfs = data.get("rootfs")
        return cls(
            name=str(data["name"]),
            digest=data.get("digest"),
            rootfs=None if rootfs is None else Path(rootfs),
            editors=tuple(data.get("editors", (EDITOR_TERMINAL,))),
            python_version=data.get("python_version"),
            size_bytes=data.get("size_bytes"),
            source=str(data["source"]),
            env=tuple((str(k), str(v)) for k, v in data.get("env", ())),
        )


def resolve_in_root(root: Path, path: str) -> Path | None:
    """``path`` resolved as if ``root`` were ``/``: absolute symlink targets restart at
    ``root`` and ``..`` stops there. None when it does not exist or loops."""
    resolved: list[str] = []
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component is at the end
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = candidate.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def path_dirs(env: Mapping[str, str]) -> list[str]:
    return [d for d in env.get("PATH", DEFAULT_PATH).split(":") if d.startswith("/")]


def find_program(root: Path, name: str, dirs: Sequence[str]) -> Path | None:
    """The first executable regular file ``name`` in ``dirs``, resolved inside ``root``."""
    for directory in dirs:
        found = resolve_in_root(root, f"{directory}/{name}")
        if found is None:
            continue
        st = found.stat()
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return found
    return None


def _major_minor(text: str) -> str | None:
    match = _VERSION.match(text)
    return f"{match[1]}.{match[2]}" if match else None


def detect_python_version(root: Path, env: Mapping[str, str]) -> str | None:
    """From, in order: the config's PYTHON_VERSION (official python images), the name a
    ``python3`` on PATH links to (Debian's ``python3 -> python3.11``), the newest
    ``lib/python3.X/os.py`` under /usr or /usr/local."""
    if "PYTHON_VERSION" in env:
        version = _major_minor(env["PYTHON_VERSION"])
        if version:
            return version
    dirs = path_dirs(env)
    for name in ("python3", "python"):
        found = find_program(root, name, dirs)
        if found is not None and (match := _PYTHON_NAME.match(found.name)):
            return match[1]
    versions: list[tuple[int, int]] = []
    for lib in ("usr/local/lib", "usr/lib"):
        base = resolve_in_root(root, lib)
        if base is None or not base.is_dir():
            continue
        for entry in os.listdir(base):
            match = _PYTHON_LIB.match(entry)
            if match and resolve_in_root(root, f"{lib}/{entry}/os.py") is not None:
                versions.append((int(match[1]), int(match[2])))
    if versions:
        major, minor = max(versions)
        return f"{major}.{minor}"
    return None


def detect_editors(root: Path, env: Mapping[str, str]) -> tuple[str, ...]:
    """A terminal always; JupyterLab when ``jupyter-lab`` is on the image's PATH."""
    editors = [EDITOR_TERMINAL]
    if find_program(root, "jupyter-lab", path_dirs(env)) is not None:
        editors.append(EDITOR_JUPYTERLAB)
    return tuple(editors)


def config_env(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The ``Env`` list of an image config (``config.Env``: ``["K=V", ...]``), malformed
    items skipped."""
    inner = config.get("config") or {}
    items = inner.get("Env") if isinstance(inner, dict) else None
    pairs = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            if key:
                pairs.append((key, value))
    return tuple(pairs)


def describe_rootfs(
    *,
    name: str,
    digest: str,
    rootfs: Path,
    source: str,
    config: Mapping[str, Any],
    size_bytes: int | None,
) -> RuntimeImage:
    env_pairs = config_env(config)
    env = dict(env_pairs)
    return RuntimeImage(
        name=name,
        digest=digest,
        rootfs=rootfs,
        editors=detect_editors(rootfs, env),
        python_version=detect_python_version(rootfs, env),
        size_bytes=size_bytes,
        source=source,
        env=env_pairs,
    )


def builtin_runtime() -> RuntimeImage:
    """The host's Python as the local runtime binds it (its prefix, the host's /usr, and the
    environment Kiln runs from)."""
    prefixes = dict.fromkeys([sys.base_prefix, sys.prefix])
    candidates = [Path(p, "bin") for p in prefixes] + [Path(d) for d in path_dirs({})]
    has_lab = any(os.access(d / "jupyter-lab", os.X_OK) for d in candidates)
    editors = (EDITOR_TERMINAL, EDITOR_JUPYTERLAB) if has_lab else (EDITOR_TERMINAL,)
    return RuntimeImage(
        name=BUILTIN_NAME,
        digest=None,
        rootfs=None,
        editors=editors,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        size_bytes=None,
        source=SOURCE_BUILTIN,
    )
