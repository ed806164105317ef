"""`kiln projects clone`, and the git credential helper it sets up (`kiln git-credential`).

A clone made this way trusts the site's CA (the CA file `kiln login` saved) and asks this
helper for credentials: the helper answers with the saved login's username and API key, and
only for the site the login is for. Both settings live in the clone's own `.git/config`
(`git clone -c`), so later pulls and pushes work without prompts, and the key itself is never
written into that file or onto a command line.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from kiln.cli.remote import PROJECT_ARG, ProjectRef, err, fail, friendly_errors, out
from kiln.sdk import KilnSDKError, NotLoggedIn, load_login
from kiln.sdk.config import SavedLogin


def _site(url: str) -> str:
    """``https://host:port`` of a URL: what git's credential requests name."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def helper_command() -> str:
    """The helper as git runs it (through a shell: hence the quoting)."""
    return f"!{shlex.quote(sys.executable)} -m kiln.cli.main git-credential"


def clone_config(login: SavedLogin) -> list[str]:
    """`key=value` settings for the clone: trust the site like the login does, and ask this
    helper (alone) for the site's credentials."""
    site = _site(login.url)
    options = [f"credential.{site}.helper=", f"credential.{site}.helper={helper_command()}"]
    if login.insecure:
        options.append("http.sslVerify=false")
    elif login.ca_file:
        options.append(f"http.sslCAInfo={Path(login.ca_file).resolve()}")
    return options


@friendly_errors
def clone(
    project: Annotated[ProjectRef, PROJECT_ARG],
    directory: Annotated[
        Path | None,
        typer.Argument(
            metavar="[DIRECTORY]",
            help="Where to clone it (default: a folder named like the project).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Clone a project with git, using your `kiln login` (no password prompts).

    The clone trusts the site's certificate authority and gets its credentials from the
    saved login, for pulls and pushes too. Pushing needs the contributor role.

    Examples:

      kiln projects clone alice/demo

      kiln projects clone alice/demo ~/work/demo
    """
    try:
        login = load_login()
    except NotLoggedIn as exc:
        raise KilnSDKError("not logged in: run `kiln login URL` first") from exc
    git = shutil.which("git")
    if git is None:
        fail("git is not installed; install it (for example `apt install git`) and try again")
    user = f"{login.username}@" if login.username else ""
    parts = urlsplit(login.url)
    url = f"{parts.scheme}://{user}{parts.netloc}{parts.path}git/{project}.git"
    target = [str(directory)] if directory is not None else []
    err.print(f"Cloning {escape(url)}")
    # `clone -c`: used by the clone itself and kept in the new repository's config.
    settings = [arg for option in clone_config(login) for arg in ("-c", option)]
    result = subprocess.run([git, "clone", *settings, url, *target], check=False)
    if result.returncode != 0:
        fail(f"git clone failed (exit status {result.returncode}); its message is above")
    out.print(f"Cloned {escape(str(project))} into {escape(str(directory or project.slug))}")


def git_credential(
    operation: Annotated[str, typer.Argument(help="get, store or erase (git says which).")],
) -> None:
    """Git's credential helper for the site of `kiln login` (set up by `kiln projects clone`)."""
    if operation != "get":
        return  # nothing is stored or erased: the key lives in the login file
    request = dict(line.split("=", 1) for line in sys.stdin.read().splitlines() if "=" in line)
    try:
        login = load_login()
    except KilnSDKError:
        return  # no login: git asks the next helper, or the user
    wanted = f"{request.get('protocol', '')}://{request.get('host', '')}"
    if wanted != _site(login.url) or not login.username:
        return  # another site's credentials are not ours to give
    sys.stdout.write(f"username={login.username}\npassword={login.api_key}\n\n")


def register(app: typer.Typer, projects: typer.Typer) -> None:
    projects.command("clone")(clone)
    app.command("git-credential", hidden=True)(git_credential)
