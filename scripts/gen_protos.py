"""Regenerate the gRPC stubs from src/kiln/rpc/*.proto with grpcio-tools.

Run from anywhere: ``.venv/bin/python scripts/gen_protos.py``. The generated ``*_pb2.py``,
``*_pb2.pyi`` and ``*_pb2_grpc.py`` are committed, so a Kiln install never needs grpcio-tools.

The proto root is ``src/`` (the files are named ``kiln/rpc/x.proto``), so generated modules
import each other as ``from kiln.rpc import x_pb2``: no import rewriting needed.
``--check`` regenerates into a temporary directory and fails when the committed stubs differ.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

SRC = Path(__file__).resolve().parent.parent / "src"
PROTO_DIR = SRC / "kiln" / "rpc"


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under kiln/rpc into ``out_root``; return the generated files."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    for proto in protos:
        rel = proto.relative_to(SRC).as_posix()
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{SRC}",
                f"-I{well_known}",
                f"--python_out={out_root}",
                f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}",
                rel,
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed on {rel} (exit {status})")
    out_dir = out_root / "kiln" / "rpc"
    return sorted(p for p in out_dir.glob("*_pb2*.py*"))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PROTO_DIR / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(target.name)
            else:
                shutil.copyfile(path, target)
                print(f"wrote {target.relative_to(SRC.parent)}")
    if stale:
        print(f"stale generated stubs (run scripts/gen_protos.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
