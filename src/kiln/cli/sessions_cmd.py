"""`kiln sessions start|list|stop`: a project's interactive sessions."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    err,
    friendly_errors,
    human_size,
    out,
    print_json,
    when_short,
)
from kiln.sdk import KilnAPIError
from kiln.sdk.sessions import Session

app = typer.Typer(
    help="Start, list and stop a project's interactive sessions (terminal in the browser).",
    no_args_is_help=True,
)

SESSION_ARG = typer.Argument(
    metavar="SESSION", help="The session's id (see `kiln sessions list`).", show_default=False
)
POLL_SECONDS = 0.5
STATE_STYLE = {
    "running": "green",
    "failed": "red",
    "timed_out": "red",
    "stopping": "yellow",
    "queued": "cyan",
    "waiting": "cyan",
    "starting": "cyan",
}


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def _resources(session: Session) -> str:
    size = f"{session.cpu:g} vCPU, {human_size(session.memory_bytes)}"
    return f"{escape(session.profile)}: {size}" if session.profile else f"site default: {size}"


def _print_timeline(session: Session) -> None:
    """Each step with the time since the session was queued: a slow start shows where."""
    if not session.timeline:
        return
    first = session.timeline[0].at
    table = Table(box=None, show_header=False, pad_edge=False)
    for entry in session.timeline:
        elapsed = (entry.at - first).total_seconds()
        at = entry.at.astimezone().strftime("%H:%M:%S %Z")
        table.add_row(f"+{elapsed:.2f}s", _state(entry.state), escape(entry.message), at)
    out.print(Padding(table, (0, 0, 0, 2)))


@app.command("start")
@friendly_errors
def start(
    project: Annotated[ProjectRef, PROJECT_ARG],
    editor: Annotated[
        str,
        typer.Option("--editor", "-e", help="terminal, or jupyterlab when the runtime has it."),
    ] = "terminal",
    runtime: Annotated[
        str | None,
        typer.Option(
            "--runtime",
            "-r",
            help="A runtime's name (default: the site's default runtime).",
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            help="A resource profile's name (default: the site's default profile).",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="If it has to wait (over your quota), wait until it is running or has ended.",
        ),
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Start a session; print its id, its state and its start timeline.

    Needs the contributor role. Exits 1, with the reason, when the session could not
    start. Its terminal opens in the browser, on the project's Sessions tab.

    Examples:

      kiln sessions start alice/demo

      kiln sessions start alice/demo --profile large --json

      kiln sessions start alice/demo --editor jupyterlab --runtime builtin
    """
    with connect() as kiln:
        session = kiln.start_session(
            project.owner, project.slug, editor=editor, profile=profile, runtime=runtime
        )
        if wait and not session.ended:
            if not as_json:
                out.print(f"Session {session.id} is {_state(session.state)}; waiting…")
            session = kiln.wait_for_session(
                project.owner, project.slug, session.id, interval=POLL_SECONDS
            )
        page = f"{kiln.url}p/{project.owner}/{project.slug}/sessions/{session.id}"
        editor_page = f"{kiln.url}{session.editor_url.lstrip('/')}" if session.editor_url else None
    if as_json:
        print_json(session)
    else:
        out.print(
            f"Session [bold]{session.id}[/] is {_state(session.state)} "
            f"({escape(session.editor)} on {escape(session.runtime or '?')}, "
            f"{_resources(session)})"
        )
        _print_timeline(session)
        if session.state == "waiting":
            out.print(f"Waiting: {escape(session.reason)}. It starts by itself when there is room.")
        if not session.ended:
            out.print(f"Terminal: {escape(page)}")
            if editor_page:  # a browser signed in to the site follows it to the editor
                out.print(f"{escape(session.editor)}: {escape(editor_page)}")
            out.print(f"Stop it:  kiln sessions stop {project} {session.id}")
    if session.ended:
        err.print(
            f"[red]error:[/] session {session.id} could not start: "
            f"{escape(session.reason or session.state)}"
        )
        raise typer.Exit(1)


@app.command("list")
@friendly_errors
def list_(
    project: Annotated[ProjectRef, PROJECT_ARG],
    live: Annotated[
        bool, typer.Option("--live", help="Only sessions that have not ended.")
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the project's sessions, newest first (viewers may look too).

    One line per session; a terminal wider than 120 columns also shows the runtime, the
    resources and why a session waits or ended (all of it is in --json too).

    Examples:

      kiln sessions list alice/demo

      kiln sessions list alice/demo --live --json
    """
    with connect() as kiln:
        sessions = [
            s for s in kiln.iter_sessions(project.owner, project.slug) if not (live and s.ended)
        ]
    if as_json:
        print_json(sessions)
        return
    if not sessions:
        which = "live sessions" if live else "sessions"
        out.print(f"No {which} in {project}; start one with `kiln sessions start {project}`.")
        return
    out.print(session_table(sessions, wide=out.width >= WIDE_TERMINAL))


WIDE_TERMINAL = 120


def session_table(sessions: list[Session], wide: bool) -> Table:
    """One line per session. The id (what `stop` needs) and the state are never shortened;
    on an 80-column terminal the other columns are cut with "…" rather than wrapped."""
    table = Table(box=None, pad_edge=False)
    table.add_column("SESSION", no_wrap=True, min_width=max(len(s.id) for s in sessions))
    table.add_column("STATE", no_wrap=True, min_width=max(len(s.state) for s in sessions))
    for name in ("EDITOR", "RESOURCES" if wide else "PROFILE", "BY"):
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=None if wide else 12)
    table.add_column("CREATED", no_wrap=True)
    if wide:
        table.add_column("REASON", no_wrap=True, overflow="ellipsis")
    for s in sessions:
        editor = escape(s.editor)
        row = [s.id, _state(s.state)]
        if wide:
            row += [editor + (f" on {escape(s.runtime)}" if s.runtime else ""), _resources(s)]
        else:
            row += [editor, escape(s.profile or "default")]
        row += [escape(s.created_by or "-"), when_short(s.created_at)]
        if wide:
            row.append(escape(s.reason))
        table.add_row(*row)
    return table


@app.command("stop")
@friendly_errors
def stop(
    project: Annotated[ProjectRef, PROJECT_ARG],
    session_id: Annotated[str, SESSION_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Stop a session: everything running in it ends.

    Needs the contributor role. A session that had already ended is left as it is (exit 0).

    Examples:

      kiln sessions stop alice/demo 3f2a9c0d1e4b5a69
    """
    already = False
    with connect() as kiln:
        try:
            session = kiln.stop_session(project.owner, project.slug, session_id)
        except KilnAPIError as exc:
            if exc.status != 409:
                raise
            # It had ended already (or the runner recorded its end while we asked): what
            # was wanted is true, so say how it ended rather than fail.
            session = kiln.get_session(project.owner, project.slug, session_id)
            if not session.ended:
                raise
            already = True
    if as_json:
        print_json(session)
        return
    if already:
        reason = f", {escape(session.reason)}" if session.reason else ""
        out.print(f"Session {session.id} had already ended ({_state(session.state)}{reason})")
    else:
        reason = f": {escape(session.reason)}" if session.reason else ""
        out.print(f"Session {session.id} is {_state(session.state)}{reason}")
