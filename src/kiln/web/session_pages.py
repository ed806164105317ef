"""Sessions pages: a project's sessions, starting and stopping them, and one session's page
with its live start timeline and its terminal (xterm.js on the terminal WebSocket).

As in ``project_pages``, each action calls the API's handler (``kiln.api.sessions``), so the
rules, the runner calls, the audit records and the commits are the API's own; this module
only parses forms and renders. Authorization is the API's too: viewers may look, starting
and stopping need the same role as the API (``WriteProject``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, Response

from kiln.api import sessions as api
from kiln.api.deps import Ctx, Db, ProjectAccess, ViewProject, WriteProject
from kiln.db.workload_models import Workload
from kiln.domain import resources
from kiln.domain import session_editors as editors
from kiln.domain import sessions as domain
from kiln.domain.app_instances import answers
from kiln.domain.authz import USE_SESSION
from kiln.runtimes.catalog import BUILTIN_NAME
from kiln.scheduling.states import TERMINAL_STATES, IllegalTransition, WorkloadState
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, redirect, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)

SESSIONS = "/p/{owner}/{project}/sessions"
PAGE_SIZE = 30
EDITOR_LABELS = {"terminal": "Terminal", "jupyterlab": "JupyterLab"}
# States a session only passes through: while one is shown, the page asks again by itself.
PASSING = frozenset(
    {WorkloadState.QUEUED, WorkloadState.WAITING, WorkloadState.STARTING, WorkloadState.STOPPING}
)
ENDED = frozenset(TERMINAL_STATES)


@dataclass(frozen=True)
class TimelineRow:
    state: str
    message: str
    at: str  # ISO 8601, for <time datetime>
    clock: str  # HH:MM:SS.mmm UTC
    offset: str  # since the session was queued: what makes a slow start visible


def timeline_rows(session: api.SessionPublic) -> list[TimelineRow]:
    rows = []
    first = session.timeline[0].at if session.timeline else None
    for entry in session.timeline:
        elapsed = (entry.at - first).total_seconds() if first else 0.0
        rows.append(
            TimelineRow(
                state=entry.state,
                message=entry.message,
                at=entry.at.isoformat(),
                clock=entry.at.strftime("%H:%M:%S.") + f"{entry.at.microsecond // 1000:03d}",
                offset=f"+{elapsed:.2f} s",
            )
        )
    return rows


def size_label(cpu: float, memory_bytes: int) -> str:
    memory = memory_bytes / 1024**3
    memory_text = f"{memory:g} GiB" if memory >= 1 else f"{memory_bytes // 1024**2} MiB"
    return f"{cpu:g} vCPU · {memory_text}"


def _sessions_url(access: ProjectAccess) -> str:
    return project_url(access, "sessions")


def _view(session: api.SessionPublic) -> dict[str, Any]:
    """What the templates show of one session, beside the API's own fields."""
    return {
        "s": session,
        "editor_label": EDITOR_LABELS.get(session.editor, session.editor),
        "size": size_label(session.cpu, session.memory_bytes),
        "passing": session.state in PASSING,
        "ended": session.state in ENDED,
    }


def _start_choices(db: Db) -> dict[str, Any]:
    """The start form's choices: the site's runtimes (each with the editors it offers; the
    default one chosen), the editors they offer, the site's resource profiles (the default one
    chosen) and what "the site's default" means when no profile is marked."""
    resources.ensure_builtin_runtime(db)  # as the runtimes API does: it is always listed
    db.commit()
    catalog = resources.list_runtimes(db)
    default_runtime = next((r.name for r in catalog if r.is_default), BUILTIN_NAME)
    runtimes = [
        {
            "name": r.name,
            "label": f"{r.name} ("
            + (f"Python {r.python_version}; " if r.python_version else "")
            + ", ".join(EDITOR_LABELS.get(e, e) for e in r.editors)
            + ")",
            "default": r.name == default_runtime,
        }
        for r in catalog
    ]
    offered = {e for r in catalog for e in r.editors}
    profiles = [
        {
            "name": p.name,
            "label": f"{p.name} ({size_label(p.cpu_millis / 1000, p.memory_bytes)}"
            + (f", {p.gpu} GPU" if p.gpu else "")
            + ")",
            "default": p.is_default,
        }
        for p in resources.list_profiles(db)
    ]
    fallback = size_label(domain.DEFAULT_CPU_MILLIS / 1000, domain.DEFAULT_MEMORY_BYTES)
    return {
        "runtimes": runtimes,
        "editors": [(e, EDITOR_LABELS.get(e, e)) for e in domain.EDITORS if e in offered],
        "profiles": profiles,
        "has_default_profile": any(p["default"] for p in profiles),
        "fallback_size": fallback,
    }


# ---- the list -----------------------------------------------------------------------------


def _list(
    request: Request, caller: UiCaller, access: ProjectAccess, db: Db, cursor: str | None
) -> Response:
    page = api.list_sessions(access, db, PAGE_SIZE, cursor)
    views = [_view(s) for s in page.items]
    context = {
        "sessions": views,
        "next_cursor": page.next_cursor,
        "cursor": cursor,
        "polling": any(v["passing"] for v in views),
        "sessions_url": _sessions_url(access),
        **project_context(access, "sessions"),
    }
    if is_htmx(request):  # polling and stop buttons replace only the list
        return render(request, "sessions/_list.html", caller, **context)
    return render(request, "sessions/list.html", caller, **context, **_start_choices(db))


