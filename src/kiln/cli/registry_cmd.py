"""`kiln registry gc`: the registry's garbage collection, on the server machine."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kiln.cli.server import DataDir, console, load
from kiln.db.engine import make_engine, make_sessionmaker

app = typer.Typer(
    help="Kiln's OCI registry (served at /v2/ by the web tier).", no_args_is_help=True
)


@app.command("gc")
def gc(
    untagged: Annotated[
        bool,
        typer.Option(
            "--untagged",
            help="Also remove manifests without a tag (older than the grace period) that no "
            "runtime, build or deployment points at and no index or subject holds",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; remove nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """Remove blobs no manifest references, abandoned uploads and stray files.

    Blobs pushed less than KILN_REGISTRY_GC_GRACE_SECONDS ago (default one hour) are kept
    whatever references them, since a client pushes layers before the manifest naming them.

    Safe to run while the site serves pushes; the runner also runs it every
    KILN_REGISTRY_GC_INTERVAL_SECONDS.
    """
    from kiln.build.registry.gc import collect_garbage
    from kiln.build.registry.storage import BlobStore

    settings = load(data_dir)
    sessions = make_sessionmaker(make_engine(settings.db_url))
    report = collect_garbage(
        sessions, BlobStore(settings.registry_dir), settings, untagged=untagged, dry_run=dry_run
    )
    if as_json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        console.print(report.summary())


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="registry")
