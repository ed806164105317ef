"""What every client command shares: the saved login, `OWNER/SLUG`, output, friendly errors.

A client command never shows a traceback for something a user can cause: errors become one
line on stderr (the server's own ``detail`` where there is one, plus what to do next) and
exit status 1. Usage mistakes (a malformed OWNER/SLUG, a missing argument) exit 2 as usual.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from kiln.domain.errors import InvalidInput
from kiln.domain.names import check_slug
from kiln.sdk import (
    Client,
    KilnAPIError,
    KilnConnectionError,
    KilnSDKError,
    KilnTLSError,
    NotLoggedIn,
    load_login,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

TLS_HINT = (
    "if the site was started with `kiln up`, trust its CA: "
    "`kiln login URL --ca-file DATA_DIR/pki/ca.crt` (DATA_DIR is ./.kiln-data by default)"
)

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def _relogin_hint() -> str:
    try:
        url = load_login().url
    except KilnSDKError:
        url = "URL"
    return f"run `kiln login {url}` again"


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn every error a user can cause into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits
            raise
        except KilnTLSError as exc:
            fail(f"{exc}; {TLS_HINT}")
        except KilnConnectionError as exc:
            fail(f"{exc} (is the site running?)")
        except KilnAPIError as exc:
            if exc.status == 401:
                fail(f"{exc.detail} (the API key was rejected; {_relogin_hint()})")
            fail(exc.detail)
        except KilnSDKError as exc:
            fail(str(exc))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("KILN_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {exc} (set KILN_DEBUG=1 for details)")

    return wrapper


def connect() -> Client:
    """A client for the saved login; "not logged in" is an ordinary error."""
    try:
        return Client.from_config()
    except NotLoggedIn as exc:
        raise KilnSDKError("not logged in: run `kiln login URL` first") from exc


# ---- OWNER/SLUG ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectRef:
    owner: str
    slug: str

    def __str__(self) -> str:
        return f"{self.owner}/{self.slug}"


def parse_project_ref(value: str | ProjectRef) -> ProjectRef:
    if isinstance(value, ProjectRef):
        return value
    owner, sep, slug = value.partition("/")
    if not sep or not owner or not slug or "/" in slug:
        raise typer.BadParameter(f"{value!r} is not OWNER/SLUG (for example alice/demo)")
    try:
        check_slug(owner, "owner")
        check_slug(slug, "project")
    except InvalidInput as exc:
        raise typer.BadParameter(exc.detail) from exc
    return ProjectRef(owner, slug)


PROJECT_ARG = typer.Argument(
    parser=parse_project_ref,
    metavar="OWNER/SLUG",
    help="The project, as owner/slug (see `kiln projects list`).",
    show_default=False,
)
JSON_OPTION = typer.Option("--json", help="Print JSON instead of a table (for scripts).")


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` options (repeated) as a dict; a malformed one is a usage error."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


# ---- output -------------------------------------------------------------------------------


def print_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [v.model_dump(mode="json") for v in value]
    # Plain print: no wrapping or markup, so the output always parses.
    print(json.dumps(data, indent=2, ensure_ascii=False))


# Runs and builds: how their states look in a terminal.
RUN_STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "stopped": "yellow",
    "running": "cyan",
}


def run_state(state: str) -> str:
    style = RUN_STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def write_out(chunk: bytes) -> None:
    """Raw bytes to stdout (a log as it arrives), flushed."""
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def when(value: datetime | None) -> str:
    """A time in this computer's zone, which it names: ``2026-12-03 10:24 CET``."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M %Z") if value else "-"


def when_short(value: datetime | None) -> str:
    """``Dec 03 10:24 CET`` (the year too when it is not this one): for narrow tables."""
    if value is None:
        return "-"
    local = value.astimezone()
    same_year = local.year == datetime.now(local.tzinfo).year
    return local.strftime("%b %d %H:%M %Z" if same_year else "%Y-%m-%d %H:%M %Z")


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


@contextmanager
def transfer_progress(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr while a file streams; silent when stderr is not a terminal."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(escape(label), total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
