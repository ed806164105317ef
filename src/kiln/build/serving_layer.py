"""The model server's layer of a model's image: ``/opt/kiln/serving/kiln_model_server.py``.

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

from kiln.serving import model_server

SERVER_PATH = "/opt/kiln/serving/kiln_model_server.py"
MTIME = 315532800  # 1980-01-01, as the dependency layer's entries
MODEL_PORT = 8080


def serving_tar(server: bytes | None = None) -> bytes:
    """The uncompressed layer: three directories and the server file."""
    data = server if server is not None else Path(model_server.__file__).read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parts = SERVER_PATH.strip("/").split("/")
        for depth in range(1, len(parts)):
            entry = tarfile.TarInfo("/".join(parts[:depth]))
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(entry)
        entry = tarfile.TarInfo("/".join(parts))
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
