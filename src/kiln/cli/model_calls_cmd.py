"""`kiln models logs|call`: a replica's or a build's log, and calling a model with CML's
contract (registered on `kiln models` by ``kiln.cli.models_cmd``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.model_views import NAME_ARG
from kiln.cli.remote import PROJECT_ARG, ProjectRef, connect, err, fail, friendly_errors, write_out
from kiln.sdk.model_serving import ModelCallError


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


def read_json_argument(value: str | None, what: str = "REQUEST") -> Any:
    """A JSON argument (a call's request, a model's example): JSON text, @FILE, or stdin
    (no value or '-'); ``what`` names it in errors."""
    if value is None or value == "-":
        if sys.stdin.isatty():
            raise typer.BadParameter(f"give {what} as JSON, @FILE or on stdin")
        text, where = sys.stdin.read(), "stdin"
    elif value.startswith("@"):
        path = Path(value[1:])
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    else:
        text, where = value, what
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{where} is not JSON: {exc}") from None


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
    body = read_json_argument(request)
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


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
    app.command("call")(call)
