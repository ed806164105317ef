"""`kiln models deploy|rollback|scale|stop`: which build of a model serves, with how many
replicas (registered on `kiln models` by ``kiln.cli.models_cmd``)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table

from kiln.cli.model_views import NAME_ARG, first, state
from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    env_pairs,
    err,
    friendly_errors,
    out,
    print_json,
)
from kiln.sdk import Client
from kiln.sdk.model_serving import Deployment, Replica

POLL_SECONDS = 0.5
DEPLOY_TIMEOUT = 600.0
Wait = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait", help="Follow the deployment until it serves (or fails); exit 1 if not."
    ),
]
Timeout = Annotated[
    float, typer.Option(min=1, help="With --wait: give up waiting after this many seconds.")
]


def _progress(deployment: Deployment, replicas: list[Replica]) -> str:
    mine = [r for r in replicas if r.deployment == deployment.number]
    ready = sum(1 for r in mine if r.ready)
    reason = f": {escape(deployment.reason.splitlines()[0])}" if deployment.reason else ""
    return (
        f"Deployment #{deployment.number} (build #{deployment.build}) is "
        f"{state(deployment.state)}, {ready}/{deployment.replicas} replicas ready{reason}"
    )


def _follow_deployment(
    kiln: Client, project: ProjectRef, name: str, deployment: Deployment, timeout: float
) -> Deployment:
    """Poll until the deployment serves or ends, showing its replicas as they get ready."""
    owner, slug = project.owner, project.slug
    deadline = time.monotonic() + timeout

    def done(d: Deployment) -> bool:
        return d.state in ("serving", "failed", "stopped") or time.monotonic() > deadline

    if not out.is_terminal:
        while not done(deployment):
            time.sleep(POLL_SECONDS)
            deployment = kiln.get_deployment(owner, slug, name, deployment.number)
        return deployment
    with Live(console=out, refresh_per_second=8, transient=True) as live:
        while not done(deployment):
            replicas = kiln.list_replicas(owner, slug, name, deployment=deployment.number)
            line = Table.grid(padding=(0, 1))
            line.add_row(Spinner("dots", style="cyan"), _progress(deployment, replicas))
            live.update(line)
            time.sleep(POLL_SECONDS)
            deployment = kiln.get_deployment(owner, slug, name, deployment.number)
    return deployment


def _deployed(
    kiln: Client,
    project: ProjectRef,
    name: str,
    deployment: Deployment,
    wait: bool,
    timeout: float,
    as_json: bool,
    what: str,
) -> None:
    """Report a new deployment (after following it with ``wait``); exit 1 when it failed
    or did not serve in time."""
    if wait:
        if not as_json:
            out.print(f"{what}: deployment #{deployment.number} of build #{deployment.build}")
        deployment = _follow_deployment(kiln, project, name, deployment, timeout)
    replicas = kiln.list_replicas(project.owner, project.slug, name, deployment=deployment.number)
    if as_json:
        print_json(deployment)
    else:
        out.print(_progress(deployment, replicas))
        if deployment.state == "serving":
            model = kiln.get_model(project.owner, project.slug, name)
            out.print(f"  endpoint: {escape(model.endpoint_url)}")
        elif deployment.state == "failed" and deployment.reason:
            for line in deployment.reason.splitlines()[1:]:
                out.print(f"    {escape(line)}")
        elif not wait:
            out.print(f"  follow it: kiln models show {project} {escape(name)}")
    if wait and deployment.state != "serving":
        if deployment.state == "deploying":
            err.print(
                f"still deploying after {timeout:g} s; it goes on (`kiln models show {project} "
                f"{escape(name)}`)"
            )
        raise typer.Exit(1)


def _current_deployment(kiln: Client, project: ProjectRef, name: str) -> Deployment | None:
    """The deployment that serves, or the newest one still deploying."""
    history = kiln.iter_deployments(project.owner, project.slug, name, page_size=20)
    return next((d for d in first(history, 20) if d.state in ("deploying", "serving")), None)


@friendly_errors
def deploy(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    build_number: Annotated[
        int | None,
        typer.Option(
            "--build", "-b", min=1, help="The model build (default: the newest good one)."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas",
            "-r",
            min=1,
            help="How many replicas (default: as many as the current deployment has, or 1).",
            show_default=False,
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="Resource profile (default: the model's).", show_default=False
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", "-e", help="NAME=VALUE for the replicas (repeat).", show_default=False
        ),
    ] = None,
    wait: Wait = True,
    timeout: Timeout = DEPLOY_TIMEOUT,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Deploy a build of the model (operators and up). The deployment that serves now keeps
    answering until every replica of the new one is ready: no call fails in between. A
    redeploy keeps the current number of replicas unless told otherwise.

    Examples:

      kiln models deploy alice/demo adder

      kiln models deploy alice/demo adder --build 3 --replicas 2 --env THRESHOLD=0.7
    """
    variables = env_pairs(env or [])
    with connect() as kiln:
        if replicas is None:  # a redeploy keeps the scale the model serves at
            current = _current_deployment(kiln, project, name)
            replicas = current.replicas if current is not None else 1
        made = kiln.deploy_model(
            project.owner,
            project.slug,
            name,
            build=build_number,
            replicas=replicas,
            profile=profile,
            env=variables,
        )
        _deployed(kiln, project, name, made, wait, timeout, as_json, "Deploying")


@friendly_errors
def rollback(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    build_number: Annotated[
        int | None,
        typer.Option(
            "--build", "-b", min=1, help="Deploy this build (default: the one that served before)."
        ),
    ] = None,
    wait: Wait = True,
    timeout: Timeout = DEPLOY_TIMEOUT,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Deploy the build that served before the current one, with the same replicas, profile
    and environment (operators and up); or the build given with --build.

    Examples:

      kiln models rollback alice/demo adder

      kiln models rollback alice/demo adder --build 1
    """
    with connect() as kiln:
        made = kiln.rollback_model(project.owner, project.slug, name, build=build_number)
        _deployed(kiln, project, name, made, wait, timeout, as_json, "Rolling back")


@friendly_errors
def scale(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    replicas: Annotated[
        int,
        typer.Argument(metavar="REPLICAS", min=1, help="How many replicas.", show_default=False),
    ],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Change the number of replicas while the model serves (operators and up): new ones
    join as they get ready; removed ones finish their calls first.

    Example:

      kiln models scale alice/demo adder 2
    """
    with connect() as kiln:
        deployment = kiln.scale_model(project.owner, project.slug, name, replicas)
    if as_json:
        print_json(deployment)
        return
    out.print(
        f"Deployment #{deployment.number} of model {escape(name)} now wants "
        f"{deployment.replicas} replicas (see them: kiln models show {project} {escape(name)})"
    )


@friendly_errors
def stop(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Stop serving (operators and up): calls in flight finish, then the replicas stop; the
    endpoint answers 503 until the next deploy.

    Example:

      kiln models stop alice/demo adder
    """
    with connect() as kiln:
        stopped = kiln.stop_model(project.owner, project.slug, name)
    if as_json:
        print_json(stopped)
        return
    numbers = ", ".join(f"#{d.number}" for d in stopped)
    out.print(f"Model {escape(name)} stops serving (deployment {numbers})")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("rollback")(rollback)
    app.command("scale")(scale)
    app.command("stop")(stop)
