"""`kiln models ...`: a project's models — create, build, deploy, scale, roll back, stop,
read replicas' logs, call, delete — and `kiln models keys ...` for model API keys."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli import model_calls_cmd, model_deploys_cmd, model_keys_cmd
from kiln.cli.builds_cmd import follow_build_log, report_build, steps_table, watch_build
from kiln.cli.model_calls_cmd import read_json_argument
from kiln.cli.model_views import NAME_ARG, deployments_table, first, replicas_table
from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    err,
    fail,
    friendly_errors,
    out,
    print_json,
    run_state,
    when,
)

app = typer.Typer(
    help="Serve a Python function of a project as an authenticated REST endpoint: create a "
    "model, build it into an image, deploy it as replicas, call it, scale it, roll it back.",
    no_args_is_help=True,
)
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
    example: Annotated[
        str | None,
        typer.Option(
            "--example",
            help="A sample request, as JSON or @FILE with JSON: the model's page fills its "
            "test widget and call snippets with it.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create a model (contributors and up). Its access key is shown once: keep it.

    Next: `kiln models build`, then `kiln models deploy`.

    Examples:

      kiln models create alice/demo adder --file model.py --function predict

      kiln models create alice/demo churn -f churn/serve.py -F predict --profile small \\
        --serving-mode processes --concurrency 4

      kiln models create alice/demo adder -f model.py -F predict --example '{"a": 1, "b": 2}'
    """
    fields: dict[str, Any] = {
        "description": description,
        "profile": profile,
        "base": base,
        "serving_mode": serving_mode,
        "concurrency": concurrency,
    }
    if example is not None:
        fields["example_input"] = read_json_argument(example, "--example")
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
        deployments = first(kiln.iter_deployments(owner, slug, name, page_size=5), 5)
        builds = first(kiln.iter_model_builds(owner, slug, name, page_size=5), 5)
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
    if model.example_input is not None:
        example = json.dumps(model.example_input, ensure_ascii=False)
        out.print(
            f"  example:    {escape(example if len(example) <= 200 else example[:199] + '…')}"
        )
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


model_deploys_cmd.register(app)
model_calls_cmd.register(app)
app.add_typer(model_keys_cmd.app, name="keys")
