"""``https://HOST/git/{owner}/{project}.git/…``: git smart HTTP for project repositories.

parse the URL → authenticate (HTTP Basic with an API key as the password, or Bearer) →
authorize (view to clone/fetch, write to push) → run ``git http-backend`` on that one project.

Errors go to git clients (User-Agent ``git/…``) as ``text/plain``, the only kind of body git
shows its user (as ``remote: …`` lines); everyone else gets ``application/problem+json``.
Without credentials the answer is always 401 with a Basic challenge, which is what makes git
ask for a username and password; a signed-in stranger to a private project gets 404.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from kiln.api.deps import KilnContext, client_address, resolve_caller
from kiln.api.errors import problem
from kiln.db.models import Project, User
from kiln.domain import audit
from kiln.domain.authz import authorize
from kiln.domain.errors import (
    Forbidden,
    KilnError,
    NotAuthenticated,
    NotFound,
    QuotaExceeded,
    TooLarge,
)
from kiln.domain.projects import get_project, touch
from kiln.domain.storage import project_usage
from kiln.gitserver.backend import ExchangeResult, Limit, decoded_body, exchange
from kiln.gitserver.protocol import (
    GitRoute,
    PushCommands,
    UnsupportedMediaType,
    backend_env,
    parse_route,
    push_outcome,
)
from kiln.storage.git import repo_lock, run_git

log = logging.getLogger("kiln.gitserver")

router = APIRouter(include_in_schema=False)

BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Kiln"'}
_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip"})


@dataclass
class GitAccess:
    user: User
    project_id: int
    target: str  # "project:owner/slug", for the audit log
    quota_bytes: int


@router.api_route("/git/{tail:path}", methods=["GET", "POST"])
async def git_smart_http(tail: str, request: Request) -> Response:
    ctx: KilnContext = request.app.state.kiln
    try:
        route = parse_route(request.method, tail, request.query_params.get("service"))
        if not route.advertise:
            _check_request_headers(request, route)
        access = await run_in_threadpool(_authorize, ctx, request, route)
        return await _serve(ctx, request, route, access)
    except KilnError as exc:
        return error_response(exc, git_client=_is_git_client(request))
    except ClientDisconnect:
        # The client went away mid-request; git was stopped (or left to finish cleanly) and
        # the exchange closed. Nobody reads this answer.
        return Response(status_code=400)


def error_response(exc: KilnError, *, git_client: bool) -> Response:
    headers = BASIC_CHALLENGE if exc.status == 401 else None
    if git_client:
        return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status, headers=headers)
    return problem(exc.status, exc.title, exc.detail, headers)


def _is_git_client(request: Request) -> bool:
    agent = request.headers.get("user-agent", "").lower()
    return agent.startswith(("git/", "jgit/"))


def _check_request_headers(request: Request, route: GitRoute) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != route.request_content_type:
        raise UnsupportedMediaType(
            f"{route.service} expects Content-Type {route.request_content_type}"
        )
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not supported")


def _authorize(ctx: KilnContext, request: Request, route: GitRoute) -> GitAccess:
    """Runs in a worker thread (it queries the database)."""
    if not request.headers.get("authorization"):
        # Cookies are deliberately not accepted: git never sends them, and a browser would.
        raise NotAuthenticated(
            "git needs credentials: your Kiln username, and an API key as the password"
        )
    with ctx.sessions() as db:
        caller = resolve_caller(request, ctx, db)
        if caller is None:  # cannot happen with an Authorization header; be explicit
            raise NotAuthenticated("git needs credentials")
        project = get_project(db, route.owner, route.slug)
        target = f"project:{project.owner_name}/{project.slug}"
        try:
            authorize(db, caller.user, project, route.action)
        except Forbidden as exc:
            if not route.is_push:
                raise
            audit.record(
                db,
                "git.push",
                actor=caller.user,
                target=target,
                address=client_address(request),
                outcome="failure",
                reason="forbidden",
            )
            db.commit()
            raise Forbidden(f"push refused: {exc.detail}") from exc
        quota = project.quota_bytes or ctx.settings.storage.project_quota_bytes
        return GitAccess(caller.user, project.id, target, quota)


async def _serve(
    ctx: KilnContext, request: Request, route: GitRoute, access: GitAccess
) -> Response:
    project_dir = ctx.store.project_dir(access.project_id)
    if not (project_dir / ".git").is_dir():
        log.error("project %s has no repository at %s", access.target, project_dir)
        raise NotFound(f"{access.target.removeprefix('project:')} has no git repository")
    settings = ctx.settings
    env = backend_env(
        route,
        username=access.user.username,
        address=client_address(request),
        git_protocol=request.headers.get("git-protocol"),
        max_push_bytes=settings.storage.max_push_bytes,
    )
    on_close = _fetch_audit(ctx, access, client_address(request))
    if route.advertise:
        if route.is_push:  # git shows its user the reason only for this first request
            try:
                await run_in_threadpool(_check_quota, ctx, access)
            except QuotaExceeded as exc:
                refused = ExchangeResult(None, 0, error=exc)
                address = client_address(request)
                await run_in_threadpool(_record_push, ctx, access, address, [], refused, {})
                raise
        return await exchange(
            project_dir, env, None, limit=None, observe=_ignore, on_close=on_close, abortable=True
        )
    body = decoded_body(request.stream(), request.headers.get("content-encoding"))
    if not route.is_push:
        size = settings.web.max_request_bytes  # fetch negotiation: wants and haves
        limit = Limit(size, f"the fetch request is larger than this server's limit of {size} bytes")
        _check_declared_length(request, limit)
        return await exchange(
            project_dir, env, body, limit=limit, observe=_ignore, on_close=on_close, abortable=True
        )
    return await _push(ctx, request, access, project_dir, env, body)


async def _push(
    ctx: KilnContext,
    request: Request,
    access: GitAccess,
    project_dir: Path,
    env: dict[str, str],
    body: AsyncIterator[bytes],
) -> Response:
    """receive-pack, holding the project's repository lock from start to exit, so a push
    and file-API writes (each a commit under the same lock) never interleave."""
    address = client_address(request)
    size = ctx.settings.storage.max_push_bytes
    limit = Limit(
        size,
        f"the push is larger than this server's limit of {size} bytes; remove large files "
        "from its history (or ask an administrator to raise KILN_STORAGE_MAX_PUSH_BYTES)",
    )
    try:
        _check_declared_length(request, limit)
        await run_in_threadpool(_check_quota, ctx, access)
    except (TooLarge, QuotaExceeded) as exc:
        await run_in_threadpool(
            _record_push, ctx, access, address, [], ExchangeResult(None, 0, error=exc), {}
        )
        raise
    lock = AsyncRepoLock(project_dir)
    await lock.acquire()
    commands = PushCommands()

    async def on_close(result: ExchangeResult) -> None:
        try:
            with anyio.CancelScope(shield=True):
                refs = await anyio.to_thread.run_sync(_refs, project_dir)
                await anyio.to_thread.run_sync(
                    _record_push, ctx, access, address, commands.commands, result, refs
                )
        finally:
            lock.release()

    return await exchange(
        project_dir,
        env,
        body,
        limit=limit,
        observe=commands.feed,
        on_close=on_close,
        abortable=False,
    )


def _check_quota(ctx: KilnContext, access: GitAccess) -> None:
    """A project at its quota takes no push (the file API's rule; during the push, git
    writes as the workload uid and the filesystem's limit applies)."""
    with ctx.sessions() as db:
        used = project_usage(db, ctx.store, access.project_id).used_bytes
    if used >= access.quota_bytes:
        raise QuotaExceeded(
            f"Quota exceeded: the project uses {used} of its {access.quota_bytes} bytes; "
            "delete files (or ask an administrator for a larger quota) before pushing"
        )


def _check_declared_length(request: Request, limit: Limit) -> None:
    """Refuse at once what announces itself as too large (git would stream it all first)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit.bytes:
        raise TooLarge(limit.message)


def _refs(project_dir: Path) -> dict[str, str]:
    out = run_git(project_dir, "for-each-ref", "--format=%(objectname) %(refname)").stdout
    pairs = (line.split(" ", 1) for line in out.decode(errors="replace").splitlines())
    return {ref: oid for oid, ref in pairs}


def _record_push(
    ctx: KilnContext,
    access: GitAccess,
    address: str,
    commands: list[tuple[str, str, str]],
    result: ExchangeResult,
    refs_after: dict[str, str],
) -> None:
    if result.error is None and not commands:
        return  # an empty probe request or a push git refused before reading its commands
    details: dict[str, Any] = {"bytes": result.received}
    if result.error is not None:
        outcome = "failure"
        details["reason"] = result.error.detail
        details["refs"] = {ref: "rejected" for _old, _new, ref in commands}
    else:
        outcome, details["refs"] = push_outcome(commands, refs_after)
    with ctx.sessions() as db, db.begin():
        audit.record(
            db,
            "git.push",
            actor=access.user,
            target=access.target,
            address=address,
            outcome=outcome,
            **details,
        )
        project = db.get(Project, access.project_id)
        if outcome != "failure" and project is not None:
            touch(project)  # the project's "updated" follows pushes as it follows edits


def _ignore(_chunk: bytes) -> None:
    return None


def _fetch_audit(
    ctx: KilnContext, access: GitAccess, address: str
) -> Callable[[ExchangeResult], Awaitable[None]]:
    """A clone or fetch that git failed (not one its client gave up on) goes to the audit
    log with git's own message: a broken repository should not fail silently."""

    async def on_close(result: ExchangeResult) -> None:
        failed = result.error is not None or (result.completed and result.returncode != 0)
        if not failed:
            return
        reason = result.error.detail if result.error is not None else result.stderr
        await anyio.to_thread.run_sync(
            partial(
                audit.record_now,
                ctx.sessions,
                "git.fetch",
                actor=access.user,
                target=access.target,
                address=address,
                outcome="failure",
                reason=(reason or f"git exited with {result.returncode}")[:2000],
            )
        )

    return on_close


class AsyncRepoLock:
    """``kiln.storage.git.repo_lock`` held across awaits: taken in a worker thread (it
    blocks), released from anywhere. Release is idempotent."""

    def __init__(self, repo: Path) -> None:
        self._cm: AbstractContextManager[None] = repo_lock(repo)
        self._held = False

    async def acquire(self) -> None:
        # Not abandoned on cancellation: the thread finishes taking the lock, so it is
        # either held (and released by our caller's finally) or was never taken.
        await anyio.to_thread.run_sync(self._cm.__enter__)
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._cm.__exit__(None, None, None)
