"""`kiln jobs create|list|run|runs|logs`: a project's jobs and their runs."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    RUN_STATE_STYLE,
    ProjectRef,
    connect,
    duration,
    env_pairs,
    fail,
    friendly_errors,
    out,
    print_json,
    run_state,
    when,
    when_short,
    write_out,
)
from kiln.sdk import Client
from kiln.sdk.jobs import JobRun

app = typer.Typer(
    help="Create, list and run a project's jobs; read their runs and logs.",
    no_args_is_help=True,
)

JOB_ARG = typer.Argument(metavar="JOB", help="The job's name (or id).", show_default=False)
POLL_SECONDS = 0.5


@app.command("create")
@friendly_errors
def create(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The job's name, unique in the project.")
    ],
    script: Annotated[
        str, typer.Option("--script", help="Project-relative .py or .sh file to run.")
    ],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg", help="An argument for the script (repeat, in order).", show_default=False
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(help='5-field cron expression or @hourly/@daily/..., e.g. "0 3 * * *".'),
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(help="IANA time zone of the schedule (default UTC).")
    ] = None,
    depends_on: Annotated[
        list[str] | None,
        typer.Option(
            "--depends-on",
            help="Run after this job succeeds (repeat for several parents).",
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Resource profile (default: the site's default).")
    ] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Runtime (default: the site's default).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", help="NAME=VALUE for the job's environment (repeat).", show_default=False
        ),
    ] = None,
    timeout_minutes: Annotated[
        int | None,
        typer.Option(help="Stop a run after this long (default: the site's JOB_MAXIMUM_MINUTES)."),
    ] = None,
    retries: Annotated[
        int | None, typer.Option(help="Extra attempts after a failure, with backoff (0-10).")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Runs of this job allowed at once (default 1).")
    ] = None,
    webhook: Annotated[
        str | None,
        typer.Option(help="URL POSTed a JSON body when a run succeeds, fails or times out."),
    ] = None,
    catch_up: Annotated[
        str | None,
        typer.Option(help="After downtime: once (default), all, or skip missed schedule slots."),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create a job: a script with arguments, run by hand, on a schedule, or after other jobs.

    Examples:

      kiln jobs create alice/demo train --script main.py

      kiln jobs create alice/demo nightly --script train.py --arg --epochs --arg 3 \\
        --schedule "0 3 * * *" --timezone Europe/Berlin --retries 2

      kiln jobs create alice/demo report --script report.py --depends-on nightly
    """
    with connect() as kiln:
        job = kiln.create_job(
            project.owner,
            project.slug,
            name,
            script,
            arguments=arg or None,
            schedule=schedule,
            timezone=timezone,
            parents=depends_on or None,
            profile=profile,
            runtime=runtime,
            env=env_pairs(env) if env else None,
            timeout_minutes=timeout_minutes,
            max_retries=retries,
            max_concurrent_runs=max_concurrent,
            webhook_url=webhook,
            catch_up=catch_up,
        )
    if as_json:
        print_json(job)
        return
    out.print(f"Created job [bold]{escape(job.name)}[/] in {escape(str(project))}")
    if job.schedule:
        out.print(
            f"  schedule {escape(job.schedule)} ({escape(job.timezone)}), "
            f"next run {when(job.next_run_at)}"
        )
    if job.parents:
        out.print(f"  runs after {escape(', '.join(job.parents))} succeeds")
    out.print(f"  run it now: kiln jobs run {escape(str(project))} {escape(job.name)}")


