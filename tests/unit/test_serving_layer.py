"""The model server's layer of a model image: reproducible, exactly the server, its protocols
and the CML library, and the image config that names it (history, exposed port) without
touching the base's."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from cml import _core
from kiln.build import pipeline
from kiln.build.bases import Base
from kiln.build.layers import Layer
from kiln.build.registry_client import Reference
from kiln.build.serving_layer import PROTOCOLS_PATH, SERVER_PATH, server_command, serving_tar
from kiln.build.snapshot import Snapshot
from kiln.serving import model_protocols, model_server


def test_the_layer_holds_the_server_its_protocols_and_the_cml_library_reproducibly() -> None:
    first, second = serving_tar(), serving_tar()
    assert first == second
    files = {SERVER_PATH: model_server.__file__, PROTOCOLS_PATH: model_protocols.__file__}
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        entries = {m.name: m for m in tar.getmembers()}
        library = [
            "opt/kiln/serving/cdsw/__init__.py",
            "opt/kiln/serving/cml/__init__.py",
            "opt/kiln/serving/cml/_core.py",
            "opt/kiln/serving/cml/metrics_v1.py",
            "opt/kiln/serving/cml/models_v1.py",
        ]
        assert list(entries) == [
            "opt",
            "opt/kiln",
            "opt/kiln/serving",
            "opt/kiln/serving/cdsw",
            "opt/kiln/serving/cml",
            *library,
            SERVER_PATH.lstrip("/"),
            PROTOCOLS_PATH.lstrip("/"),
        ]
        core = tar.extractfile(entries["opt/kiln/serving/cml/_core.py"])
        assert core is not None and core.read() == Path(_core.__file__).read_bytes()
        server = entries[SERVER_PATH.lstrip("/")]
        assert (server.mode, server.uid, server.gid, server.mtime) == (0o644, 0, 0, 315532800)
        assert all(m.mode == 0o755 for m in entries.values() if m.isdir())
        for path, source in files.items():
            entry = entries[path.lstrip("/")]
            assert (entry.mode, entry.uid, entry.gid, entry.mtime) == (0o644, 0, 0, 315532800)
            extracted = tar.extractfile(entry)
            assert extracted is not None
            assert extracted.read() == Path(source).read_bytes()
    # The server imports its protocols by this name from its own directory.
    assert Path(PROTOCOLS_PATH).parent == Path(SERVER_PATH).parent
    assert Path(PROTOCOLS_PATH).stem == "model_protocols"
    assert serving_tar({SERVER_PATH: b"other"}) != first


def test_the_command_runs_the_server_on_its_port() -> None:
    assert server_command("src/m.py", "predict", threads=8) == (
        "python3",
        SERVER_PATH,
        "--file",
        "src/m.py",
        "--function",
        "predict",
        "--port",
        "8080",
        "--threads",
        "8",
        "--processes",
        "1",
    )


def _layer(n: int) -> Layer:
    return Layer(
        f"sha256:{n:064x}",
        10,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        f"sha256:{n + 100:064x}",
    )


def test_the_image_config_names_the_layer_and_the_port(tmp_path: Path) -> None:
    base_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "ExposedPorts": {"22/tcp": {}}},
        "history": [{"created_by": "base"}],
    }
    base = Base(
        Reference.parse("runtimes/python:3.11"),
        "sha256:" + "a" * 64,
        base_config,
        "sha256:" + "b" * 64,
        (_layer(1),),
        tmp_path,
    )
    snap = Snapshot("c" * 40, "d" * 40, None, True, 1_700_000_000, 1, 10)
    spec = pipeline.BuildSpec(
        build_id="b1",
        attempt=1,
        number=1,
        project="alice/demo",
        project_dir=tmp_path,
        repository="alice/demo/build",
        tags=("1",),
        base=Reference.parse("runtimes/python:3.11"),
        command=server_command("m.py", "predict"),
        serving=True,
    )
    config = pipeline.image_config(spec, base, snap, [_layer(2), _layer(3), _layer(4)], "installed")
    assert [h["created_by"] for h in config["history"]] == [
        "base",
        "kiln: dependencies (installed)",
        "kiln: model server",
        f"kiln: project snapshot {'c' * 40}",
    ]
    assert config["config"]["ExposedPorts"] == {"22/tcp": {}, "8080/tcp": {}}
    assert base_config["config"]["ExposedPorts"] == {"22/tcp": {}}  # the base's untouched
    assert config["config"]["Cmd"][:2] == ["python3", SERVER_PATH]
    assert len(config["rootfs"]["diff_ids"]) == 4
    without_deps = pipeline.image_config(spec, base, snap, [_layer(3), _layer(4)], "none")
    assert [h["created_by"] for h in without_deps["history"]][1:2] == ["kiln: model server"]
