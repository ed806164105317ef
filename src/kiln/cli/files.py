"""`kiln files ls|get|put`: a project's files, streamed in both directions."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    friendly_errors,
    human_size,
    out,
    print_json,
    transfer_progress,
    when,
)
from kiln.sdk.client import Progress

app = typer.Typer(
    help="List, download and upload the files of a project.",
    no_args_is_help=True,
)


@app.command("ls")
@friendly_errors
def ls(
    project: Annotated[ProjectRef, PROJECT_ARG],
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="A folder inside the project (default: its top)",
            show_default=False,
        ),
    ] = "",
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List a folder of a project.

    Examples:

      kiln files ls alice/demo

      kiln files ls alice/demo data/raw --json
    """
    with connect() as kiln:
        entries = kiln.list_files(project.owner, project.slug, path)
    if as_json:
        print_json(entries)
        return
    if not entries:
        out.print(f"{escape(str(project))}:/{escape(path.strip('/'))} is empty.")
        return
    table = Table("NAME", "SIZE", "MODIFIED", box=None, pad_edge=False)
    for e in entries:
        name = f"[bold blue]{escape(e.name)}/[/]" if e.is_dir else escape(e.name)
        table.add_row(name, "-" if e.is_dir else human_size(e.size), when(e.modified))
    out.print(table)


class ArchiveFormat(enum.StrEnum):
    tar_gz = "tar.gz"
    zip = "zip"


@app.command("get")
@friendly_errors
def get(
    project: Annotated[ProjectRef, PROJECT_ARG],
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH", help="A file of the project, or a folder ending with / (archived)."
        ),
    ],
    dest: Annotated[
        str,
        typer.Argument(metavar="DEST", help="Where to save it: a file, a folder, or - for stdout."),
    ] = ".",
    archive_format: Annotated[
        ArchiveFormat, typer.Option("--format", help="Archive format for a folder.")
    ] = ArchiveFormat.tar_gz,
) -> None:
    """Download a file, or a whole folder as an archive (streamed; a failed download leaves
    nothing behind).

    Examples:

      kiln files get alice/demo train.py

      kiln files get alice/demo data/model.pkl ./models/

      kiln files get alice/demo README.md - | less

      kiln files get alice/demo data/ --format zip     # saves data.zip
    """
    folder = path.endswith("/")
    with connect() as kiln:

        def fetch(to: Path | BinaryIO, progress: Progress | None = None) -> Path | None:
            if folder:
                return kiln.download_folder(
                    project.owner, project.slug, path, to, archive_format.value, progress
                )
            return kiln.download(project.owner, project.slug, path, to, progress)

        if dest == "-":
            fetch(sys.stdout.buffer)
            sys.stdout.flush()
            return
        with transfer_progress(path) as progress:
            saved = fetch(Path(dest), progress)
    assert saved is not None
    out.print(f"Saved {escape(path)} to {escape(str(saved))} ({human_size(saved.stat().st_size)})")


@app.command("put")
@friendly_errors
def put(
    project: Annotated[ProjectRef, PROJECT_ARG],
    local: Annotated[
        Path,
        typer.Argument(
            metavar="LOCAL", exists=True, dir_okay=False, readable=True, help="The file to upload."
        ),
    ],
    remote: Annotated[
        str | None,
        typer.Argument(
            metavar="REMOTE",
            help="Its path in the project; ending in / means 'into this folder' "
            "(default: the file's name, at the top)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Upload a file into a project (streamed; replaces a file of the same path).

    Examples:

      kiln files put alice/demo train.py

      kiln files put alice/demo ./data.csv data/

      kiln files put alice/demo notes.txt docs/README.md
    """
    with connect() as kiln, transfer_progress(local.name) as progress:
        written = kiln.upload(project.owner, project.slug, local, remote, progress)
    out.print(
        f"Uploaded {escape(str(local))} to {escape(str(project))}:/{escape(written.path)} "
        f"({human_size(written.size)})"
    )
