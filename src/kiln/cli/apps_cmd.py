"""`kiln apps create|list|logs|restart|stop|start|delete`: a project's applications."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    env_pairs,
    fail,
    friendly_errors,
    human_size,
    out,
    parse_project_ref,
    print_json,
)
from kiln.sdk.applications import Application

app = typer.Typer(
    help="Create, list, start, stop, restart and delete a project's applications: web apps "
    "(Streamlit, Dash, Flask, ...) that keep running on their own address.",
    no_args_is_help=True,
)

NAME_ARG = typer.Argument(
    metavar="NAME", help="The application's name (see `kiln apps list`).", show_default=False
)
STATE_STYLE = {
    "running": "green",
    "starting": "cyan",
    "waiting": "cyan",
    "stopping": "yellow",
    "crashed": "red",
    "crash-looping": "red",
}
WAIT_SECONDS = 180.0


def _state(application: Application) -> str:
    style = STATE_STYLE.get(application.state)
    text = f"[{style}]{application.state}[/]" if style else application.state
    return text + (" [cyan](restarting)[/]" if application.restarting else "")


def _report(application: Application, project: ProjectRef) -> None:
    out.print(
        f"Application [bold]{escape(application.name)}[/] is {_state(application)}: "
        f"{escape(application.url)}"
    )
    if application.message and application.state != "running":
        out.print(f"  {escape(application.message)}")
    if application.last_output and application.state in ("crashed", "crash-looping"):
        out.print("  Its last lines:")
        for line in application.last_output.splitlines():
            out.print(f"    {escape(line)}")
    if application.state != "stopped":
        out.print(f"  Logs: kiln apps logs {project} {escape(application.name)} --follow")


def _wait(project: ProjectRef, name: str, as_json: bool) -> Application:
    with connect() as kiln:
        if not as_json:
            out.print(f"Waiting for {escape(name)} to answer…")
        return kiln.wait_for_application(project.owner, project.slug, name, WAIT_SECONDS)


Wait = Annotated[
    bool,
    typer.Option("--wait", help="Wait until it answers (or fails to start); exit 1 if not."),
]


def _finish(application: Application, project: ProjectRef, wait: bool, as_json: bool) -> None:
    if wait:
        application = _wait(project, application.name, as_json)
    if as_json:
        print_json(application)
    else:
        _report(application, project)
    if wait and application.state != "running":
        raise typer.Exit(1)


@app.command("create")
@friendly_errors
def create(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    script: Annotated[
        str,
        typer.Option(
            "--script",
            "-s",
            help="A .py or .sh file of the project that serves HTTP on 127.0.0.1:$CDSW_APP_PORT.",
            show_default=False,
        ),
    ],
    subdomain: Annotated[
        str | None,
        typer.Option(
            "--subdomain",
            help="Its address: https://SUBDOMAIN.<content domain>/ (default: NAME).",
            show_default=False,
        ),
    ] = None,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    runtime: Annotated[
        str | None, typer.Option("--runtime", "-r", help="A runtime's name.", show_default=False)
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="A resource profile's name.", show_default=False),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="NAME=VALUE (repeat for more).", show_default=False),
    ] = None,
    public: Annotated[
        bool,
        typer.Option("--public", help="Anyone may open it, while the site allows it."),
    ] = False,
    wait: Wait = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create an application and start it (needs the contributor role).

    Examples:

      kiln apps create alice/demo sales --script app.sh --wait

      kiln apps create alice/demo dash --subdomain sales-dash --script dash_app.py \\
        --profile small --env REGION=emea
    """
    fields = {
        "description": description,
        "runtime": runtime,
        "profile": profile,
        "env": env_pairs(env or []),
        "public": public,
    }
    with connect() as kiln:
        created = kiln.create_application(
            project.owner,
            project.slug,
            name=name,
            subdomain=subdomain or name,
            script=script,
            **{k: v for k, v in fields.items() if v is not None},
        )
    _finish(created, project, wait, as_json)


@app.command("list")
@friendly_errors
def list_(
    project: Annotated[
        ProjectRef | None,
        typer.Argument(
            parser=parse_project_ref,
            metavar="[OWNER/SLUG]",
            help="A project; without one, every application you can open on the site.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List a project's applications, or all those you can open.

    Examples:

      kiln apps list alice/demo

      kiln apps list --json
    """
    with connect() as kiln:
        if project is None:
            found = kiln.my_applications()
        else:
            found = kiln.list_applications(project.owner, project.slug)
    if as_json:
        print_json(found)
        return
    if not found:
        where = f"in {project}" if project else "you can open"
        hint = f"; create one with `kiln apps create {project} NAME --script app.sh`"
        out.print(f"No applications {where}{hint if project else ''}.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "ADDRESS", "RESOURCES"):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    if project is None:
        table.add_column("PROJECT", no_wrap=True)
    for a in found:
        size = f"{a.cpu:g} vCPU, {human_size(a.memory_bytes)}"
        row = [escape(a.name), _state(a), escape(a.url), size]
        if project is None:
            row.append(escape(a.project))
        table.add_row(*row)
    out.print(table)


@app.command("logs")
@friendly_errors
def logs(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep streaming what it prints (Ctrl-C ends)."),
    ] = False,
) -> None:
    """Print what the application's instance printed, or follow it live.

    A restart starts a new instance: --follow moves on to it.

    Examples:

      kiln apps logs alice/demo sales --follow
    """
    with connect() as kiln:
        owner, slug = project.owner, project.slug
        if not follow:
            for chunk in kiln.iter_application_logs(owner, slug, name):
                _write(chunk)
            return
        seen: str | None = None
        offset = 0
        while True:
            current = kiln.get_application(owner, slug, name)
            instance = current.instance.id if current.instance else None
            if instance != seen:
                if seen is not None:
                    _write(f"--- a new instance: {instance} ---\n".encode())
                seen, offset = instance, 0
            if instance is not None:
                for chunk in kiln.iter_application_logs(owner, slug, name, offset, follow=True):
                    _write(chunk)
                    offset += len(chunk)
            if current.desired == "stopped" and current.state == "stopped":
                return
            time.sleep(1)


def _write(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _action(action: str, help_text: str) -> None:
    @app.command(action, help=help_text)
    @friendly_errors
    def command(
        project: Annotated[ProjectRef, PROJECT_ARG],
        name: Annotated[str, NAME_ARG],
        wait: Wait = False,
        as_json: Annotated[bool, JSON_OPTION] = False,
    ) -> None:
        with connect() as kiln:
            done = getattr(kiln, f"{action}_application")(project.owner, project.slug, name)
        if action == "stop":
            wait = False
        _finish(done, project, wait, as_json)


_action("start", "Start a stopped or crashed application (needs the operator role).")
_action(
    "restart",
    "Restart an application: a new instance starts, and takes over once it answers "
    "(needs the operator role).",
)
_action("stop", "Stop an application; it stops serving until started (operator role).")


@app.command("delete")
@friendly_errors
def delete(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete an application; it stops and its address is free again (contributor role).

    Examples:

      kiln apps delete alice/demo sales --yes
    """
    if not yes and not typer.confirm(f"Delete application {name} of {project}?"):
        fail("not deleted")
    with connect() as kiln:
        kiln.delete_application(project.owner, project.slug, name)
    out.print(f"Deleted application {escape(name)}.")
