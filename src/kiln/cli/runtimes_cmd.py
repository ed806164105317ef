"""`kiln runtimes list|add|build-base`: the runtime catalog, managed on the server machine."""

from __future__ import annotations

import json
import time
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


@app.command("build-base")
def build_base(
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="Where to push it in the registry [default: KILN_BUILDER_BASE_IMAGE, "
            "runtimes/python:3.11]",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Make Kiln's base image now: Debian with Python and pip from Debian's packages.

    Installs a minimal Debian (mmdebstrap, from KILN_BUILDER_DEBIAN_MIRROR) with python3,
    pip and venv, plus this host's extra CA certificates; writes it as one reproducible
    layer; pushes it to the builds' registry and adds it to the runtime catalog. A recipe
    built before comes from the cache (DATA_DIR/builder/base) in seconds. The builder does
    this by itself on first start when the registry has no base; this command shows the
    progress and waits. Needs root.
    """
    from kiln.build.registry_client import Reference
    from kiln.builder.base import TargetUnavailable, open_target, publish_base

    settings = load(data_dir)
    try:
        ref = Reference.parse(reference or settings.builder.base_image)
        target = open_target(settings)
    except (ValueError, TargetUnavailable) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    factory = make_sessionmaker(make_engine(settings.db_url))
    started = time.monotonic()
    with console.status("starting", spinner="dots") as status:

        def progress(line: str) -> None:
            elapsed = time.monotonic() - started
            console.print(f"[dim]{elapsed:6.1f}s[/] {line}", highlight=False, markup=False)
            status.update(f"making the base image {ref} ({elapsed:.0f}s): {line[:80]}")

        try:
            digest = publish_base(settings, target, factory, ref, progress)
        except Exception as exc:  # mmdebstrap, the registry, the unpack: all said in words
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
        finally:
            target.close()
    console.print(f"base image {ref} ready: {digest}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="runtimes")
