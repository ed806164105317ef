"""`kiln files ls|get|put` end to end against the real HTTPS server."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli


@pytest.fixture
def cli(live: LiveServer, alice: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    cli = Cli.isolated(live, tmp_path, monkeypatch)
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    return cli


def test_put_ls_get_round_trip(cli: Cli) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 3)
    (cli.workdir / "weights.bin").write_bytes(payload)
    put = cli.ok("files", "put", "alice/demo", "weights.bin", "models/")
    assert put.stdout.strip() == "Uploaded weights.bin to alice/demo:/models/weights.bin (2.0 MiB)"

    top = cli.ok("files", "ls", "alice/demo").stdout
    assert "models/" in top and "requirements.txt" in top and "README.md" in top
    listed = json.loads(cli.ok("files", "ls", "alice/demo", "models", "--json").stdout)
    assert [(e["name"], e["type"], e["size"]) for e in listed] == [
        ("weights.bin", "file", len(payload))
    ]

    got = cli.ok("files", "get", "alice/demo", "models/weights.bin", "copy.bin")
    assert "Saved models/weights.bin to copy.bin" in got.stdout
    assert (cli.workdir / "copy.bin").read_bytes() == payload
    (cli.workdir / "into").mkdir()
    cli.ok("files", "get", "alice/demo", "models/weights.bin", "into")
    assert (cli.workdir / "into" / "weights.bin").read_bytes() == payload
    cli.ok("files", "get", "alice/demo", "requirements.txt")  # default: ./<name>
    assert (cli.workdir / "requirements.txt").stat().st_size > 0


def test_put_defaults_to_the_file_name_and_replaces(cli: Cli) -> None:
    notes = cli.workdir / "notes.txt"
    notes.write_text("first")
    cli.ok("files", "put", "alice/demo", "notes.txt")
    notes.write_text("second version")
    replaced = cli.ok("files", "put", "alice/demo", str(notes), "docs/renamed.txt")
    assert "alice/demo:/docs/renamed.txt (14 B)" in replaced.stdout
    assert cli.ok("files", "get", "alice/demo", "notes.txt", "-").stdout == "first"
    assert cli.ok("files", "get", "alice/demo", "docs/renamed.txt", "-").stdout == "second version"


def test_get_a_folder_as_an_archive(cli: Cli) -> None:
    (cli.workdir / "x.csv").write_text("a,b\n")
    cli.ok("files", "put", "alice/demo", "x.csv", "data/")
    saved = cli.ok("files", "get", "alice/demo", "data/")
    assert "to data.tar.gz" in saved.stdout
    with tarfile.open(cli.workdir / "data.tar.gz") as archive:
        assert any(name.endswith("data/x.csv") for name in archive.getnames())
    cli.ok("files", "get", "alice/demo", "data/", "--format", "zip")
    assert (cli.workdir / "data.zip").stat().st_size > 0


def test_ls_of_a_subfolder_and_of_a_missing_one(cli: Cli) -> None:
    (cli.workdir / "a.txt").write_text("a")
    cli.ok("files", "put", "alice/demo", "a.txt", "only/a.txt")
    only = json.loads(cli.ok("files", "ls", "alice/demo", "only/", "--json").stdout)
    assert [e["name"] for e in only] == ["a.txt"]
    missing = cli.fails("files", "ls", "alice/demo", "nope")
    assert missing.startswith("error: ") and "nope" in missing
    top = json.loads(cli.ok("files", "ls", "alice/demo", "--json").stdout)
    assert {"only": "dir", "main.py": "file"}.items() <= {e["name"]: e["type"] for e in top}.items()


def test_file_errors_are_one_clear_line(cli: Cli, bob: Account) -> None:
    missing = cli.fails("files", "get", "alice/demo", "missing.txt", "out.txt")
    assert missing.startswith("error: ") and "missing.txt" in missing
    assert len(missing.strip().splitlines()) == 1
    assert not (cli.workdir / "out.txt").exists()
    assert list(cli.workdir.iterdir()) == []  # no temporary file left either

    (cli.workdir / "x.txt").write_text("x")
    unsafe = cli.fails("files", "put", "alice/demo", "x.txt", "../escape.txt")
    assert unsafe.strip() == (
        "error: path '../escape.txt' has a '..' component; use a plain path such as 'dir/file.txt'"
    )

    assert cli.fails("files", "ls", "alice/ghost").strip() == "error: project alice/ghost not found"
    # A local file that does not exist is refused before anything is sent: no empty upload.
    missing = cli.fails("files", "put", "alice/demo", "does-not-exist.txt", code=2)
    assert "'does-not-exist.txt' does not exist" in missing
    listed = json.loads(cli.ok("files", "ls", "alice/demo", "--json").stdout)
    assert "does-not-exist.txt" not in {e["name"] for e in listed}
    cli.fails("files", "put", "alice/demo", ".", code=2)  # a folder is not a file

    cli.login(bob)  # a stranger cannot even learn that the project exists
    assert cli.fails("files", "ls", "alice/demo").strip() == "error: project alice/demo not found"
