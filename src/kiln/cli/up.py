"""`kiln up` (the whole site under one supervisor) and `kiln web` (the web tier alone)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Annotated, Any

import typer

from kiln.bootstrap import SeededAdmin, prepare_data_dir, seed_admin
from kiln.cli.server import DataDir, console, err, load, migrate_or_exit
from kiln.db.engine import make_engine
from kiln.db.migrate import DatabaseNotMigrated
from kiln.pki.ca import CertificateAuthority, web_server_names
from kiln.settings import Settings
from kiln.supervisor import ServiceSpec, Supervisor

Host = Annotated[str | None, typer.Option(help="Address to bind [env: KILN_WEB_HOST]")]
Port = Annotated[int | None, typer.Option(help="HTTPS port [env: KILN_WEB_PORT]")]
READY_TIMEOUT = 60.0


def _settings(data_dir: Any, host: str | None, port: int | None) -> Settings:
    settings = load(data_dir)
    if host:
        settings.web.host = host
    if port:
        settings.web.port = port
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return settings


def web(data_dir: DataDir = None, host: Host = None, port: Port = None) -> None:
    """Serve the web tier alone (UI, REST API, git) over HTTPS until SIGTERM.

    Refuses a database that is not migrated (run `kiln db upgrade`). `kiln up` runs this
    beside the runner under its supervisor.
    """
    import uvicorn

    from kiln.app import create_app
    from kiln.apps.listener import uvicorn_options

    settings = _settings(data_dir, host, port)
    cert, key = CertificateAuthority(settings.pki_dir).ensure_leaf(
        "web-server", web_server_names(settings.domain)
    )
    options: dict[str, Any] = dict(
        host=settings.web.host,
        port=settings.web.port,
        ssl_certfile=str(cert) if settings.web.tls else None,
        ssl_keyfile=str(key) if settings.web.tls else None,
        log_level="info",
        access_log=settings.web.access_log,
        timeout_graceful_shutdown=5,
        **uvicorn_options(),  # slow and idle clients cannot exhaust the listener
    )
    try:
        app = create_app(settings, make_engine(settings.db_url))
    except DatabaseNotMigrated as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    if settings.web.workers > 1:
        # Each worker process builds its own app from the same environment.
        os.environ["KILN_DATA_DIR"] = str(settings.data_dir.resolve())
        uvicorn.run(
            "kiln.app:app_from_environment", factory=True, workers=settings.web.workers, **options
        )
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run()


def up(data_dir: DataDir = None, host: Host = None, port: Port = None) -> None:
    """Run a whole Kiln site on this machine.

    Creates the data directory, Kiln's certificate authority (DATA_DIR/pki/ca.crt) and
    certificates, migrates the database, seeds the first site admin, then runs the web tier,
    the runner and the builder as separate processes under one supervisor (a crashed service
    is restarted and the restart logged) until Ctrl-C or SIGTERM.
    """
    settings = _settings(data_dir, host, port)
    prepare_data_dir(settings)
    admin = seed_admin(migrate_or_exit(settings), settings)
    ca = CertificateAuthority(settings.pki_dir)
    ca.ensure_leaf("web-server", web_server_names(settings.domain))
    # The builder reaches Kiln's registry on the web tier's listener: every child learns
    # where it is, whether it came from the command line or the environment.
    os.environ["KILN_WEB_HOST"], os.environ["KILN_WEB_PORT"] = (
        settings.web.host,
        str(settings.web.port),
    )
    base = [sys.executable, "-m", "kiln.cli.main"]
    data = ["--data-dir", str(settings.data_dir.resolve())]
    services = [
        ServiceSpec(
            "web",
            [*base, "web", *data, "--host", settings.web.host, "--port", str(settings.web.port)],
        ),
    ]
    if os.geteuid() == 0:
        services.append(ServiceSpec("runner", [*base, "runner", *data]))
        services.append(ServiceSpec("builder", [*base, "builder", *data]))
    else:
        err.print(
            "[yellow]warning:[/] not running as root: the runner (sessions, jobs) and the "
            "builder (images) need root to build sandboxes and are not started"
        )
    supervisor = Supervisor(services)
    threading.Thread(target=_announce_when_ready, args=(settings, ca, admin), daemon=True).start()
    supervisor.run()
    console.print("Kiln stopped.")


def _announce_when_ready(
    settings: Settings, ca: CertificateAuthority, admin: SeededAdmin | None
) -> None:
    """Print the URL and how to log in once the web tier accepts connections."""
    probe = "127.0.0.1" if settings.web.host in ("0.0.0.0", "") else settings.web.host  # noqa: S104
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((probe, settings.web.port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        err.print(f"[red]the web tier did not start within {READY_TIMEOUT:.0f}s[/]; see above")
        return
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


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("web")(web)
