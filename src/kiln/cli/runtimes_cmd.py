"""`kiln runtimes list|add`: the runtime catalog, managed on the server machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from kiln.cli.server import DataDir, console, err, load
from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.domain import resources
from kiln.domain.errors import KilnError

app = typer.Typer(
    help="The runtime catalog: the built-in runtime, and images added from Kiln's registry or "
    "from OCI archives.",
    no_args_is_help=True,
)


@app.command("list")
def list_runtimes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """List runtimes (the built-in one, derived from this host's Python, is always there)."""
    settings = load(data_dir)
    with transaction(make_sessionmaker(make_engine(settings.db_url))) as db:
        resources.ensure_builtin_runtime(db)
        rows: list[dict[str, Any]] = [
            {
                "name": r.name,
                "source": r.source,
                "python": r.python_version,
                "editors": r.editors,
                "default": r.is_default,
                "digest": r.digest or "",
            }
            for r in resources.list_runtimes(db)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("name", "source", "python", "editors", "default", "digest")
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["source"]),
            str(r["python"]),
            ", ".join(r["editors"]),
            "yes" if r["default"] else "",
            str(r["digest"])[:19],
        )
    console.print(table)


@app.command("add")
def add_runtime(
    archive: Annotated[
        Path | None, typer.Argument(help="An oci-archive or docker-archive tar file")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="An image in Kiln's registry instead of an archive, e.g. runtimes/python:3.12",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Catalog name, e.g. python3.12-lab (default for --image: "
            "from the image, python-3.12)",
        ),
    ] = None,
    description: Annotated[str, typer.Option(help="Shown to users")] = "",
    data_dir: DataDir = None,
) -> None:
    """Add a runtime, verified and unpacked into the runtime cache, from an image pushed to
    Kiln's registry or from an OCI image archive.

    From the registry (push it first with any OCI client, as a site admin):

      skopeo copy docker-archive:py.tar docker://HOST/runtimes/python:3.12

      kiln runtimes add --image runtimes/python:3.12

    From an archive: kiln runtimes add py312.tar --name python3.12
    """
    if (archive is None) == (image is None):
        err.print("[red]error:[/] name an archive file or --image (one of them)")
        raise typer.Exit(2)
    if archive is not None and not name:
        err.print("[red]error:[/] an archive needs --name")
        raise typer.Exit(2)
    settings = load(data_dir)
    factory = make_sessionmaker(make_engine(settings.db_url))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console
    ) as bar:
        task = bar.add_task("verifying", total=None)

        def progress(done: int, total: int, stage: str) -> None:
            bar.update(task, completed=done, total=total or None, description=stage)

        try:
            with transaction(factory) as db:
                if image is not None:
                    row = resources.add_registry_runtime(
                        db, settings, image, name, description, progress
                    )
                else:
                    assert archive is not None and name is not None
                    row = resources.add_image_runtime(
                        db, settings, archive, name, description, progress
                    )
                summary = (
                    f"added runtime {row.name} ({row.digest}), editors: {', '.join(row.editors)}"
                )
        except KilnError as exc:
            err.print(f"[red]error:[/] {exc.detail}")
            raise typer.Exit(1) from exc
    console.print(summary)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="runtimes")
