"""`kiln builds create|list|show|logs|cancel`: a project's image builds."""

from __future__ import annotations

import shlex
import time
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    duration,
    fail,
    friendly_errors,
    out,
    print_json,
    run_state,
    when,
    write_out,
)
from kiln.sdk import Client
from kiln.sdk.builds import Build

app = typer.Typer(
    help="Build a project into an OCI image (snapshot, dependencies, code) and follow it.",
    no_args_is_help=True,
)

NUMBER_ARG = typer.Argument(
    metavar="NUMBER", help="The build's number in the project.", show_default=False
)
POLL_SECONDS = 0.5
STEPS = ("snapshot", "base", "dependencies", "code", "push")
STEP_MARK = {
    "done": "[green]✔[/]",
    "cached": "[green]✔[/]",
    "skipped": "[dim]-[/]",
    "failed": "[red]✘[/]",
}


def steps_table(build: Build) -> Table:
    """The step timeline: each step with its status, duration and what it did."""
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(width=2)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    seen = {s.name: s for s in build.steps}
    for name in STEPS:
        step = seen.get(name)
        if step is None:
            table.add_row("[dim]·[/]", f"[dim]{name}[/]", "", "")
            continue
        mark = STEP_MARK.get(step.status) or Spinner("dots", style="cyan")
        took = duration(step.duration_seconds) if step.duration_seconds is not None else ""
        label = f"{step.status}: {step.detail}" if step.detail else step.status
        table.add_row(mark, name, took, escape(label))
    return table


def _headline(build: Build) -> str:
    attempt = f" (attempt {build.attempt})" if build.attempt > 1 else ""
    reason = f": {escape(build.reason)}" if build.reason else ""
    state = run_state(build.state)
    return f"Build #{build.number} of {escape(build.project)}{attempt} is {state}{reason}"


def report_build(build: Build) -> None:
    out.print(
        f"Build #{build.number} {run_state(build.state)} after {duration(build.duration_seconds)}"
        + (f": {escape(build.reason)}" if build.reason and build.state != "succeeded" else "")
    )
    if build.image is not None:
        out.print(f"  image: [bold]{escape(build.image.reference)}[/]")
        out.print(f"  tags:  {', '.join(build.image.tags)}")


def watch_build(kiln: Client, project: ProjectRef, build: Build) -> Build:
    """A live step timeline until the build ends (plain lines when not on a terminal)."""
    if not out.is_terminal:
        return _print_changes(kiln, project, build)
    with Live(console=out, refresh_per_second=8, transient=False) as live:
        while True:
            live.update(Group(Text.from_markup(_headline(build)), steps_table(build)))
            if build.ended:
                return build
            time.sleep(POLL_SECONDS)
            build = kiln.get_build(project.owner, project.slug, build.number)


def _print_changes(kiln: Client, project: ProjectRef, build: Build) -> Build:
    """Until the build ends, a line each time its state or reason changes: a log or a
    script sees why a build waits (for quota, say), not a silent pause."""
    shown = (build.state, build.reason)
    while not build.ended:
        time.sleep(POLL_SECONDS)
        build = kiln.get_build(project.owner, project.slug, build.number)
        if (build.state, build.reason) != shown and not build.ended:
            out.print(_headline(build))
        shown = (build.state, build.reason)
    return build


def follow_build_log(kiln: Client, project: ProjectRef, build: Build) -> Build:
    for chunk in kiln.iter_build_logs(project.owner, project.slug, build.number, follow=True):
        write_out(chunk)
    return kiln.wait_for_build(project.owner, project.slug, build.number, interval=POLL_SECONDS)


