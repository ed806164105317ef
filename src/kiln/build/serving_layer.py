"""The model server's layer of a model's image: ``/opt/kiln/serving/kiln_model_server.py``
and, beside it, the protocols it speaks besides CML's (``model_protocols.py``, which the
server imports from its own directory) and the CML library (``/opt/kiln/serving/cml/``,
``/opt/kiln/serving/cdsw/``).

A build for a model (``builds.serving``) puts this one small layer between the dependency
layer and the code layer, so the image serves the model on its own (its ``Cmd`` starts the
server) under podman, as a pod, or as one of Kiln's replicas. Python puts the server's
directory first on ``sys.path``, so the model's ``import cml.models_v1`` finds the library
there (the image's Python has no Kiln; the library, like the server, is standard library
only); a ``cml`` package of the project's own comes before it. The tar is reproducible: the
same files give the same layer digest on every build (sorted entries, fixed mtime 1980-01-01,
owner root, modes 0755/0644), so every model image of a Kiln version shares it and a
registry stores it once.
"""

from __future__ import annotations

import importlib
import io
import tarfile
from pathlib import Path

from kiln.serving import model_protocols, model_server

SERVER_PATH = "/opt/kiln/serving/kiln_model_server.py"
PROTOCOLS_PATH = "/opt/kiln/serving/model_protocols.py"  # the name the server imports
SERVING_DIR = "/opt/kiln/serving"
LIBRARY_PACKAGES = ("cdsw", "cml")  # top-level packages of Kiln's distribution, stdlib-only
MTIME = 315532800  # 1980-01-01, as the dependency layer's entries
MODEL_PORT = 8080


def library_sources() -> dict[str, bytes]:
    """The CML library's ``.py`` files by their path relative to a ``sys.path`` entry
    (``cml/models_v1.py`` ...), sorted; the runner also shows them to sessions and jobs."""
    files: dict[str, bytes] = {}
    for package in LIBRARY_PACKAGES:
        root = Path(importlib.import_module(package).__file__ or "").parent
        for path in sorted(root.glob("*.py")):
            files[f"{package}/{path.name}"] = path.read_bytes()
    return dict(sorted(files.items()))


def library_files() -> dict[str, bytes]:
    """The CML library's files by their path in the image."""
    return {f"{SERVING_DIR}/{name}": data for name, data in library_sources().items()}


def serving_files() -> dict[str, bytes]:
    """The files of the layer by their path in the image: the server, its protocols and the
    CML library."""
    return {
        SERVER_PATH: Path(model_server.__file__).read_bytes(),
        PROTOCOLS_PATH: Path(model_protocols.__file__).read_bytes(),
        **library_files(),
    }


def serving_tar(files: dict[str, bytes] | None = None) -> bytes:
    """The uncompressed layer: its directories and the files (``serving_files()``)."""
    files = serving_files() if files is None else files
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted(
            {"/".join(p.strip("/").split("/")[:d]) for p in files for d in range(1, p.count("/"))}
        )
        for name in directories:
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(entry)
        for path, content in sorted(files.items()):
            entry = tarfile.TarInfo(path.strip("/"))
            entry.size, entry.mode, entry.mtime = len(content), 0o644, MTIME
            tar.addfile(entry, io.BytesIO(content))
    return out.getvalue()


def server_command(
    file: str, function: str, *, threads: int = 4, processes: int = 1
) -> tuple[str, ...]:
    """The image's ``Cmd`` (and a replica's command): the server on ``MODEL_PORT``."""
    return (
        "python3",
        SERVER_PATH,
        "--file",
        file,
        "--function",
        function,
        "--port",
        str(MODEL_PORT),
        "--threads",
        str(threads),
        "--processes",
        str(processes),
    )
