"""`kiln runner`: run the runner service alone (``kiln up`` runs it beside the web tier)."""

from __future__ import annotations

from typing import Annotated

import typer

from kiln.cli.server import DataDir, load, run_service


def runner(
    data_dir: DataDir = None,
    port: Annotated[int | None, typer.Option(help="gRPC port [env: KILN_RUNNER_PORT]")] = None,
) -> None:
    """Run workloads for the web tier: gRPC with mutual TLS until SIGTERM.

    Must run as root (it builds sandboxes and drops each workload to an unprivileged uid).
    Workloads survive a restart of this command: the next runner re-attaches to them.
    """
    from kiln.runner.process import serve

    settings = load(data_dir)
    if port:
        settings.runner.port = port
    run_service(settings, serve)


def register(app: typer.Typer) -> None:
    app.command("runner")(runner)