@app.command("create")
@friendly_errors
def create(
    project: Annotated[ProjectRef, PROJECT_ARG],
    commit: Annotated[
        str | None,
        typer.Option(help="Build this commit, branch or tag instead of the files as they are."),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Install dependencies again even if unchanged.")
    ] = False,
    base: Annotated[
        str | None, typer.Option(help="Base runtime image, e.g. runtimes/python:3.11.")
    ] = None,
    command: Annotated[
        str | None,
        typer.Option(help='The image\'s command, e.g. "python3 app.py" (default: python3).'),
    ] = None,
    logs: Annotated[
        bool, typer.Option("--logs", help="Stream the build's log instead of the step view.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the build until it ends.")
    ] = True,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Build the project into an image (contributors and up) and follow it.

    The image holds the project at /home/cdsw (a snapshot of its files, honouring
    .gitignore), the packages of requirements.txt — or what cdsw-build.sh installs — under
    /opt/kiln/deps (reused while they do not change), on a runtime image. Exits 1 unless the
    build succeeded.

    Examples:

      kiln builds create alice/demo

      kiln builds create alice/demo --commit main --command "python3 serve.py"

      kiln builds create alice/demo --no-cache --logs
    """
    argv = shlex.split(command) if command else None
    with connect() as kiln:
        build = kiln.create_build(
            project.owner, project.slug, commit=commit, base=base, no_cache=no_cache, command=argv
        )
        if not wait:
            if as_json:
                print_json(build)
            else:
                out.print(f"Build #{build.number} of {escape(str(project))} is queued")
                out.print(f"  follow it: kiln builds logs {escape(str(project))} {build.number} -f")
            return
        if not as_json:
            out.print(f"Build #{build.number} of {escape(str(project))} queued")
        ended = (
            follow_build_log(kiln, project, build) if logs else watch_build(kiln, project, build)
        )
        if not as_json and logs:
            out.print(steps_table(ended))
    if as_json:
        print_json(ended)
    else:
        report_build(ended)
    if ended.state != "succeeded":
        raise typer.Exit(1)


@app.command("list")
@friendly_errors
def list_(
    project: Annotated[ProjectRef, PROJECT_ARG],
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many builds.")] = 20,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """A project's builds, newest first: state, commit, dependencies, duration.

    Examples:

      kiln builds list alice/demo

      kiln builds list alice/demo --limit 100 --json
    """
    with connect() as kiln:
        found: list[Build] = []
        for build in kiln.iter_builds(project.owner, project.slug, page_size=min(limit, 200)):
            found.append(build)
            if len(found) >= limit:
                break
    if as_json:
        print_json(found)
        return
    if not found:
        name = escape(str(project))
        out.print(f"{name} has no builds yet; `kiln builds create {name}`.")
        return
    table = Table(
        "BUILD", "STATE", "COMMIT", "DEPENDENCIES", "DURATION", "BY", "CREATED",
        box=None, pad_edge=False,
    )  # fmt: skip
    for b in found:
        deps = (
            "-"
            if b.dependencies_cached is None
            else "cached"
            if b.dependencies_cached
            else "installed"
        )
        table.add_row(
            f"#{b.number}",
            run_state(b.state),
            (b.commit or b.source_commit or "-")[:12],
            deps,
            duration(b.duration_seconds),
            escape(b.started_by or "-"),
            when(b.created_at),
        )
    out.print(table)


@app.command("show")
@friendly_errors
def show(
    project: Annotated[ProjectRef, PROJECT_ARG],
    number: Annotated[int, NUMBER_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """One build: its state, steps with durations, and the image it made.

    Example:

      kiln builds show alice/demo 3
    """
    with connect() as kiln:
        build = kiln.get_build(project.owner, project.slug, number)
    if as_json:
        print_json(build)
        return
    out.print(_headline(build))
    out.print(f"  base:   {escape(build.base)}")
    what = build.source_commit or "the working tree"
    out.print(f"  source: {escape(what)}" + (f" → commit {build.commit}" if build.commit else ""))
    out.print(f"  queued {when(build.created_at)} by {escape(build.started_by or '-')}")
    out.print(steps_table(build))
    if build.image is not None:
        out.print(f"  image: [bold]{escape(build.image.reference)}[/]")


@app.command("logs")
@friendly_errors
def logs(
    project: Annotated[ProjectRef, PROJECT_ARG],
    number: Annotated[
        int | None,
        typer.Argument(
            metavar="[NUMBER]", help="A build's number (default: the newest).", show_default=False
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep streaming until the build ends; exit 1 unless it succeeded.",
        ),
    ] = False,
) -> None:
    """Print a build's log, or stream it live with --follow.

    Examples:

      kiln builds logs alice/demo

      kiln builds logs alice/demo 3 --follow
    """
    with connect() as kiln:
        if number is None:
            newest = next(iter(kiln.iter_builds(project.owner, project.slug, page_size=1)), None)
            if newest is None:
                fail(f"{project} has no builds yet")
            build = newest
        else:
            build = kiln.get_build(project.owner, project.slug, number)
        if not follow:
            for chunk in kiln.iter_build_logs(project.owner, project.slug, build.number):
                write_out(chunk)
            return
        ended = follow_build_log(kiln, project, build)
    if ended.state != "succeeded":
        reason = f": {ended.reason}" if ended.reason else ""
        fail(f"build #{ended.number} {ended.state}{reason}")


@app.command("cancel")
@friendly_errors
def cancel(
    project: Annotated[ProjectRef, PROJECT_ARG],
    number: Annotated[int, NUMBER_ARG],
) -> None:
    """Cancel a build (contributors and up); a running one is stopped by the builder.

    Example:

      kiln builds cancel alice/demo 3
    """
    with connect() as kiln:
        build = kiln.cancel_build(project.owner, project.slug, number)
    out.print(f"Build #{build.number} is {run_state(build.state)}")
