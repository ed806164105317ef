"""`kiln models keys create|list|revoke`: your model API keys, for calling models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import JSON_OPTION, connect, err, friendly_errors, out, print_json, when

app = typer.Typer(
    help="Create, list and revoke your model API keys (kilnm_...): the Bearer keys that call "
    "models. They open nothing else, and your regular API key does not call models.",
    no_args_is_help=True,
)


@app.command("create")
@friendly_errors
def create(
    name: Annotated[str, typer.Option(help="What the key is for, e.g. 'dashboard'.")] = "",
    expires_in_days: Annotated[
        int | None,
        typer.Option(min=1, max=3650, help="Expire after N days (default: the site's, a year)."),
    ] = None,
    never_expires: Annotated[
        bool, typer.Option("--never-expires", help="A key without expiry.")
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create a model API key. It is printed alone on stdout, once: copy it now.

    Send it as `Authorization: Bearer KEY` when calling a model of a project you are a
    collaborator of.

    Examples:

      export KILN_MODEL_API_KEY=$(kiln models keys create --name notebook)

      kiln models keys create --name ci --expires-in-days 30 --json
    """
    if never_expires and expires_in_days is not None:
        raise typer.BadParameter("give --expires-in-days or --never-expires, not both")
    with connect() as kiln:
        created = kiln.create_model_api_key(name, expires_in_days, never_expires)
    if as_json:
        print_json(created)
        return
    print(created.key)
    expiry = f", expires {when(created.expires_at)}" if created.expires_at else ", never expires"
    err.print(f"Created model API key {created.id}{expiry}. It is shown only once.")


@app.command("list")
@friendly_errors
def list_(as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """List your model API keys that are not revoked (their prefixes, never the keys).

    Example:

      kiln models keys list
    """
    with connect() as kiln:
        keys = kiln.list_model_api_keys()
    if as_json:
        print_json(keys)
        return
    if not keys:
        out.print("No model API keys; create one with `kiln models keys create`.")
        return
    table = Table("ID", "NAME", "PREFIX", box=None, pad_edge=False)
    for column in ("CREATED", "EXPIRES", "LAST USED"):
        table.add_column(column, no_wrap=True)
    for k in keys:
        table.add_row(
            str(k.id),
            escape(k.name or "-"),
            f"{k.prefix}…",
            when(k.created_at),
            when(k.expires_at) if k.expires_at else "never",
            when(k.last_used_at) if k.last_used_at else "never",
        )
    out.print(table)


@app.command("revoke")
@friendly_errors
def revoke(
    key_id: Annotated[int, typer.Argument(metavar="ID", help="From `kiln models keys list`.")],
) -> None:
    """Revoke a model API key: calls with it are refused within seconds.

    Example:

      kiln models keys revoke 4
    """
    with connect() as kiln:
        kiln.revoke_model_api_key(key_id)
    out.print(f"Revoked model API key {key_id}")
