"""`kiln builder`: run the builder service alone (``kiln up`` runs it beside web and runner)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from kiln.cli.server import DataDir, err, load


def builder(
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option(help="gRPC port [env: KILN_BUILDER_PORT]")] = None,
) -> None:
    """Build project images (source-to-image) from the build queue until SIGTERM.

    Must run as root (each build's install runs in a sandbox as an unprivileged uid). On
    first start it makes Kiln's Debian base image in the background if the registry has
    none. A build interrupted by a restart of this command is retried once.
    """
    from kiln.builder.process import serve
    from kiln.runtimes.base import RuntimeUnavailable

    settings = load(data_dir)
    if port:
        settings.builder.port = port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(settings)
    except RuntimeUnavailable as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def register(app: typer.Typer) -> None:
    app.command("builder")(builder)
