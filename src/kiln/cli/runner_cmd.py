"""`kiln runner`: run the runner service alone (``kiln up`` runs it beside the web tier)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from kiln.cli.server import DataDir, err, load


def runner(
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option(help="gRPC port [env: KILN_RUNNER_PORT]")] = None,
) -> None:
    """Run workloads for the web tier: gRPC with mutual TLS until SIGTERM.

    Must run as root (it builds sandboxes and drops each workload to an unprivileged uid).
    Workloads survive a restart of this command: the next runner re-attaches to them.
    """
    from kiln.runner.process import serve
    from kiln.runtimes.base import RuntimeUnavailable

    settings = load(data_dir)
    if port:
        settings.runner.port = port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(settings)
    except RuntimeUnavailable as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def register(app: typer.Typer) -> None:
    app.command("runner")(runner)
