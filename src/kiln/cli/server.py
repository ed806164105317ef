"""Server-side commands: `kiln up`, `kiln db upgrade`, `kiln users`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, make_url, select
from sqlalchemy.exc import OperationalError

from kiln.bootstrap import migrate, prepare_data_dir
from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.models import User
from kiln.domain.errors import KilnError
from kiln.domain.identity import create_user
from kiln.settings import Settings

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Kiln's data directory [env: KILN_DATA_DIR; default ./.kiln-data]"
    ),
]


def load(data_dir: Path | None = None) -> Settings:
    try:
        settings = Settings() if data_dir is None else Settings(data_dir=data_dir)
    except ValidationError as exc:
        err.print(f"[red]error:[/] invalid settings: {exc}")
        raise typer.Exit(2) from exc
    return settings


def run_service(settings: Settings, serve: Callable[[Settings], None]) -> None:
    """A root service (``kiln runner``, ``kiln builder``) with logging to stderr; a host that
    cannot run sandboxes is one error line and exit status 1."""
    from kiln.runtimes.base import RuntimeUnavailable

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(settings)
    except RuntimeUnavailable as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def migrate_or_exit(settings: Settings) -> Engine:
    """Migrate, or explain in one line why the database cannot be reached."""
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
    except OperationalError as exc:
        shown = make_url(settings.db_url).render_as_string(hide_password=True)
        err.print(f"[red]error:[/] cannot use the database {shown}: {exc.orig or exc}")
        raise typer.Exit(1) from exc
    return engine


db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Migrate the database schema to this version of Kiln."""
    settings = load(data_dir)
    prepare_data_dir(settings)
    migrate_or_exit(settings)
    console.print("database is up to date")


users_app = typer.Typer(help="Manage user accounts directly in the database.", no_args_is_help=True)


@users_app.command("create")
def users_create(
    username: str,
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="The password (prompted when omitted)",
        ),
    ],
    site_admin: Annotated[bool, typer.Option("--site-admin", help="Make a site admin")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create a user account."""
    settings = load(data_dir)
    engine = make_engine(settings.db_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            create_user(db, username, password, site_admin=site_admin)
    except KilnError as exc:
        err.print(f"[red]error:[/] {exc.detail}")
        raise typer.Exit(1) from exc
    console.print(f"created user {username}")


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """List user accounts."""
    settings = load(data_dir)
    with make_sessionmaker(make_engine(settings.db_url))() as db:
        users = list(db.scalars(select(User).order_by(User.id)))
    rows: list[dict[str, str | bool]] = [
        {
            "username": u.username,
            "site_admin": u.is_site_admin,
            "active": u.is_active,
            "created_at": u.created_at.isoformat(),
        }
        for u in users
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("username", "site admin", "active", "created")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(users_app, name="users")
