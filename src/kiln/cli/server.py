"""Server-side commands: `kiln up`, `kiln db upgrade`, `kiln users`."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, make_url, select
from sqlalchemy.exc import OperationalError

from kiln.bootstrap import migrate, prepare_data_dir, seed_admin
from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.models import User
from kiln.domain.errors import KilnError
from kiln.domain.identity import create_user
from kiln.settings import Settings

console = Console()
err = Console(stderr=True)

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


def up(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [env: KILN_WEB_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="HTTPS port [env: KILN_WEB_PORT]")] = None,
) -> None:
    """Run a whole Kiln site on this machine: migrate, seed the first admin, serve HTTPS.

    Creates the data directory, Kiln's certificate authority (DATA_DIR/pki/ca.crt) and a
    server certificate, then serves the UI and API until Ctrl-C or SIGTERM.
    """
    import uvicorn

    from kiln.app import create_app
    from kiln.pki.ca import CertificateAuthority, web_server_names

    settings = load(data_dir)
    if host:
        settings.web.host = host
    if port:
        settings.web.port = port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prepare_data_dir(settings)
    engine = migrate_or_exit(settings)
    admin = seed_admin(engine, settings)
    ca = CertificateAuthority(settings.pki_dir)
    ca.load_or_create()
    cert, key = ca.ensure_leaf("web-server", web_server_names(settings.domain))
    app = create_app(settings, engine) if settings.web.workers == 1 else None
    wildcard = ("127.0.0.1", "0.0.0.0", "::")  # noqa: S104 (names, not a bind)
    shown_host = "localhost" if settings.web.host in wildcard else settings.web.host
    url = f"https://{shown_host}:{settings.web.port}/"
    console.print(f"[bold green]Kiln is up[/] at [link={url}]{url}[/link]")
    console.print(
        f"  CA certificate (trust it to avoid browser warnings): {ca.cert_path.resolve()}"
    )
    if admin is not None and admin.password is not None:
        console.print(
            f"  First admin created. Log in as [bold]{admin.username}[/] with password "
            f"[bold]{admin.password}[/] (shown once; change it under Account)."
        )
    elif admin is not None:
        console.print(
            f"  First admin created: [bold]{admin.username}[/] (password from KILN_ADMIN_PASSWORD)."
        )
    else:
        console.print("  Log in with an existing account; `kiln users create` adds one.")
    sys.stdout.flush()
    options: dict[str, Any] = dict(
        host=settings.web.host,
        port=settings.web.port,
        ssl_certfile=str(cert) if settings.web.tls else None,
        ssl_keyfile=str(key) if settings.web.tls else None,
        log_level="info",
        access_log=settings.web.access_log,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    if settings.web.workers > 1:
        # Worker processes build their own app from the environment: pass on what the
        # command line changed.
        os.environ["KILN_DATA_DIR"] = str(settings.data_dir.resolve())
        uvicorn.run(
            "kiln.app:app_from_environment", factory=True, workers=settings.web.workers, **options
        )
    else:
        assert app is not None
        server_ = uvicorn.Server(uvicorn.Config(app, **options))
        signal.signal(signal.SIGTERM, lambda *_: setattr(server_, "should_exit", True))
        server_.run()
    console.print("Kiln stopped.")


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
    app.command("up")(up)
    app.add_typer(db_app, name="db")
    app.add_typer(users_app, name="users")
