"""`kiln runtimes list|add` on the server machine's data dir (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kiln.build.oci.testing import Entry, layer_tar, write_docker_archive, write_oci_archive
from kiln.cli.main import app
from kiln.settings import Settings

runner = CliRunner()


def cli(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
    env = {"KILN_DATA_DIR": str(settings.data_dir), "KILN_DATABASE_URL": settings.db_url}
    return runner.invoke(app, list(args), env=env)


def image(tmp_path: Path, name: str, docker: bool = False) -> Path:
    layer = layer_tar(
        [
            Entry("bin", kind="dir", mode=0o755),
            Entry("bin/sh", data=b"#!fake shell\n", mode=0o755),
            Entry("usr/local/bin/jupyter-lab", data=b"#!lab\n", mode=0o755),
        ]
    )
    path = tmp_path / name
    (write_docker_archive if docker else write_oci_archive)(path, [layer])
    return path


def test_list_then_add_an_oci_and_a_docker_archive(
    settings: Settings, engine: object, tmp_path: Path
) -> None:
    listed = cli(settings, "runtimes", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [r["name"] for r in json.loads(listed.output)] == ["builtin"]

    added = cli(settings, "runtimes", "add", str(image(tmp_path, "a.tar")), "--name", "lab")
    assert added.exit_code == 0, added.output
    assert "added runtime lab" in added.output and "jupyterlab" in added.output
    docker = cli(
        settings, "runtimes", "add", str(image(tmp_path, "b.tar", docker=True)), "--name", "dock"
    )
    assert docker.exit_code == 0, docker.output

    rows = json.loads(cli(settings, "runtimes", "list", "--json").output)
    assert [(r["name"], r["source"]) for r in rows] == [
        ("builtin", "builtin"),
        ("lab", "oci-archive"),
        ("dock", "docker-archive"),
    ]
    assert (settings.data_dir / "runtimes").is_dir()


def test_bad_archives_and_names_are_refused_and_nothing_is_listed(
    settings: Settings, engine: object, tmp_path: Path
) -> None:
    good = image(tmp_path, "a.tar")
    evil = tmp_path / "evil.tar"
    write_oci_archive(evil, [layer_tar([Entry("../escape", data=b"x")])])
    cases = [
        (str(evil), "evil", ".."),
        (str(tmp_path / "missing.tar"), "missing", "not a file"),
        (str(good), "Bad Name", "not valid"),
    ]
    for archive, name, message in cases:
        result = cli(settings, "runtimes", "add", archive, "--name", name)
        assert result.exit_code == 1, result.output
        assert message in result.output
    assert cli(settings, "runtimes", "add", str(good), "--name", "lab").exit_code == 0
    again = cli(settings, "runtimes", "add", str(good), "--name", "lab")
    assert again.exit_code == 1 and "already exists" in again.output
    rows = json.loads(cli(settings, "runtimes", "list", "--json").output)
    assert [r["name"] for r in rows] == ["builtin", "lab"]
    assert not (tmp_path / "escape").exists()
