"""Finding the external tools tests and benchmarks drive: Debian's (``skopeo``, ``podman``)
on PATH, and the Go-built ones (``crane``, ``oras``, ``oci-conformance``, ``kube``,
``kubelet``, ``containerd``...) that ``scripts/build_go_tools.sh`` builds once per pinned
version into ``${KILN_TOOLS_CACHE:-~/.cache/kiln-tools}/<name>-<version>/<name>``.

``require(name)`` is for tests: a missing tool skips the test with a notice, except under
``CI=true`` where it fails (the CI machine is set up by ``make test`` and must have them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PINS = ROOT / "scripts" / "go_tools.txt"


def tools_cache() -> Path:
    default = Path(os.environ.get("HOME", "/root")) / ".cache" / "kiln-tools"
    return Path(os.environ.get("KILN_TOOLS_CACHE", str(default)))


def go_tool_pins() -> dict[str, str]:
    """name → version, from scripts/go_tools.txt (empty outside a source checkout)."""
    pins: dict[str, str] = {}
    if PINS.is_file():
        for line in PINS.read_text().splitlines():
            fields = line.split()
            if fields and not fields[0].startswith("#") and len(fields) >= 2:
                pins[fields[0]] = fields[1]
    return pins


def find(name: str) -> Path | None:
    """A Go-built tool at its pinned version, else a program of that name on PATH."""
    version = go_tool_pins().get(name)
    if version is not None:
        built = tools_cache() / f"{name}-{version}" / name
        if built.is_file() and os.access(built, os.X_OK) and (built.parent / ".done").exists():
            return built
    found = shutil.which(name)
    return Path(found) if found else None


def find_built(tool: str, program: str) -> Path | None:
    """``program`` of a Go-built tool that builds several (``containerd``'s shim and ``ctr``,
    the ``cni-plugins``): ``<tool>-<version>/<program>`` once the tool's build finished."""
    version = go_tool_pins().get(tool)
    if version is None:
        return None
    directory = tools_cache() / f"{tool}-{version}"
    built = directory / program
    if (directory / ".done").exists() and built.is_file() and os.access(built, os.X_OK):
        return built
    return None


def require_built(tool: str, program: str, why: str = "") -> Path:
    """``find_built``, or skip (fail under ``CI=true``) as ``require`` does."""
    path = find_built(tool, program)
    if path is not None:
        return path
    message = (
        f"NOTICE: {program} ({tool}) is not available{' for ' + why if why else ''}; "
        "run scripts/build_go_tools.sh (make test does)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


def require(name: str, why: str = "") -> Path:
    path = find(name)
    if path is not None:
        return path
    hint = (
        "run scripts/build_go_tools.sh (make test does)"
        if name in go_tool_pins()
        else f"install it (make test installs {name})"
    )
    message = f"NOTICE: {name} is not available{' for ' + why if why else ''}; {hint}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)
