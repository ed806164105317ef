"""Client commands: `kiln login`, `kiln logout`, and the `projects`, `files`, `keys` groups.

They talk to a Kiln site over HTTPS through ``kiln.sdk.Client`` with an API key that
`kiln login` creates and keeps in a per-user file (mode 0600, see ``kiln.sdk.config``).
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kiln.cli import files, git_cmd, keys, projects
from kiln.cli.remote import err, fail, friendly_errors, out
from kiln.sdk import Client, KilnAPIError, KilnConnectionError, KilnSDKError, NotLoggedIn
from kiln.sdk.client import create_api_key_with_password, normalize_url
from kiln.sdk.config import SavedLogin, config_path, forget_login, load_login, save_login

DEFAULT_CA = Path(".kiln-data") / "pki" / "ca.crt"


def _default_ca() -> Path | None:
    """The CA of a site started with `kiln up` in this directory, if there is one."""
    return DEFAULT_CA.resolve() if DEFAULT_CA.is_file() else None


@friendly_errors
def login(
    url: Annotated[
        str,
        typer.Argument(
            metavar="URL", help="The Kiln site, e.g. https://localhost:8443", show_default=False
        ),
    ],
    username: Annotated[
        str | None,
        typer.Option("--username", "-u", help="Your Kiln username (prompted when omitted)."),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            exists=True,
            dir_okay=False,
            readable=True,
            help="CA certificate to trust, e.g. DATA_DIR/pki/ca.crt of `kiln up` "
            "(default: ./.kiln-data/pki/ca.crt when it exists)",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Do not verify the site's TLS certificate (unsafe)."),
    ] = False,
) -> None:
    """Log in to a Kiln site: create an API key with your password and save it.

    The key (named cli@HOSTNAME) and the site's URL are saved in
    $KILN_CONFIG_DIR/config.json (default: ~/.config/kiln/config.json).
    Only you can read that file; your password is sent once and never stored.

    Examples:

      kiln login https://localhost:8443

      kiln login https://kiln.example.com -u alice --ca-file .kiln-data/pki/ca.crt
    """
    if insecure and ca_file is not None:
        raise typer.BadParameter("use either --ca-file or --insecure, not both")
    url = normalize_url(url)
    if ca_file is None and not insecure:
        ca_file = _default_ca()
        if ca_file is not None:
            err.print(f"trusting the CA of ./.kiln-data: {ca_file}")
    if insecure:
        err.print("[yellow]warning:[/] TLS certificate checks are off for this site")
    elif url.startswith("http://"):
        err.print("[yellow]warning:[/] plain http: your password and key travel unencrypted")
    if username is None:
        username = typer.prompt("Username", default=getpass.getuser())
    password: str = typer.prompt("Password", hide_input=True)
    verify: bool | str = False if insecure else str(ca_file) if ca_file else True
    name = f"cli@{socket.gethostname()}"[:100]
    try:
        created = create_api_key_with_password(url, username, password, name, verify)
    except KilnAPIError as exc:
        fail(exc.detail)  # not the generic 401 hint: here it is the password that was wrong
    previous = _previous_login()
    path = save_login(
        SavedLogin(
            url=url,
            api_key=created.key,
            key_id=created.id,
            username=username,
            ca_file=str(ca_file) if ca_file else None,
            insecure=insecure,
        )
    )
    out.print(
        f"Logged in to {escape(url)} as [bold]{escape(username)}[/]; "
        f"API key {created.prefix}… saved in {escape(str(path))}"
    )
    if previous is not None and previous.api_key != created.key:
        # The file held the only copy of the older key: revoke it rather than orphan it.
        try:
            _revoke(previous)
        except (KilnAPIError, KilnConnectionError) as exc:
            err.print(f"note: the previous key for {escape(previous.url)} was not revoked: {exc}")


def _previous_login() -> SavedLogin | None:
    try:
        return load_login()
    except KilnSDKError:
        return None


def _revoke(saved: SavedLogin) -> None:
    """Revoke a saved login's key; a key that is already revoked or expired is fine."""
    try:
        with Client(saved.url, saved.api_key, saved.verify) as client:
            key_id = saved.key_id
            if key_id is None:  # a hand-written config: find the key by its prefix
                mine = [k.id for k in client.list_api_keys() if saved.api_key.startswith(k.prefix)]
                key_id = mine[0] if len(mine) == 1 else None
            if key_id is not None:
                client.revoke_api_key(key_id)
    except KilnAPIError as exc:
        if exc.status not in (401, 404):
            raise


@friendly_errors
def logout(
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Only forget the saved key, without revoking it (site unreachable)."
        ),
    ] = False,
) -> None:
    """Revoke the CLI's API key on the site and forget it.

    Examples:

      kiln logout

      kiln logout --local     # the site is gone; just delete the saved key
    """
    try:
        saved = load_login()
    except NotLoggedIn:
        out.print("Not logged in.")
        return
    if not local:
        try:
            _revoke(saved)
        except KilnConnectionError as exc:
            fail(
                f"{exc}; the key was not revoked and is still saved (`kiln logout --local` "
                "forgets it anyway)"
            )
    forget_login()
    revoked = "" if local else "; the API key is revoked"
    out.print(f"Logged out of {escape(saved.url)}{revoked}")


def register(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("logout")(logout)
    git_cmd.register(app, projects.app)
    app.add_typer(projects.app, name="projects")
    app.add_typer(files.app, name="files")
    app.add_typer(keys.app, name="keys")


__all__ = ["config_path", "register"]
