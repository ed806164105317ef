"""`kiln models ...`: a project's models — create, build, deploy, scale, roll back, stop,
read replicas' logs, call, delete — and `kiln models keys ...` for model API keys."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table

from kiln.cli import model_keys_cmd
from kiln.cli.builds_cmd import follow_build_log, report_build, steps_table, watch_build
from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    err,
    fail,
    friendly_errors,
    human_size,
    out,
    print_json,
    run_state,
    when,
    write_out,
)
from kiln.sdk import Client
from kiln.sdk.model_serving import Deployment, ModelCallError, Replica

app = typer.Typer(
    help="Serve a Python function of a project as an authenticated REST endpoint: create a "
    "model, build it into an image, deploy it as replicas, call it, scale it, roll it back.",
    no_args_is_help=True,
)
app.add_typer(model_keys_cmd.app, name="keys")

NAME_ARG = typer.Argument(
    metavar="NAME", help="The model's name (see `kiln models list`).", show_default=False
)
POLL_SECONDS = 0.5
DEPLOY_TIMEOUT = 600.0
STATE_STYLE = {
    "serving": "green",
    "running": "green",
    "deploying": "cyan",
    "starting": "cyan",
    "queued": "cyan",
    "waiting": "cyan",
    "draining": "yellow",
    "stopping": "yellow",
    "stopped": "yellow",
    "failed": "red",
}
Wait = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait", help="Follow the deployment until it serves (or fails); exit 1 if not."
    ),
]
Timeout = Annotated[
    float, typer.Option(min=1, help="With --wait: give up waiting after this many seconds.")
]


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return env


# ---- create, list, show, delete ------------------------------------------------------------


@app.command("create")
@friendly_errors
def create(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    file: Annotated[
        str,
        typer.Option(
            "--file", "-f", help="The Python file, relative to the project.", show_default=False
        ),
    ],
    function: Annotated[
        str,
        typer.Option(
            "--function",
            "-F",
            help="The function in that file: it gets the request's JSON and returns JSON.",
            show_default=False,
        ),
    ],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="Resource profile of each replica.", show_default=False
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Base runtime image, e.g. runtimes/python:3.11.", show_default=False),
    ] = None,
    serving_mode: Annotated[
        str | None,
        typer.Option(help="threads (default) or processes: how a replica serves calls at once."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Calls one replica serves at once (default 4).")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create a model (contributors and up). Its access key is shown once: keep it.

    Next: `kiln models build`, then `kiln models deploy`.

    Examples:

      kiln models create alice/demo adder --file model.py --function predict

      kiln models create alice/demo churn -f churn/serve.py -F predict --profile small \\
        --serving-mode processes --concurrency 4
    """
    fields: dict[str, Any] = {
        "description": description,
        "profile": profile,
        "base": base,
        "serving_mode": serving_mode,
        "concurrency": concurrency,
    }
    with connect() as kiln:
        created = kiln.create_model(
            project.owner,
            project.slug,
            name,
            file=file,
            function=function,
            **{k: v for k, v in fields.items() if v is not None},
        )
    if as_json:
        print_json(created)
        return
    out.print(f"Created model [bold]{escape(created.name)}[/] of {escape(created.project)}")
    out.print(f"  access key: [bold]{created.access_key}[/] (shown once: keep it)")
    out.print(f"  endpoint:   {escape(created.endpoint_url)}")
    out.print(f"  next: kiln models build {project} {escape(created.name)}")


