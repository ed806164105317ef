"""The model server's layer of a model's image: ``/opt/kiln/serving/kiln_model_server.py``
and, beside it, the protocols it speaks besides CML's (``model_protocols.py``, which the
server imports from its own directory).

A build for a model (``builds.serving``) puts this one small layer between the dependency
layer and the code layer, so the image serves the model on its own (its ``Cmd`` starts the
server) under podman, as a pod, or as one of Kiln's replicas. The tar is reproducible: the
same server file gives the same layer digest on every build (sorted entries, fixed mtime
1980-01-01, owner root, modes 0755/0644), so every model image of a Kiln version shares it and
a registry stores it once.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from kiln.serving import model_protocols, model_server

SERVER_PATH = "/opt/kiln/serving/kiln_model_server.py"
PROTOCOLS_PATH = "/opt/kiln/serving/model_protocols.py"  # the name the server imports
MTIME = 315532800  # 1980-01-01, as the dependency layer's entries
MODEL_PORT = 8080


def serving_files() -> dict[str, bytes]:
    """The files of the layer by their path in the image: the server and its protocols."""
    return {
        SERVER_PATH: Path(model_server.__file__).read_bytes(),
        PROTOCOLS_PATH: Path(model_protocols.__file__).read_bytes(),
    }


def serving_tar(files: dict[str, bytes] | None = None) -> bytes:
    """The uncompressed layer: three directories and the files (``serving_files()``), all
    in one directory."""
    files = serving_files() if files is None else files
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parts = SERVER_PATH.strip("/").split("/")
        for depth in range(1, len(parts)):
            entry = tarfile.TarInfo("/".join(parts[:depth]))
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(entry)
        for path in sorted(files):
            data = files[path]
            entry = tarfile.TarInfo(path.lstrip("/"))
            entry.size, entry.mode, entry.mtime = len(data), 0o644, MTIME
            tar.addfile(entry, io.BytesIO(data))
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
