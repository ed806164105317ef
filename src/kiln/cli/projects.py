"""`kiln projects create|list|delete` (and `clone`, from ``kiln.cli.git_cmd``)."""

from __future__ import annotations

import enum
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kiln.cli.remote import (
    JSON_OPTION,
    PROJECT_ARG,
    ProjectRef,
    connect,
    friendly_errors,
    out,
    print_json,
    when,
)

app = typer.Typer(
    help="Create, list, clone and delete projects on the site you logged in to.",
    no_args_is_help=True,
)


class Visibility(enum.StrEnum):
    private = "private"
    team = "team"
    public = "public"


@app.command("create")
@friendly_errors
def create(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Display name; the URL slug derives from it.")
    ],
    template: Annotated[
        str | None,
        typer.Option(help="Start from a built-in template, e.g. python-starter."),
    ] = None,
    owner: Annotated[
        str | None, typer.Option(help="A team you belong to (default: you)", show_default=False)
    ] = None,
    visibility: Annotated[
        Visibility, typer.Option(help="Who may see the project.")
    ] = Visibility.private,
    slug: Annotated[
        str | None, typer.Option(help="URL name (default: derived from NAME)", show_default=False)
    ] = None,
    description: Annotated[str, typer.Option(help="A line about the project.")] = "",
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Create a project, blank or from a template.

    Examples:

      kiln projects create demo

      kiln projects create "Churn model" --template python-starter --owner data-team
    """
    with connect() as kiln:
        project = kiln.create_project(
            name,
            template=template,
            owner=owner,
            visibility=visibility.value,
            slug=slug,
            description=description,
        )
    if as_json:
        print_json(project)
        return
    out.print(f"Created [bold]{escape(project.full_name)}[/] ({project.visibility})")
    out.print(f"  clone it: kiln projects clone {escape(project.full_name)}")


@app.command("list")
@friendly_errors
def list_(
    search: Annotated[
        str | None, typer.Option("--search", "-s", help="Only names or owners containing Q.")
    ] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the projects you can see (all pages).

    Examples:

      kiln projects list

      kiln projects list --search churn --json
    """
    with connect() as kiln:
        projects = kiln.list_projects(search)
    if as_json:
        print_json(projects)
        return
    if not projects:
        hint = "" if search else "; create one with `kiln projects create NAME`"
        out.print(f"No projects{' match ' + repr(search) if search else ''}{hint}.")
        return
    table = Table("PROJECT", "NAME", "VISIBILITY", "UPDATED", box=None, pad_edge=False)
    for p in projects:
        table.add_row(escape(p.full_name), escape(p.name), p.visibility, when(p.updated_at))
    out.print(table)


@app.command("delete")
@friendly_errors
def delete(
    project: Annotated[ProjectRef, PROJECT_ARG],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a project with all its files (needs the admin role on it). Cannot be undone.

    Examples:

      kiln projects delete alice/demo

      kiln projects delete alice/demo --yes
    """
    with connect() as kiln:
        found = kiln.get_project(project.owner, project.slug)
        if not yes:
            typer.confirm(f"Delete {found.full_name} and all its files?", abort=True)
        kiln.delete_project(project.owner, project.slug)
    out.print(f"Deleted {escape(str(project))}")
