"""The pieces of a build image that must be reproducible, and the names a build accepts."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from kiln.build import in_sandbox
from kiln.build.deps import build_environment, dependency_key
from kiln.build.layers import canonical_json, compress_layer, json_blob
from kiln.build.registry_client import Reference
from kiln.build.snapshot import DependencyFile


def test_compressing_a_layer_is_reproducible_and_hashes_both_forms() -> None:
    data = b"".join(bytes([i % 251]) * 1000 for i in range(3000))
    first, second = io.BytesIO(), io.BytesIO()
    layer = compress_layer([data[:100_000], data[100_000:]], first)
    again = compress_layer([data], second)
    assert first.getvalue() == second.getvalue() and layer == again
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer.digest == "sha256:" + hashlib.sha256(first.getvalue()).hexdigest()
    assert layer.size == len(first.getvalue())
    assert gzip.decompress(first.getvalue()) == data
    header = first.getvalue()[:10]
    assert header[4:8] == b"\0\0\0\0"  # mtime 0: no time in the blob


def test_json_is_canonical() -> None:
    a, _ = json_blob({"b": 1, "a": [1, 2]}, "x")
    b, _ = json_blob({"a": [1, 2], "b": 1}, "x")
    assert a == b and canonical_json({"b": 1, "a": 2}) == b'{"a":2,"b":1}'


def _deps_tree(root: Path, order: list[str]) -> Path:
    deps = root / "opt" / "kiln" / "deps"
    for name in order:
        path = deps / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
        os.utime(path, (1234567, 1234567 + len(order)))
    (deps / "bin").mkdir(exist_ok=True)
    tool = deps / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o700)
    (deps / "link").symlink_to("lib/a.py")
    (deps / "dirlink").symlink_to("lib")
    return deps


def test_the_dependency_layer_is_the_same_whatever_the_disk_says(tmp_path: Path) -> None:
    """Written by the sandbox: sorted, fixed times, root-owned, 0755/0644, links as links."""
    one = _deps_tree(tmp_path / "one", ["lib/b.py", "lib/a.py", "z.txt"])
    two = _deps_tree(tmp_path / "two", ["z.txt", "lib/a.py", "lib/b.py"])
    out_one, out_two = tmp_path / "one.tar", tmp_path / "two.tar"
    with out_one.open("wb") as f:
        in_sandbox.write_layer(315532800, f, str(one), str(tmp_path / "one"))
    with out_two.open("wb") as f:
        in_sandbox.write_layer(315532800, f, str(two), str(tmp_path / "two"))
    assert out_one.read_bytes() == out_two.read_bytes()
    with tarfile.open(out_one) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:3] == ["opt", "opt/kiln", "opt/kiln/deps"]
    assert names.index("opt/kiln/deps/bin/tool") < names.index("opt/kiln/deps/lib/a.py")
    assert {m.mtime for m in members} == {315532800}
    assert {(m.uid, m.gid, m.uname) for m in members} == {(0, 0, "")}
    by_name = {m.name: m for m in members}
    assert by_name["opt/kiln/deps/bin/tool"].mode == 0o755
    assert by_name["opt/kiln/deps/z.txt"].mode == 0o644
    assert by_name["opt/kiln/deps/link"].issym()
    assert by_name["opt/kiln/deps/dirlink"].issym()
    assert "opt/kiln/deps/dirlink/a.py" not in by_name  # a link to a directory is not followed


def _file(data: bytes | None, symlink: bool = False) -> DependencyFile:
    return DependencyFile("requirements.txt", data, symlink)


def test_the_dependency_key_follows_its_inputs_only() -> None:
    base = "sha256:" + "1" * 64
    files = {"requirements.txt": _file(b"six\n")}
    key = dependency_key(base, files, "tree1", {"PIP_INDEX_URL": "https://pypi.org/simple"})
    assert key == dependency_key(
        base, files, "tree2", {"PIP_INDEX_URL": "https://pypi.org/simple", "OTHER": "x"}
    )
    assert key != dependency_key("sha256:" + "2" * 64, files, "tree1", {})
    assert key != dependency_key(base, {"requirements.txt": _file(b"six==1\n")}, "tree1", {})
    assert key != dependency_key(base, files, "tree1", {"PIP_INDEX_URL": "https://mirror"})
    # A symlinked requirements.txt is only known in the sandbox: the whole tree counts.
    linked = {"requirements.txt": _file(None, symlink=True)}
    assert dependency_key(base, linked, "tree1", {}) != dependency_key(base, linked, "tree2", {})


def test_the_install_environment_cannot_be_overridden_where_it_matters() -> None:
    env = build_environment(
        {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        {"PIP_USER": "0", "PYTHONUSERBASE": "/elsewhere", "MY_VAR": "kept"},
        deadline=1000.0,
    )
    assert env["PATH"] == "/opt/kiln/deps/bin:/usr/bin:/bin"
    assert env["PIP_USER"] == "1" and env["PYTHONUSERBASE"] == "/opt/kiln/deps"
    assert env["MY_VAR"] == "kept" and env["KILN_BUILD_DEADLINE"] == "1030"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("runtimes/python:3.11", ("runtimes/python", "3.11", None)),
        ("alice/demo/build", ("alice/demo/build", None, None)),
        ("a/b@sha256:" + "a" * 64, ("a/b", None, "sha256:" + "a" * 64)),
        ("a-b/c__d:v1.0-x", ("a-b/c__d", "v1.0-x", None)),
    ],
)
def test_references(text: str, parsed: tuple[str, str | None, str | None]) -> None:
    ref = Reference.parse(text)
    assert (ref.repository, ref.tag, ref.digest) == parsed and str(ref) == text


@pytest.mark.parametrize(
    "bad", ["Runtimes/python", "a//b", "a/../b", "-a/b", "a/b:", "a/b:-x", "a/b@md5:00", "a_-b/c"]
)
def test_bad_references(bad: str) -> None:
    with pytest.raises(ValueError, match="not an image reference"):
        Reference.parse(bad)
