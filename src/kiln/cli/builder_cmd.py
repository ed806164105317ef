"""`kiln builder`: run the builder service alone (``kiln up`` runs it beside web and runner)."""

from __future__ import annotations

from typing import Annotated

import typer

from kiln.cli.server import DataDir, load, run_service


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

    settings = load(data_dir)
    if port:
        settings.builder.port = port
    run_service(settings, serve)


def register(app: typer.Typer) -> None:
    app.command("builder")(builder)