@app.command("list")
@friendly_errors
def list_(
    project: Annotated[ProjectRef, PROJECT_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """A project's models: file, function, which deployment serves, the endpoint.

    Examples:

      kiln models list alice/demo

      kiln models list alice/demo --json
    """
    with connect() as kiln:
        found = kiln.list_models(project.owner, project.slug)
    if as_json:
        print_json(found)
        return
    if not found:
        out.print(
            f"No models in {project}; create one with "
            f"`kiln models create {project} NAME --file model.py --function predict`."
        )
        return
    table = Table("NAME", "FUNCTION", "SERVING", "ENDPOINT", box=None, pad_edge=False)
    for m in found:
        serving = f"deployment #{m.serving_deployment}" if m.serving_deployment else "-"
        table.add_row(
            escape(m.name), escape(f"{m.file}:{m.function}"), serving, escape(m.endpoint_url)
        )
    out.print(table)


def replicas_table(replicas: list[Replica]) -> Table:
    table = Table(
        "REPLICA", "DEPLOYMENT", "BUILD", "SLOT", "STATE", "READY SINCE", "RESTARTS", "LAST EXIT",
        box=None, pad_edge=False,
    )  # fmt: skip
    for r in replicas:
        exit_reason = escape(r.last_exit_reason or "-")
        table.add_row(
            r.id,
            f"#{r.deployment}",
            f"#{r.build}",
            str(r.slot),
            _state(r.state),
            when(r.ready_since) if r.ready else "[dim]not ready[/]",
            str(r.restarts),
            exit_reason,
        )
    return table


def deployments_table(deployments: list[Deployment]) -> Table:
    table = Table(
        "DEPLOYMENT", "BUILD", "STATE", "REPLICAS", "RESOURCES", "BY", "CREATED", "REASON",
        box=None, pad_edge=False,
    )  # fmt: skip
    for d in deployments:
        table.add_row(
            f"#{d.number}",
            f"#{d.build}",
            _state(d.state),
            str(d.replicas),
            f"{d.cpu_millis / 1000:g} vCPU, {human_size(d.memory_bytes)}",
            escape(d.created_by or "-"),
            when(d.created_at),
            escape(d.reason.splitlines()[0] if d.reason else ""),
        )
    return table


@app.command("show")
@friendly_errors
def show(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """One model: its endpoint, the deployment that serves, its replicas (state, readiness,
    restarts, why the last one ended), recent deployments and builds.

    Example:

      kiln models show alice/demo adder
    """
    owner, slug = project.owner, project.slug
    with connect() as kiln:
        model = kiln.get_model(owner, slug, name)
        replicas = kiln.list_replicas(owner, slug, name)
        deployments = _first(kiln.iter_deployments(owner, slug, name, page_size=5), 5)
        builds = _first(kiln.iter_model_builds(owner, slug, name, page_size=5), 5)
    if as_json:
        print_json(
            {
                "model": model.model_dump(mode="json"),
                "replicas": [r.model_dump(mode="json") for r in replicas],
                "deployments": [d.model_dump(mode="json") for d in deployments],
                "builds": [b.model_dump(mode="json") for b in builds],
            }
        )
        return
    serving = f"deployment #{model.serving_deployment}" if model.serving_deployment else "nothing"
    out.print(f"Model [bold]{escape(model.name)}[/] of {escape(model.project)}: serving {serving}")
    if model.description:
        out.print(f"  {escape(model.description)}")
    out.print(f"  function:   {escape(model.file)}:{escape(model.function)}")
    mode = f"{model.serving_mode}, {model.concurrency} calls at once per replica"
    out.print(f"  serving:    {mode}; profile {escape(model.profile or 'default')}")
    out.print(f"  endpoint:   {escape(model.endpoint_url)}")
    out.print(f"  protocols:  {escape(model.protocols_url)}")
    out.print(f"  access key: {model.access_key_prefix}… (shown when made or rotated)")
    out.print("\nReplicas:" if replicas else "\nNo replicas.")
    if replicas:
        out.print(replicas_table(replicas))
    if deployments:
        out.print("\nDeployments (newest first):")
        out.print(deployments_table(deployments))
    if builds:
        out.print("\nBuilds (newest first):")
        table = Table(
            "BUILD", "STATE", "IMAGE BUILD", "COMMENT", "CREATED", box=None, pad_edge=False
        )
        for b in builds:
            table.add_row(
                f"#{b.number}",
                run_state(b.build.state),
                f"#{b.build.number}",
                escape(b.comment or "-"),
                when(b.created_at),
            )
        out.print(table)


def _first(items: Any, count: int) -> list[Any]:
    found = []
    for item in items:
        found.append(item)
        if len(found) >= count:
            break
    return found


@app.command("delete")
@friendly_errors
def delete(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a model with its builds, deployments and replicas (contributors and up). It
    stops answering at once; its replicas finish their calls and stop.

    Example:

      kiln models delete alice/demo adder --yes
    """
    if not yes and not typer.confirm(f"Delete model {name} of {project} and all it serves?"):
        fail("not deleted")
    with connect() as kiln:
        kiln.delete_model(project.owner, project.slug, name)
    out.print(f"Deleted model {escape(name)}.")


@app.command("rotate-key")
@friendly_errors
def rotate_key(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
) -> None:
    """Give the model a new access key (contributors and up); the old one stops working
    within seconds. The new key is printed alone on stdout, once.

    Example:

      export KILN_MODEL_ACCESS_KEY=$(kiln models rotate-key alice/demo adder)
    """
    with connect() as kiln:
        key = kiln.rotate_model_access_key(project.owner, project.slug, name)
    print(key)
    err.print("The old access key no longer works; this one is shown only once.")


# ---- builds --------------------------------------------------------------------------------


@app.command("build")
@friendly_errors
def build(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    commit: Annotated[
        str | None,
        typer.Option(help="Build this commit, branch or tag instead of the files as they are."),
    ] = None,
    comment: Annotated[str, typer.Option("--comment", "-m", help="What changed.")] = "",
    logs: Annotated[
        bool, typer.Option("--logs", help="Stream the build's log instead of the step view.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the build until it ends.")
    ] = True,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Build the model into an image (contributors and up): the project's code and its
    dependencies with Kiln's model server, which the image runs. Exits 1 unless it succeeded.

    Examples:

      kiln models build alice/demo adder -m "first version"

      kiln models build alice/demo adder --commit main --logs
    """
    owner, slug = project.owner, project.slug
    with connect() as kiln:
        made = kiln.create_model_build(owner, slug, name, commit=commit, comment=comment)
        if not wait:
            if as_json:
                print_json(made)
            else:
                out.print(f"Build #{made.number} of model {escape(name)} is queued")
                out.print(
                    f"  follow it: kiln models logs {project} {escape(name)} "
                    f"--build {made.number} -f"
                )
            return
        if not as_json:
            out.print(
                f"Build #{made.number} of model {escape(name)} queued "
                f"(image build #{made.build.number} of {project})"
            )
        ended = (follow_build_log if logs else watch_build)(kiln, project, made.build)
        if not as_json and logs:
            out.print(steps_table(ended))
        made = kiln.get_model_build(owner, slug, name, made.number)
    if as_json:
        print_json(made)
    else:
        report_build(ended)
        if ended.state == "succeeded":
            out.print(f"  next: kiln models deploy {project} {escape(name)} --build {made.number}")
    if ended.state != "succeeded":
        raise typer.Exit(1)


# ---- deployments ---------------------------------------------------------------------------


def _progress(deployment: Deployment, replicas: list[Replica]) -> str:
    mine = [r for r in replicas if r.deployment == deployment.number]
    ready = sum(1 for r in mine if r.ready)
    reason = f": {escape(deployment.reason.splitlines()[0])}" if deployment.reason else ""
    return (
        f"Deployment #{deployment.number} (build #{deployment.build}) is "
        f"{_state(deployment.state)}, {ready}/{deployment.replicas} replicas ready{reason}"
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
    return next((d for d in _first(history, 20) if d.state in ("deploying", "serving")), None)


@app.command("deploy")
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
    answering until every replica of the new one is ready: no call fails in between. Without
    --replicas, a redeploy keeps the current number of replicas.

    Examples:

      kiln models deploy alice/demo adder

      kiln models deploy alice/demo adder --build 3 --replicas 2 --env THRESHOLD=0.7
    """
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
            env=_env(env or []),
        )
        _deployed(kiln, project, name, made, wait, timeout, as_json, "Deploying")


@app.command("rollback")
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


@app.command("scale")
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


@app.command("stop")
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


# ---- logs and calls ------------------------------------------------------------------------


@app.command("logs")
@friendly_errors
def logs(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    replica: Annotated[
        str | None,
        typer.Option(
            "--replica",
            help="A replica's id (see `kiln models show`; default: a ready one).",
            show_default=False,
        ),
    ] = None,
    build_number: Annotated[
        int | None,
        typer.Option(
            "--build", "-b", min=1, help="A model build's log instead.", show_default=False
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until it ends (Ctrl-C ends).")
    ] = False,
) -> None:
    """Print a replica's log — what the model server and your function printed, an import
    error's traceback too — or a model build's log; --follow streams it live.

    Examples:

      kiln models logs alice/demo adder --follow

      kiln models logs alice/demo adder --replica 3f2a9c0d1e7b4a65

      kiln models logs alice/demo adder --build 2
    """
    if replica and build_number:
        raise typer.BadParameter("give --replica or --build, not both")
    owner, slug = project.owner, project.slug
    with connect() as kiln:
        if build_number is not None:
            for chunk in kiln.iter_model_build_logs(owner, slug, name, build_number, follow=follow):
                write_out(chunk)
            return
        if replica is None:
            now = kiln.list_replicas(owner, slug, name)
            if not now:
                fail(
                    f"model {name} has no replicas now (deploy it, or read a build's log with "
                    "--build N)"
                )
            replica = next((r for r in now if r.ready), now[0]).id  # a serving one first
            if len(now) > 1:
                err.print(f"replica {replica} (of {len(now)}; choose one with --replica ID)")
        for chunk in kiln.iter_replica_logs(owner, slug, name, replica, follow=follow):
            write_out(chunk)


def _request_json(value: str | None) -> Any:
    """The call's request: JSON text, @FILE, or stdin (no value or '-')."""
    if value is None or value == "-":
        if sys.stdin.isatty():
            raise typer.BadParameter("give the request as JSON, @FILE or on stdin")
        text, where = sys.stdin.read(), "stdin"
    elif value.startswith("@"):
        path = Path(value[1:])
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    else:
        text, where = value, "REQUEST"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{where} is not JSON: {exc}") from None


@app.command("call")
@friendly_errors
def call(
    project: Annotated[ProjectRef, PROJECT_ARG],
    name: Annotated[str, NAME_ARG],
    request: Annotated[
        str | None,
        typer.Argument(
            metavar="[REQUEST]",
            help="The request as JSON, @FILE with JSON, or '-' / nothing to read stdin.",
            show_default=False,
        ),
    ] = None,
    access_key: Annotated[
        str | None,
        typer.Option(
            "--access-key",
            envvar="KILN_MODEL_ACCESS_KEY",
            help="The model's access key (from `kiln models create` or `rotate-key`).",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            envvar="KILN_MODEL_API_KEY",
            help="Your model API key, kilnm_... (from `kiln models keys create`).",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Call this endpoint instead of the site's /modelservice/model "
            "(e.g. the model's endpoint URL on modelservice.<content domain>).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Call the model with CML's contract and print its answer (JSON).

    The request goes as {"accessKey": ..., "request": REQUEST} with your model API key as
    Bearer. Exits 1 when the call was refused or the function failed (the answer is printed
    all the same).

    Examples:

      kiln models call alice/demo adder '{"a": 1, "b": 2}' --access-key KEY --key kilnm_...

      export KILN_MODEL_ACCESS_KEY=... KILN_MODEL_API_KEY=kilnm_...

      kiln models call alice/demo adder @request.json

      echo '{"a": 1, "b": 2}' | kiln models call alice/demo adder
    """
    body = _request_json(request)
    if not access_key:
        raise typer.BadParameter(
            "the model's access key is needed: --access-key or $KILN_MODEL_ACCESS_KEY "
            "(shown by `kiln models create`; `kiln models rotate-key` makes a new one)"
        )
    with connect() as kiln:
        model = kiln.get_model(project.owner, project.slug, name)
        if model.serving_deployment is None:
            fail(
                f"model {name} of {project} has no serving deployment: deploy it first "
                f"(`kiln models deploy {project} {name}`; `kiln models show` says why not)"
            )
        if not key and not model.allow_unauthenticated:
            fail(
                "calling this model takes a model API key: --key or $KILN_MODEL_API_KEY "
                "(create one with `kiln models keys create`)"
            )
        try:
            answer = kiln.call_model(access_key, body, key, url=url)
        except ModelCallError as exc:
            if isinstance(exc.body, dict):
                print(json.dumps(exc.body, indent=2, ensure_ascii=False))
            fail(f"the call failed ({exc.status}): {exc.detail}")
    print(json.dumps(answer, indent=2, ensure_ascii=False))
