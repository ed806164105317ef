"""Sessions: start, list, look at, stop, and the terminal WebSocket.

Starting answers **201 with the session**, whatever the runner did: the session row is
acknowledged (durable) before the runner is asked, so a start the runner refuses or cannot
take (unreachable) is a session in state ``failed`` whose ``reason`` and timeline say why,
not a 5xx. Stopping answers 503 when the runner cannot be reached (the session stays
``stopping``; stopping again finishes it).

The terminal (``.../sessions/{id}/terminal``) is a WebSocket bridged to the runner's Exec
with a PTY: binary frames, and text frames that are not a control message, are the
terminal's input; the text frame ``{"type": "resize", "cols": C, "rows": R}`` resizes it;
output arrives as binary frames, and when the shell exits a text frame
``{"type": "exit", "exit_code": N, "session_state": S}`` precedes a normal close (``S`` is the
session's state then: ``stopping`` when the shell ended because the session is being
stopped). Refusals close the socket before it is accepted: 4401 not signed in, 4403 not
allowed (role too low, foreign Origin), 4404 no such project or session, 4409 the session is
not running; 1011 the runner failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any

import anyio
import grpc
from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from kiln.api.deps import (
    Ctx,
    Db,
    ProjectAccess,
    ViewProject,
    WriteProject,
    project_access,
    resolve_caller,
)
from kiln.api.handoff import handoff_redirect
from kiln.api.logs import empty_log, stream_log
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.db.models import Project, User
from kiln.db.workload_models import Workload, WorkloadEvent
from kiln.domain import audit, session_access, session_editors, session_endings
from kiln.domain import sessions as domain
from kiln.domain import workers as worker_domain
from kiln.domain.authz import USE_SESSION, authorize
from kiln.domain.errors import Forbidden, KilnError, NotAuthenticated, NotFound
from kiln.domain.projects import get_project
from kiln.rpc import runner_pb2 as pb
from kiln.runner.client import RunnerClient, runner_client, runner_error
from kiln.settings import Settings

router = APIRouter(prefix="/projects", tags=["sessions"])
UseSession = Annotated[ProjectAccess, project_access(USE_SESSION)]

SESSIONS = "/{owner}/{project}/sessions"


class SessionCreate(InputModel):
    editor: str = Field(
        "terminal",
        max_length=40,
        description="'terminal' or 'jupyterlab' (when the runtime has it: see its editors)",
    )
    runtime: str | None = Field(
        None, max_length=100, description="A runtime's name; default: the site's default."
    )
    profile: str | None = Field(
        None, max_length=64, description="A resource profile's name; default: the site's."
    )


class TimelineEntry(BaseModel):
    state: str
    at: datetime
    message: str


class SessionPublic(BaseModel):
    id: str
    project: str
    editor: str
    state: str
    reason: str
    outcome: str = Field(
        description='How it ended, in words ("Stopped by alice.", "Stopped by Kiln: idle '
        'for longer than IDLE_MAXIMUM_MINUTES."); empty while it lives'
    )
    stop_cause: str | None = Field(
        description="Why Kiln ended it, when it did: requested, idle, lifetime, start_timeout"
    )
    exit_code: int | None = Field(
        description="The sandbox's exit status when it ended by itself (not when stopped)"
    )
    cpu: float = Field(description="vCPU")
    memory_bytes: int
    profile: str | None
    runtime: str | None = Field(description="The runtime's name (None: since removed)")
    editor_url: str | None = Field(
        description="For an editor served over the web (JupyterLab): this API path redirects "
        "a signed-in user to it, on the session's own origin"
    )
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    timeline: list[TimelineEntry]


def _client(request: Request | WebSocket, settings: Settings) -> RunnerClient:
    return runner_client(request.app.state, settings)


def _public(
    row: Workload,
    project: Project,
    events: list[WorkloadEvent],
    users: dict[int, str],
    profiles: dict[int, str],
    runtimes: dict[int, str],
) -> SessionPublic:
    path = f"/api/v1/projects/{project.owner_name}/{project.slug}/sessions/{row.id}/open"
    return SessionPublic(
        id=row.id,
        project=f"{project.owner_name}/{project.slug}",
        editor=row.editor,
        state=row.state,
        reason=row.reason,
        outcome=session_endings.outcome(row),
        stop_cause=row.stop_cause,
        exit_code=row.exit_code if session_endings.exit_code_matters(row) else None,
        cpu=row.cpu_millis / 1000,
        memory_bytes=row.memory_bytes,
        profile=profiles.get(row.profile_id) if row.profile_id is not None else None,
        runtime=runtimes.get(row.runtime_id) if row.runtime_id is not None else None,
        editor_url=path if session_editors.has_web_editor(row.editor) else None,
        created_by=users.get(row.user_id) if row.user_id is not None else None,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        timeline=[TimelineEntry(state=e.state, at=e.at, message=e.message) for e in events],
    )


def _publish(db: Db, project: Project, rows: list[Workload]) -> list[SessionPublic]:
    events = domain.timelines(db, [r.id for r in rows])
    users = domain.usernames(db, {r.user_id for r in rows})
    profiles = domain.profile_names(db, {r.profile_id for r in rows})
    runtimes = session_editors.runtime_names(db, {r.runtime_id for r in rows})
    return [_public(r, project, events[r.id], users, profiles, runtimes) for r in rows]


@router.post(SESSIONS, status_code=201, response_model=SessionPublic)
def start_session(
    body: SessionCreate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> SessionPublic:
    """Start a session (contributors and up). 201 even when it failed to start: see
    ``state``/``reason`` and the timeline."""
    row = domain.create_session(
        db, access.project, access.user, body.editor, body.profile, body.runtime
    )
    commit_audited(db, access, request, "session.start", session=row.id, editor=row.editor)
    client = _client(request, ctx.settings)
    if domain.hold_for_quota(db, ctx.settings, row, access.user):
        client.wake()  # the runner's reconciler starts it when room frees up
    else:
        domain.launch(db, client, access.project, row)
    return _publish(db, access.project, [row])[0]


@router.get(SESSIONS, response_model=PageOut[SessionPublic])
def list_sessions(
    access: ViewProject,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> PageOut[SessionPublic]:
    """The project's sessions, newest first (states as last recorded)."""
    page = domain.list_sessions(db, access.project, limit, cursor)
    return PageOut(items=_publish(db, access.project, page.items), next_cursor=page.next_cursor)


