"""Builds pages: a project's build history with a "Build" form, and one build with its step
timeline and its log followed live.

As everywhere in the UI, each action calls the API's handler (``kiln.api.builds``): the
rules, audit records and commits are the API's own, and so is authorization — viewers look,
contributors and up build and cancel.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, Response

from kiln.api import builds as api
from kiln.api.deps import Ctx, Db, ProjectAccess, ViewProject, WriteProject
from kiln.builder.client import builder_client
from kiln.domain.errors import InvalidInput
from kiln.scheduling.states import TERMINAL_STATES
from kiln.web.job_pages import duration, log_fragment
from kiln.web.log_chunks import read_log_chunk
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, redirect, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)

BUILDS = "/p/{owner}/{project}/builds"
BUILD = BUILDS + "/{number}"
PAGE = 30
ENDED = frozenset(str(s) for s in TERMINAL_STATES)
STEP_LABELS = {
    "snapshot": "Snapshot",
    "base": "Base image",
    "dependencies": "Dependencies",
    "code": "Code layer",
    "push": "Push",
}


@dataclass(frozen=True)
class StepView:
    """One row of the timeline; ``share`` is its part of the build's time (for the bar)."""

    name: str
    label: str
    status: str
    detail: str
    seconds: float | None
    share: float


def timeline(build: api.BuildPublic) -> list[StepView]:
    """Every step in order, those not reached yet as ``pending``."""
    seen = {s.name: s for s in build.steps}
    total = sum(s.duration_seconds or 0.0 for s in build.steps) or 1.0
    rows = []
    for name, label in STEP_LABELS.items():
        step = seen.get(name)
        if step is None:
            rows.append(StepView(name, label, "pending", "", None, 0.0))
        else:
            seconds = step.duration_seconds
            share = round(100 * (seconds or 0.0) / total, 1)
            rows.append(StepView(name, label, step.status, step.detail, seconds, share))
    return rows


def _builds_url(access: ProjectAccess) -> str:
    return project_url(access, "builds")


def _context(access: ProjectAccess) -> dict[str, Any]:
    return {
        "builds_url": _builds_url(access),
        "duration": duration,
        **project_context(access, "builds"),
    }


# ---- the list -----------------------------------------------------------------------------


@router.get(BUILDS)
def builds_page(
    request: Request,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    page = api.list_builds(access, ctx, db, PAGE, cursor)
    context = {
        "builds": page.items,
        "next_cursor": page.next_cursor,
        "cursor": cursor,
        "polling": any(b.state not in ENDED for b in page.items),
        **_context(access),
    }
    # While builds are live the history refreshes itself (only the table is replaced).
    template = "builds/_history.html" if is_htmx(request) else "builds/list.html"
    return render(request, template, caller, **context)


@router.post(BUILDS)
def start_build(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    commit: Annotated[str, Form(max_length=200)] = "",
    command: Annotated[str, Form(max_length=4000)] = "",
    no_cache: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """Build now (contributors and up), then show the build following its log."""
    try:
        argv = shlex.split(command) if command.strip() else None
    except ValueError as exc:
        raise InvalidInput(f"command: {exc}") from None
    body = api.BuildCreate(commit=commit.strip() or None, command=argv, no_cache=no_cache == "true")
    build = api.create_build(body, access, request, ctx, db)
    return redirect(request, f"{_builds_url(access)}/{build.number}")


# ---- one build ----------------------------------------------------------------------------


def _build_context(access: ProjectAccess, build: api.BuildPublic) -> dict[str, Any]:
    build_url = f"{_builds_url(access)}/{build.number}"
    return {
        "build": build,
        "steps": timeline(build),
        "build_url": build_url,
        "run_url": build_url,  # the log poller (shared with job runs) asks {run_url}/log
        "live": build.state not in ENDED,
        **_context(access),
    }


@router.get(BUILD)
def build_page(
    request: Request, number: int, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db
) -> Response:
    build = api.get_build(number, access, ctx, db)
    # The log arrives through the poller (its first poll at once): the page never waits on
    # the builder.
    return render(
        request,
        "builds/detail.html",
        caller,
        offset=0,
        attempt=build.attempt,
        done=False,
        problem="",
        oob=False,
        **_build_context(access, build),
    )


@router.get(BUILD + "/status")
def build_status(
    request: Request, number: int, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db
) -> Response:
    build = api.get_build(number, access, ctx, db)
    return render(request, "builds/_status.html", caller, **_build_context(access, build))


def _read_log(request: Request, ctx: Ctx, build: api.BuildPublic, offset: int) -> tuple[str, int]:
    """Up to LOG_CHUNK bytes of the build's log from ``offset``: (text, next offset)."""
    if build.state in ("queued", "waiting") and build.attempt == 1:
        return "", offset
    client = builder_client(request.app.state, ctx.settings)
    text, used = read_log_chunk(client.logs(build.id, offset, False), ended=build.state in ENDED)
    return text, offset + used


@router.get(BUILD + "/log")
def build_log(
    request: Request,
    number: int,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    attempt: Annotated[int, Query(ge=0, le=1000)] = 0,
) -> Response:
    """New log output since ``offset``, appended to the page; the answer also replaces the
    poller (out of band), which stops once the build has ended and all is shown. One log
    spans every attempt of the build."""
    build = api.get_build(number, access, ctx, db)
    return log_fragment(
        request,
        caller,
        lambda: _read_log(request, ctx, build, offset),
        offset=offset,
        ended=build.state in ENDED,
        attempt=build.attempt,
        new_attempt=False,
        context=_build_context(access, build),
    )


@router.post(BUILD + "/cancel")
def cancel_build(
    request: Request, number: int, caller: UiCaller, access: WriteProject, ctx: Ctx, db: Db
) -> Response:
    build = api.cancel_build(number, access, request, ctx, db)
    if not is_htmx(request):
        return redirect(request, f"{_builds_url(access)}/{build.number}")
    return render(request, "builds/_status.html", caller, **_build_context(access, build))
