"""The built-in runtime's Python: one interpreter, at one fixed path, in every sandbox.

Every workload on the built-in runtime — a session and each of its terminals, a job run, a
worker, and later builds and model replicas — sees the same environment::

    /opt/kiln/bin/python, python3, python3.X   the interpreter
    /opt/kiln/bin/pip, pip3, jupyter-lab, ...  scripts whose ``#!`` is /opt/kiln/bin/python...
    PATH=/opt/kiln/bin:/usr/local/bin:/usr/bin:/bin   (``sandbox.base_env``; login shells keep it)

``/opt/kiln`` is a virtual environment over the host's Python (the one Kiln runs on): when Kiln
runs from a virtual environment (which holds JupyterLab), that environment is shown there,
read-only, with two things of the runtime's own laid over it: a ``bin/`` whose interpreter
links and rewritten scripts resolve *inside* the sandbox (the environment's own scripts name
the host's path in their ``#!`` lines), and a ``pyvenv.cfg`` that lets the user's site
directory in (``include-system-site-packages = true``): ``pip install`` then installs into
``/home/cdsw/.local`` — the project, as in CML — instead of failing on the read-only
environment. The host's Python installation stays bound at its own path (its binary's
RUNPATH names that path), but no host path is on ``PATH`` or anywhere else in the
environment of a workload.

The runner writes that ``bin/`` and ``pyvenv.cfg`` into its state directory at start-up
(``prepare_python_env``), in a directory named by the hash of their content: a workload
started earlier keeps the copy it was given, and an unchanged host reuses the same one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kiln.runtimes.catalog import KILN_ENV_DIR

PYTHON_BIN = f"{KILN_ENV_DIR}/bin"
PYTHON = f"{PYTHON_BIN}/python"
# Where the built-in runtime looks for commands, first to last (``sandbox.base_env``).
BUILTIN_PATH_DIRS = (PYTHON_BIN,)
MAX_SCRIPT_BYTES = 1024 * 1024  # entry-point scripts are a few hundred bytes


@dataclass(frozen=True)
class PythonFacts:
    """The host's Python as the built-in runtime uses it (collected by ``host.builtin_facts``).

    ``executable`` is the real path of the base interpreter (``sys._base_executable``
    resolved), ``version`` its ``X.Y.Z``; ``scripts_dir`` the directory whose entry-point
    scripts the runtime offers (Kiln's virtual environment's ``bin``, else the base
    installation's own ``bin`` unless that is a system directory such as ``/usr/bin``, already
    on PATH); ``script_pythons`` the interpreter paths those scripts' ``#!`` lines name."""

    executable: str
    version: str
    scripts_dir: str | None = None
    script_pythons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PythonEnv:
    """The files of ``/opt/kiln`` that the runtime writes itself (pure data)."""

    pyvenv_cfg: str
    links: Mapping[str, str]  # name in bin/ -> symlink target
    scripts: Mapping[str, bytes] = field(default_factory=dict)  # name in bin/ -> content
    site_packages: str = ""  # lib/pythonX.Y/site-packages, for an environment of its own

    def digest(self) -> str:
        h = hashlib.sha256(self.pyvenv_cfg.encode())
        for name, target in sorted(self.links.items()):
            h.update(f"\0link\0{name}\0{target}".encode())
        for name, content in sorted(self.scripts.items()):
            h.update(f"\0script\0{name}\0".encode() + content)
        h.update(self.site_packages.encode())
        return h.hexdigest()[:16]


def short_version(version: str) -> str:
    return ".".join(version.split(".")[:2])


def pyvenv_cfg(python: PythonFacts) -> str:
    return (
        f"home = {os.path.dirname(python.executable)}\n"
        # The user's site directory (~/.local, in the project) is only searched when this is
        # true; the host installation's own site-packages come with it.
        "include-system-site-packages = true\n"
        f"version = {python.version}\n"
    )


def rewrite_script(content: bytes, pythons: Iterable[str]) -> bytes | None:
    """``content`` with its interpreter line pointing at ``/opt/kiln/bin``, or None when it is
    not a script run by one of ``pythons``. Handles plain ``#!`` lines and the two-line form
    pip writes when a path is too long for ``#!`` (``#!/bin/sh`` + ``'''exec' PYTHON ...``)."""
    if not content.startswith(b"#!"):
        return None
    lines = content.split(b"\n", 2)
    for index, prefix in ((0, b"#!"), (1, b"'''exec' ")):
        if index >= len(lines) or not lines[index].startswith(prefix):
            continue
        interpreter, _, rest = lines[index][len(prefix) :].partition(b" ")
        for python in pythons:
            if interpreter == python.encode():
                name = os.path.basename(python).encode()
                new = prefix + PYTHON_BIN.encode() + b"/" + name + (b" " + rest if rest else b"")
                return b"\n".join([*lines[:index], new, *lines[index + 1 :]])
    return None


def plan_python_env(python: PythonFacts, scripts: Mapping[str, bytes], own_env: bool) -> PythonEnv:
    """What ``/opt/kiln`` needs beside the host's files: ``pyvenv.cfg``, the interpreter under
    the names ``python``, ``python3`` and ``python3.X``, and every entry-point script among
    ``scripts`` (name -> content) rewritten to run on it. ``own_env``: no virtual environment
    of Kiln's underneath, so the directory is a whole (empty) environment of its own."""
    names = ("python", "python3", f"python{short_version(python.version)}")
    links = dict.fromkeys(names, python.executable)
    rewritten = {}
    for name, content in scripts.items():
        if name in links or name.startswith("activate"):
            continue
        new = rewrite_script(content, python.script_pythons)
        if new is not None:
            rewritten[name] = new
    site = f"lib/python{short_version(python.version)}/site-packages" if own_env else ""
    return PythonEnv(pyvenv_cfg(python), links, rewritten, site)


def read_scripts(directory: str | None) -> dict[str, bytes]:
    """Small regular files of ``directory`` (symlinks and large binaries are not scripts)."""
    found: dict[str, bytes] = {}
    if directory is None:
        return found
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_SCRIPT_BYTES:
                with open(entry.path, "rb") as f:
                    found[entry.name] = f.read()
        except OSError:
            continue
    return found


def write_python_env(root: Path, env: PythonEnv) -> Path:
    """Write ``env`` under ``root/<digest>`` unless it is there already; returns that path.
    Written to a temporary name first, then renamed: a crash leaves no half directory."""
    final = root / env.digest()
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True, mode=0o755)
    (tmp / "pyvenv.cfg").write_text(env.pyvenv_cfg)
    for name, target in env.links.items():
        os.symlink(target, tmp / "bin" / name)
    for name, content in env.scripts.items():
        path = tmp / "bin" / name
        path.write_bytes(content)
        path.chmod(0o755)
    if env.site_packages:
        (tmp / env.site_packages).mkdir(parents=True, mode=0o755)
    # Whatever the umask: every workload uid reads and runs these (nothing secret in them).
    for directory, _, _ in os.walk(tmp):
        os.chmod(directory, 0o755)  # noqa: S103
    try:
        tmp.rename(final)
    except OSError:  # another runtime on this state directory won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_python_env(root: Path, python: PythonFacts, own_env: bool) -> Path:
    """The runtime's part of ``/opt/kiln`` on this host, written under ``root`` (I/O)."""
    env = plan_python_env(python, read_scripts(python.scripts_dir), own_env)
    return write_python_env(root, env)