@router.get(SESSIONS + "/{session_id}", response_model=SessionPublic)
def get_session(
    session_id: str, access: ViewProject, request: Request, ctx: Ctx, db: Db
) -> SessionPublic:
    """One session with its timeline; a live one is checked with the runner first."""
    row = domain.get_session(db, access.project, session_id)
    domain.refresh(db, _client(request, ctx.settings), row)
    worker_domain.settle_children(db, _client(request, ctx.settings), row)  # if it ended
    return _publish(db, access.project, [row])[0]


@router.get(SESSIONS + "/{session_id}/logs", response_class=StreamingResponse)
def session_logs(
    session_id: str,
    access: WriteProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    follow: bool = False,
) -> StreamingResponse:
    """The session's console, kept after it ends: what its terminals showed and what its
    editor printed. Those who may use the session's terminal may read it (contributors and
    up): a terminal shows what its user typed."""
    row = domain.get_session(db, access.project, session_id)
    if row.state in ("queued", "waiting"):
        return empty_log()
    return stream_log(_client(request, ctx.settings), domain.runner_id(row), offset, follow)


@router.delete(SESSIONS + "/{session_id}", response_model=SessionPublic)
def stop_session(
    session_id: str, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> SessionPublic:
    """Stop a session (contributors and up) and answer with its final state."""
    row = domain.get_session(db, access.project, session_id)
    domain.stop_session(db, _client(request, ctx.settings), row, access.user)
    worker_domain.settle_children(db, _client(request, ctx.settings), row)  # they end with it
    commit_audited(db, access, request, "session.stop", session=row.id, state=row.state)
    return _publish(db, access.project, [row])[0]


@router.get(
    SESSIONS + "/{session_id}/open",
    status_code=303,
    response_class=RedirectResponse,
    responses={303: {"description": "To the editor on the session's own origin"}},
)
def open_editor(
    session_id: str, access: UseSession, request: Request, ctx: Ctx, db: Db
) -> RedirectResponse:
    """Open the session's web editor (JupyterLab). The UI's cookie never goes to the
    session's own origin, so this redirects there with a token that signs the caller in
    once, within a minute (``/_kiln/auth`` on that origin; see the admin guide). 409 when
    the session is not running or its editor is the terminal."""
    row = domain.get_session(db, access.project, session_id)
    domain.refresh(db, _client(request, ctx.settings), row)
    session_access.admit(db, row.id, access.user)
    redirect = handoff_redirect(request, ctx, db, row.id, access.user.id, "/lab")
    commit_audited(db, access, request, "session.open", session=row.id, editor=row.editor)
    return redirect


# ---- the terminal --------------------------------------------------------------------------

CLOSE_NOT_AUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_NOT_RUNNING = 4409
CLOSE_RUNNER_FAILED = 1011
MAX_RESIZE_SIDE = 9999  # the runner's limit on rows and cols


class TerminalRefused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason[:120]  # a close reason is at most 123 bytes


def _own_origin(websocket: WebSocket) -> str:
    scheme = "https" if websocket.url.scheme in ("wss", "https") else "http"
    return f"{scheme}://{websocket.headers.get('host', '')}"


def _admit(websocket: WebSocket, ctx: Ctx, owner: str, slug: str, session_id: str) -> str:
    """Authenticate and authorize like the HTTP routes; the runner's workload id, or
    ``TerminalRefused``. Runs in a worker thread (database I/O)."""
    # The same code path as HTTP: a GET request view of the handshake (GET: the cookie needs
    # no CSRF token; the Origin check below stands in for it, since browsers always send
    # Origin on WebSockets and the WebSocket API cannot add an X-CSRF-Token header).
    handshake = Request({**websocket.scope, "type": "http", "method": "GET"})
    target = f"project:{owner[:64]}/{slug[:64]}"
    user = None
    with ctx.sessions() as db:
        try:
            caller = resolve_caller(handshake, ctx, db)
            if caller is None:
                raise NotAuthenticated("sign in, or send an API key")
            user = caller.user
            if caller.via == "cookie" and websocket.headers.get("origin") != _own_origin(websocket):
                raise Forbidden("a terminal opened with a session cookie needs our own Origin")
            project = get_project(db, owner, slug)
            authorize(db, user, project, USE_SESSION)
            row = domain.get_session(db, project, session_id)
        except NotAuthenticated as exc:
            raise TerminalRefused(CLOSE_NOT_AUTHENTICATED, exc.detail) from None
        except Forbidden as exc:
            _audit_terminal(ctx, websocket, user, target, session_id, "denied")
            raise TerminalRefused(CLOSE_FORBIDDEN, exc.detail) from None
        except NotFound as exc:
            raise TerminalRefused(CLOSE_NOT_FOUND, exc.detail) from None
        if row.state != "running":
            raise TerminalRefused(CLOSE_NOT_RUNNING, f"the session is {row.state}, not running")
        _audit_terminal(ctx, websocket, user, target, session_id, "success")
        return domain.runner_id(row)


def _audit_terminal(
    ctx: Ctx, websocket: WebSocket, user: User | None, target: str, session_id: str, outcome: str
) -> None:
    """A shell inside a session is worth a line in the audit log, opened or refused."""
    audit.record_now(
        ctx.sessions,
        "session.terminal",
        actor=user,
        target=target,
        address=websocket.client.host if websocket.client else "",
        outcome=outcome,
        session=session_id[:40],
    )


def _control(text: str) -> pb.ExecInput | None:
    """A resize control frame as an Exec input, or None when ``text`` is terminal input."""
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "resize":
        return None
    cols, rows = message.get("cols"), message.get("rows")
    if not all(isinstance(v, int) and 0 < v <= MAX_RESIZE_SIDE for v in (cols, rows)):
        return pb.ExecInput()  # a malformed resize is ignored, never typed into the shell
    return pb.ExecInput(resize=pb.TerminalSize(rows=rows, cols=cols))


@router.websocket(SESSIONS + "/{session_id}/terminal")
async def terminal(
    websocket: WebSocket,
    owner: str,
    project: str,
    session_id: str,
    rows: Annotated[int, Query(ge=1, le=MAX_RESIZE_SIDE)] = 24,
    cols: Annotated[int, Query(ge=1, le=MAX_RESIZE_SIDE)] = 80,
) -> None:
    ctx = websocket.app.state.kiln
    try:
        workload_id = await run_in_threadpool(_admit, websocket, ctx, owner, project, session_id)
    except TerminalRefused as exc:
        await websocket.close(code=exc.code, reason=exc.reason)
        return
    client = _client(websocket, ctx.settings)
    await websocket.accept()
    start = pb.ExecStart(workload_id=workload_id, tty=True, rows=rows, cols=cols)
    await _bridge(websocket, client, pb.ExecInput(start=start), session_id)


async def _bridge(
    websocket: WebSocket, client: RunnerClient, first: pb.ExecInput, session_id: str
) -> None:
    """Browser ⇄ runner until either side ends. gRPC's sync API runs in two threads: one
    blocks on the request queue (inside gRPC), one pumps replies into the event loop."""
    inputs: queue.Queue[pb.ExecInput | None] = queue.Queue()
    inputs.put(first)

    def requests() -> Iterator[pb.ExecInput]:
        while (message := inputs.get()) is not None:
            yield message

    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[pb.ExecOutput | BaseException | None] = asyncio.Queue()

    def deliver(item: pb.ExecOutput | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    try:
        call = await run_in_threadpool(client.exec, requests())
    except KilnError as exc:
        inputs.put(None)
        await websocket.close(code=CLOSE_RUNNER_FAILED, reason=exc.detail[:120])
        return

    def pump() -> None:
        try:
            for message in call:
                deliver(message)
            deliver(None)
        except grpc.RpcError as exc:
            deliver(exc)

    threading.Thread(target=pump, name="terminal-output", daemon=True).start()
    try:
        # The browser leaving or the shell ending ends the other direction too.
        async with anyio.create_task_group() as group:

            async def until_done(direction: Callable[[], Awaitable[None]]) -> None:
                await direction()
                group.cancel_scope.cancel()

            group.start_soon(until_done, lambda: _read_browser(websocket, inputs, session_id))
            group.start_soon(until_done, lambda: _write_browser(websocket, outputs, session_id))
    finally:
        inputs.put(None)
        call.cancel()  # the runner kills the shell; the session lives on


async def _read_browser(
    websocket: WebSocket, inputs: queue.Queue[pb.ExecInput | None], session_id: str
) -> None:
    sessions = websocket.app.state.kiln.sessions
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if domain.activity.due(session_id):  # typing counts against the idle timeout
                await run_in_threadpool(domain.activity.write, sessions, session_id)
            data: Any = message.get("bytes")
            if data is not None:
                inputs.put(pb.ExecInput(stdin=data))
                continue
            text = message.get("text") or ""
            control = _control(text)
            if control is None:
                inputs.put(pb.ExecInput(stdin=text.encode()))
            elif control.WhichOneof("input") is not None:
                inputs.put(control)
    finally:
        inputs.put(None)  # ends the request stream: the runner closes the shell's input


def _session_state(websocket: WebSocket, session_id: str) -> str:
    """The session's recorded state (the shell may have ended because the session is)."""
    with websocket.app.state.kiln.sessions() as db:
        return str(db.scalar(select(Workload.state).where(Workload.id == session_id)) or "")


async def _write_browser(
    websocket: WebSocket,
    outputs: asyncio.Queue[pb.ExecOutput | BaseException | None],
    session_id: str,
) -> None:
    while True:
        item = await outputs.get()
        try:
            if item is None:
                await websocket.close()
                return
            if isinstance(item, BaseException):
                if isinstance(item, grpc.Call) and item.code() == grpc.StatusCode.CANCELLED:
                    return
                error = runner_error(item, "terminal")
                await websocket.close(code=CLOSE_RUNNER_FAILED, reason=error.detail[:120])
                return
            kind = item.WhichOneof("output")
            if kind in ("stdout", "stderr"):
                await websocket.send_bytes(getattr(item, kind))
            elif kind == "exit":
                # A stop records ``stopping`` before it ends the sandbox and its shells: the
                # page can then say the session is ending instead of "the shell exited".
                state = await run_in_threadpool(_session_state, websocket, session_id)
                exit_message = {"type": "exit", "exit_code": item.exit.exit_code}
                await websocket.send_text(json.dumps({**exit_message, "session_state": state}))
                await websocket.close()
                return
        except (WebSocketDisconnect, RuntimeError):
            return  # the browser left while we were writing
