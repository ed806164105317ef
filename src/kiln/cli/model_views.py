"""How the `kiln models` commands show models: states, the replica and deployment tables."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import human_size, when
from kiln.sdk.model_serving import Deployment, Replica

T = TypeVar("T")

NAME_ARG = typer.Argument(
    metavar="NAME", help="The model's name (see `kiln models list`).", show_default=False
)
STATE_STYLE = {
    "serving": "green",
    "running": "green",
    "deploying": "cyan",
    "starting": "cyan",
    "queued": "cyan",
    "waiting": "cyan",
    "draining": "yellow",
    "stopping": "yellow",
    "stopped": "yellow",
    "failed": "red",
}


def state(value: str) -> str:
    """A model's, deployment's or replica's state, coloured."""
    style = STATE_STYLE.get(value)
    return f"[{style}]{value}[/]" if style else value


def first(items: Iterable[T], count: int) -> list[T]:
    """At most ``count`` items of a paged iteration (no more pages are fetched)."""
    found: list[T] = []
    for item in items:
        found.append(item)
        if len(found) >= count:
            break
    return found


def replicas_table(replicas: list[Replica]) -> Table:
    table = Table(
        "REPLICA", "DEPLOYMENT", "BUILD", "SLOT", "STATE", "READY SINCE", "RESTARTS", "LAST EXIT",
        box=None, pad_edge=False,
    )  # fmt: skip
    for r in replicas:
        exit_reason = escape(r.last_exit_reason or "-")
        table.add_row(
            r.id,
            f"#{r.deployment}",
            f"#{r.build}",
            str(r.slot),
            state(r.state),
            when(r.ready_since) if r.ready else "[dim]not ready[/]",
            str(r.restarts),
            exit_reason,
        )
    return table


def deployments_table(deployments: list[Deployment]) -> Table:
    table = Table(
        "DEPLOYMENT", "BUILD", "STATE", "REPLICAS", "RESOURCES", "BY", "CREATED", "REASON",
        box=None, pad_edge=False,
    )  # fmt: skip
    for d in deployments:
        table.add_row(
            f"#{d.number}",
            f"#{d.build}",
            state(d.state),
            str(d.replicas),
            f"{d.cpu_millis / 1000:g} vCPU, {human_size(d.memory_bytes)}",
            escape(d.created_by or "-"),
            when(d.created_at),
            escape(d.reason.splitlines()[0] if d.reason else ""),
        )
    return table