@router.get(SESSIONS)
def sessions_page(
    request: Request,
    caller: UiCaller,
    access: ViewProject,
    db: Db,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> Response:
    return _list(request, caller, access, db, cursor)


@router.post(SESSIONS)
def start_session(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    editor: Annotated[str, Form(max_length=40)] = "terminal",
    runtime: Annotated[str, Form(max_length=100)] = "",
    profile: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Start a session and go to its page (also when it failed: the page says why)."""
    body = api.SessionCreate(editor=editor, runtime=runtime or None, profile=profile or None)
    session = api.start_session(body, access, request, ctx, db)
    return redirect(request, f"{_sessions_url(access)}/{session.id}")


# ---- one session --------------------------------------------------------------------------


def _session_context(access: ProjectAccess, session: api.SessionPublic) -> dict[str, Any]:
    url = f"{_sessions_url(access)}/{session.id}"
    project = project_context(access, "sessions")
    return {
        **project,
        **_view(session),
        # The terminal follows the one rule for using a session (the WebSocket checks it too).
        "can_use_session": project["can"][USE_SESSION.value],
        "session_url": url,
        "timeline": timeline_rows(session),
        "terminal_path": f"/api/v1/projects/{access.project.owner_name}/"
        f"{access.project.slug}/sessions/{session.id}/terminal",
        "console_path": f"/api/v1/projects/{access.project.owner_name}/"
        f"{access.project.slug}/sessions/{session.id}/logs",
        "sessions_url": _sessions_url(access),
    }


@router.get(SESSIONS + "/{session_id}")
def session_page(
    request: Request,
    session_id: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    session = api.get_session(session_id, access, request, ctx, db)
    # xterm.js creates <style> elements; this response's CSP admits those carrying the
    # nonce, which only the page's own script hands to them (see static/session-terminal.js).
    nonce = secrets.token_urlsafe(18)
    return render(
        request,
        "sessions/detail.html",
        caller,
        style_nonce=nonce,
        **_session_context(access, session),
    )


@router.get(SESSIONS + "/{session_id}/status")
def session_status(
    request: Request,
    session_id: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
) -> Response:
    """The session's state and timeline: polled by its page while the session is on its way."""
    session = api.get_session(session_id, access, request, ctx, db)
    return render(request, "sessions/_status.html", caller, **_session_context(access, session))


@router.post(SESSIONS + "/{session_id}/stop")
def stop_session(
    request: Request,
    session_id: str,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    view: Annotated[str, Form(max_length=10)] = "session",
) -> Response:
    """Stop a session; answer with what the page that asked shows: the list, or the session."""
    try:
        session = api.stop_session(session_id, access, request, ctx, db)
    except IllegalTransition:
        # It had already ended: the page was out of date, or the runner recorded the end
        # while we asked. The person wanted it stopped and it is: show how it ended.
        db.rollback()
        session = api.get_session(session_id, access, request, ctx, db)
        if session.state not in ENDED:
            raise
    if view == "list":
        return _list(request, caller, access, db, None)
    if not is_htmx(request):
        return redirect(request, f"{_sessions_url(access)}/{session.id}")
    return render(request, "sessions/_status.html", caller, **_session_context(access, session))


# ---- web UIs inside the session --------------------------------------------------------------


@dataclass(frozen=True)
class WebUi:
    variable: str  # the environment variable naming its port
    port: int
    label: str  # its origin's first label: app-<id>, read-only-<id>
    listening: bool
    allowed: bool  # may this user open it


def web_uis(row: Workload, can_use: bool) -> list[WebUi]:
    """The session's two web UI ports, and whether something answers on each now."""
    found = []
    for variable, port, prefix, allowed in (
        ("CDSW_APP_PORT", editors.CDSW_APP_PORT, "app-", can_use),
        ("CDSW_READONLY_PORT", editors.CDSW_READONLY_PORT, "read-only-", True),
    ):
        endpoint = row.ports.get(str(port), "") if row.state == WorkloadState.RUNNING else ""
        listening = bool(endpoint) and answers(endpoint, timeout=0.5)
        found.append(WebUi(variable, port, f"{prefix}{row.id}", listening, allowed))
    return found


@router.get(SESSIONS + "/{session_id}/web-uis")
def session_web_uis(
    request: Request, session_id: str, caller: UiCaller, access: ViewProject, db: Db
) -> Response:
    """What listens on the session's web UI ports, with links: polled while it runs."""
    row = domain.get_session(db, access.project, session_id)
    can_use = project_context(access, "sessions")["can"][USE_SESSION.value]
    return render(
        request,
        "sessions/_web_uis.html",
        caller,
        uis=web_uis(row, can_use),
        running=row.state == WorkloadState.RUNNING,
        session_url=f"{_sessions_url(access)}/{row.id}",
    )
