"""`kiln keys create|list|revoke`: your API keys (for scripts, CI, git)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import JSON_OPTION, connect, err, friendly_errors, out, print_json, when
from kiln.sdk.config import forget_login, load_login

app = typer.Typer(help="Create, list and revoke your API keys.", no_args_is_help=True)


@app.command("create")
@friendly_errors
def create(
    name: Annotated[str, typer.Option(help="What the key is for, e.g. 'ci'.")] = "",
    expires_in_days: Annotated[
        int | None,
        typer.Option(min=1, max=3650, help="Expire after N days (default: never)"),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create an API key. It is shown once: copy it now.

    Use it as `Authorization: Bearer KEY` with curl, as the password for git, or with
    kiln.sdk.Client(url, KEY).

    Examples:

      kiln keys create --name ci --expires-in-days 90

      kiln keys create --name notebook --json
    """
    expires_at = None
    if expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days)
    with connect() as kiln:
        created = kiln.create_api_key(name, expires_at)
    if as_json:
        print_json(created)
        return
    print(created.key)  # alone on stdout, so `KEY=$(kiln keys create)` works
    expiry = f", expires {when(created.expires_at)}" if created.expires_at else ""
    err.print(f"Created key {created.id}{expiry}. It is shown only once; store it safely.")


@app.command("list")
@friendly_errors
def list_(as_json: Annotated[bool, JSON_OPTION] = False) -> None:
    """List your live API keys (never the keys themselves, only their prefixes).

    Examples:

      kiln keys list

      kiln keys list --json
    """
    with connect() as kiln:
        keys = kiln.list_api_keys()
    if as_json:
        print_json(keys)
        return
    own = load_login().key_id
    table = Table("ID", "NAME", "PREFIX", box=None, pad_edge=False)
    for column in ("CREATED", "EXPIRES", "LAST USED"):
        table.add_column(column, no_wrap=True)
    for k in keys:
        table.add_row(
            f"{k.id}*" if k.id == own else str(k.id),
            escape(k.name or "-"),
            f"{k.prefix}…",
            when(k.created_at),
            when(k.expires_at) if k.expires_at else "never",
            when(k.last_used_at) if k.last_used_at else "never",
        )
    out.print(table)
    if own in {k.id for k in keys}:
        out.print("* the key this CLI uses (revoking it logs you out)")


@app.command("revoke")
@friendly_errors
def revoke(
    key_id: Annotated[int, typer.Argument(metavar="ID", help="From `kiln keys list`.")],
) -> None:
    """Revoke an API key at once; anything using it gets 401 from then on.

    Examples:

      kiln keys revoke 12
    """
    with connect() as kiln:
        kiln.revoke_api_key(key_id)
    out.print(f"Revoked key {key_id}")
    if load_login().key_id == key_id:
        forget_login()
        out.print("That was this CLI's own key: you are logged out.")