@app.command("list")
@friendly_errors
def list_(
    project: Annotated[ProjectRef, PROJECT_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List a project's jobs with their schedule, parents and latest run.

    Examples:

      kiln jobs list alice/demo

      kiln jobs list alice/demo --json
    """
    with connect() as kiln:
        jobs = kiln.list_jobs(project.owner, project.slug)
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        out.print(
            f"{escape(str(project))} has no jobs; create one with "
            f"`kiln jobs create {escape(str(project))} NAME --script main.py`."
        )
        return
    table = Table(
        "JOB", "SCRIPT", "SCHEDULE", "NEXT RUN", "AFTER", "LAST RUN", box=None, pad_edge=False
    )
    for j in jobs:
        schedule = f"{j.schedule} ({j.timezone})" if j.schedule else "-"
        last = f"#{j.last_run.number} {run_state(j.last_run.state)}" if j.last_run else "-"
        table.add_row(
            escape(j.name),
            escape(" ".join([j.script, *j.arguments])),
            escape(schedule),
            when_short(j.next_run_at),
            escape(", ".join(j.parents)) or "-",
            last,
        )
    out.print(table)


def _wait(kiln: Client, project: ProjectRef, job: str, run: JobRun) -> JobRun:
    return kiln.wait_for_run(project.owner, project.slug, job, run.id, interval=POLL_SECONDS)


def end_line(run: JobRun) -> str:
    """One line on how a run ended: "Run #3 of train succeeded in 2.1s (exit code 0)". The
    reason is added only when it says more than the state and the exit code already do."""
    code = "" if run.exit_code is None else f" (exit code {run.exit_code})"
    took = f" in {duration(run.duration_seconds)}" if run.duration_seconds is not None else ""
    restated = run.exit_code is not None and run.reason == f"exited with code {run.exit_code}"
    reason = f": {run.reason}" if run.reason and not restated else ""
    return f"Run #{run.number} of {run.job} {run.state.replace('_', ' ')}{took}{code}{reason}"


def _report_end(run: JobRun) -> None:
    line = escape(end_line(run))
    style = RUN_STATE_STYLE.get(run.state)
    out.print(f"[{style}]{line}[/]" if style else line)


@app.command("run")
@friendly_errors
def run(
    project: Annotated[ProjectRef, PROJECT_ARG],
    job: Annotated[str, JOB_ARG],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the run to end; exit 1 unless it succeeded.",
            show_default=False,
        ),
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Run a job now (needs the operator role or higher).

    Examples:

      kiln jobs run alice/demo train

      kiln jobs run alice/demo train --wait && echo done
    """
    with connect() as kiln:
        started = kiln.run_job(project.owner, project.slug, job)
        if not as_json:
            out.print(
                f"Run #{started.number} of {escape(started.job)} is {run_state(started.state)}"
            )
        ended = _wait(kiln, project, job, started) if wait else started
    if as_json:
        print_json(ended)
    elif wait:
        _report_end(ended)
    if wait and ended.state != "succeeded":
        raise typer.Exit(1)


@app.command("runs")
@friendly_errors
def runs(
    project: Annotated[ProjectRef, PROJECT_ARG],
    job: Annotated[str, JOB_ARG],
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many runs.")] = 20,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """A job's runs, newest first: state, exit code, duration, trigger.

    Examples:

      kiln jobs runs alice/demo train

      kiln jobs runs alice/demo train --limit 100 --json
    """
    with connect() as kiln:
        found: list[JobRun] = []
        for r in kiln.iter_runs(project.owner, project.slug, job, page_size=min(limit, 200)):
            found.append(r)
            if len(found) >= limit:
                break
    if as_json:
        print_json(found)
        return
    if not found:
        out.print(
            f"{escape(job)} has not run yet; `kiln jobs run {escape(str(project))} {escape(job)}`."
        )
        return
    table = Table(
        "RUN", "STATE", "EXIT", "DURATION", "TRIGGER", "CREATED", box=None, pad_edge=False
    )
    for r in found:
        table.add_row(
            f"#{r.number}",
            run_state(r.state),
            "-" if r.exit_code is None else str(r.exit_code),
            duration(r.duration_seconds),
            escape(trigger_text(r)),
            when_short(r.created_at),
        )
    out.print(table)


def trigger_text(run: JobRun) -> str:
    """How a run started: "manual by alice", "schedule", "after #4 of prepare (schedule)"."""
    if run.parent_run is not None:
        parent = run.parent_run
        return f"after #{parent.number} of {parent.job} ({parent.trigger})"
    return f"{run.trigger} by {run.triggered_by}" if run.triggered_by else run.trigger


def _follow(kiln: Client, project: ProjectRef, job: str, run: JobRun) -> JobRun:
    """Stream the run's output until it ends, across retries (each attempt is its own log)."""
    owner, slug = project.owner, project.slug
    workload: str | None = None
    while True:
        if run.workload_id is not None and run.workload_id != workload:
            if workload is not None:
                print(f"--- attempt {run.attempt} ---", flush=True)
            workload = run.workload_id
            for chunk in kiln.iter_run_logs(owner, slug, job, run.id, follow=not run.ended):
                write_out(chunk)
            run = kiln.get_run(owner, slug, job, run.id)
            continue  # a retry may already have started: no pause before looking
        if run.ended:
            return run
        time.sleep(POLL_SECONDS)
        run = kiln.get_run(owner, slug, job, run.id)


@app.command("logs")
@friendly_errors
def logs(
    project: Annotated[ProjectRef, PROJECT_ARG],
    job: Annotated[str, JOB_ARG],
    number: Annotated[
        int | None,
        typer.Argument(
            metavar="[RUN]",
            min=1,
            help="The run's number, as `kiln jobs runs` shows it (default: the newest run).",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep streaming until the run ends; exit 1 unless it succeeded."
        ),
    ] = False,
) -> None:
    """Print a run's console output (its latest attempt), or stream it live with --follow.

    Examples:

      kiln jobs logs alice/demo train

      kiln jobs logs alice/demo train 3

      kiln jobs run alice/demo train && kiln jobs logs alice/demo train --follow
    """
    with connect() as kiln:
        if number is None:
            newest = next(iter(kiln.iter_runs(project.owner, project.slug, job, page_size=1)), None)
            if newest is None:
                fail(f"{job} has not run yet")
            current = newest
        else:
            current = kiln.find_run(project.owner, project.slug, job, number)
        if not follow:
            for chunk in kiln.iter_run_logs(project.owner, project.slug, job, current.id):
                write_out(chunk)
            return
        ended = _follow(kiln, project, job, current)
    if ended.state != "succeeded":
        fail(end_line(ended))
