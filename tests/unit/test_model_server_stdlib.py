"""The model server is copied into model images with its protocols (``model_protocols``) and
the CML library beside it, and run by the image's own Python: they may import nothing but the
standard library and each other (nothing else of Kiln)."""

from __future__ import annotations

import ast
import sys

import pytest

from kiln.serving import model_protocols, model_server
from tests.unit.test_layout import SRC, imported_modules

# How model_server imports its sibling: relatively as part of Kiln, by its bare name as a
# script beside it in the image.
SIBLINGS = {"kiln.serving", "kiln.serving.model_protocols", "model_protocols"}


@pytest.mark.parametrize("module", [model_server, model_protocols])
def test_the_model_server_imports_only_the_standard_library(module: object) -> None:
    path = SRC / "serving" / f"{module.__name__.rpartition('.')[2]}.py"
    names = {name for _, name in imported_modules(path, SRC.parent)} - SIBLINGS
    tops = {name.split(".")[0] for name in names}
    tops.discard("__future__")
    foreign = sorted(t for t in tops if t not in sys.stdlib_module_names)
    assert foreign == [], foreign
    assert getattr(module, "__file__", None) == str(path)


def test_the_cml_library_imports_only_the_standard_library_and_itself() -> None:
    """It is copied beside the server into model images and into sessions and jobs."""
    for package in ("cml", "cdsw"):
        for path in sorted((SRC.parent / package).glob("*.py")):
            tops = {name.split(".")[0] for _, name in imported_modules(path, SRC.parent)}
            tops -= {"__future__", "cml"}
            foreign = sorted(t for t in tops if t not in sys.stdlib_module_names)
            assert foreign == [], (path.name, foreign)
            # An image's Python may be 3.9: no newer syntax (annotations stay strings).
            ast.parse(path.read_text(), str(path), feature_version=(3, 9))
            if tops:  # a module with code: its annotations must not be evaluated on 3.9
                assert "from __future__ import annotations" in path.read_text(), path.name


def test_arguments_are_checked() -> None:
    args = model_server.parse_args(["--file", "m.py", "--function", "f", "--port", "9000"])
    assert (args.threads, args.processes, args.port) == (4, 1, 9000)
    assert args.max_body_bytes == 5 * 1024 * 1024
    for bad in (["--threads", "0"], ["--processes", "65"], ["--port", "70000"]):
        try:
            model_server.parse_args(["--file", "m.py", "--function", "f", *bad])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")


def test_parse_request_refuses_precisely() -> None:
    cases = [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not an array"),
        (b'"x"', "not a string"),
        (b"{}", 'no "request"'),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ]
    for body, words in cases:
        try:
            model_server.parse_request(body)
        except model_server.CallFailed as failed:
            assert failed.status == 400 and words in failed.message, (body[:20], failed.message)
        else:
            raise AssertionError(f"{body[:20]!r} was accepted")
    assert model_server.parse_request(b'{"accessKey": "k", "request": {"a": 1}}') == {"a": 1}
    assert model_server.parse_request(b'{"request": null}') is None


def test_depth_is_counted_by_containers() -> None:
    deep: object = 1
    for _ in range(101):
        deep = [deep]
    assert model_protocols.too_deep(deep, 100)
    assert not model_protocols.too_deep({"a": [[1]] * 10_000, "b": "[[[["}, 100)
    assert not model_protocols.too_deep("[" * 500, 100)
    wide = {"rows": [{"x": [1, 2]} for _ in range(1000)]}
    assert not model_protocols.too_deep(wide, 4)  # object > array > object > array
    assert model_protocols.too_deep(wide, 3)
