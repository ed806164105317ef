"""Request dependencies: the database session, the caller, CSRF, the project in the path.

Callers authenticate in one of three ways:
- ``Authorization: Bearer <api key>`` (CLI, SDK, curl);
- ``Authorization: Basic`` with username and password (only where a route allows it,
  for creating the first API key) or with an API key as the password (git);
- the browser's session cookie, which must come with the session's CSRF token in the
  ``X-CSRF-Token`` header on every state-changing request, and no foreign ``Origin``.

The Workers API (``/api/v1/workers``) takes none of these but a session's workers token
(``workers_access``), which in turn is refused everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Project, Role, User
from kiln.db.workload_models import Workload
from kiln.domain import audit, workload_tokens
from kiln.domain.authz import ACTION_ROLES, Action, authorize
from kiln.domain.errors import Forbidden, NotAuthenticated, TooManyRequests
from kiln.domain.identity import (
    API_KEY_PREFIX,
    LoginThrottle,
    authenticate_password,
    resolve_api_key,
    resolve_web_session,
)
from kiln.domain.model_keys import PREFIX as MODEL_API_KEY_PREFIX
from kiln.domain.projects import get_project
from kiln.settings import Settings
from kiln.storage.store import ProjectStore

SESSION_COOKIE = "__Host-kiln_session"  # __Host-: Secure, Path=/, no Domain (host-only)
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class KilnContext:
    """What every request needs, built once per process by ``create_app``."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ProjectStore
    throttle: LoginThrottle


# These two are ``async def`` on purpose: a plain ``def`` dependency costs a thread-pool hop
# per request, and they do no I/O worth one (a Session connects lazily, in the route's worker
# thread; closing it hands the connection back to the pool).
async def context(request: Request) -> KilnContext:
    ctx: KilnContext = request.app.state.kiln
    return ctx


Ctx = Annotated[KilnContext, Depends(context)]


async def get_db(ctx: Ctx) -> AsyncIterator[Session]:
    with ctx.sessions() as db:
        yield db


Db = Annotated[Session, Depends(get_db)]


@dataclass
class Caller:
    user: User
    via: Literal["bearer", "basic-key", "basic-password", "cookie"]
    csrf_token: str | None = None


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def _basic_credentials(header: str) -> tuple[str, str]:
    try:
        raw = base64.b64decode(header, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise NotAuthenticated("malformed Basic credentials") from exc
    username, sep, password = raw.partition(":")
    if not sep or "\x00" in raw:
        raise NotAuthenticated("malformed Basic credentials")
    return username, password


def check_password_login(
    ctx: KilnContext, db: Session, request: Request, username: str, password: str
) -> User:
    """Username + password, throttled after repeated failures, audited either way."""
    address = client_address(request)
    keys = (f"user:{username}", f"addr:{address}")
    wait = ctx.throttle.retry_after(*keys)
    if wait > 0:
        audit.record_now(
            ctx.sessions, "auth.login", actor_name=username, address=address, outcome="throttled"
        )
        raise TooManyRequests(
            f"too many failed logins; try again in {int(wait) + 1} seconds", retry_after=wait
        )
    user = authenticate_password(db, username, password)
    if user is None:
        ctx.throttle.failed(*keys)
        audit.record_now(
            ctx.sessions,
            "auth.login",
            actor_name=username,
            address=address,
            outcome="failure",
        )
        raise NotAuthenticated("wrong username or password")
    ctx.throttle.succeeded(*keys)
    return user


def check_origin(request: Request) -> None:
    """Browsers name the page that sent a request in ``Origin``; only our own may."""
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            raise Forbidden(f"cross-origin request from {origin[:100]} refused")


def _check_csrf(request: Request, expected: str) -> None:
    check_origin(request)
    token = request.headers.get(CSRF_HEADER, "")
    if not token or not hmac.compare_digest(token, expected):
        raise Forbidden(f"missing or wrong {CSRF_HEADER} header (CSRF protection)")


def resolve_caller(
    request: Request, ctx: KilnContext, db: Session, allow_password: bool = False
) -> Caller | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            if value.strip().startswith(workload_tokens.PREFIX):
                raise NotAuthenticated("a workers token works only on /api/v1/workers")
            if value.strip().startswith(MODEL_API_KEY_PREFIX):
                raise NotAuthenticated(
                    "a model API key only calls models; the API takes an API key (kiln_...)"
                )
            return Caller(resolve_api_key(db, value.strip()), "bearer")
        if scheme == "basic":
            username, password = _basic_credentials(value.strip())
            if password.startswith(API_KEY_PREFIX):
                user = resolve_api_key(db, password)
                if user.username != username and username not in ("", "x-api-key"):
                    raise NotAuthenticated("the API key does not belong to that user")
                return Caller(user, "basic-key")
            if allow_password:
                user = check_password_login(ctx, db, request, username, password)
                return Caller(user, "basic-password")
            raise NotAuthenticated("use an API key (Bearer, or as the Basic password)")
        raise NotAuthenticated(f"unsupported authorization scheme {scheme[:20]!r}")
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        ws = resolve_web_session(db, token)
        if ws is None:
            return None
        if request.method not in SAFE_METHODS:
            _check_csrf(request, ws.csrf_token)
        return Caller(ws.user, "cookie", ws.csrf_token)
    return None


def optional_caller(request: Request, ctx: Ctx, db: Db) -> Caller | None:
    return resolve_caller(request, ctx, db)


def current_caller(request: Request, ctx: Ctx, db: Db) -> Caller:
    caller = resolve_caller(request, ctx, db)
    if caller is None:
        raise NotAuthenticated("sign in, or send an API key as 'Authorization: Bearer <key>'")
    return caller


async def current_user(caller: Annotated[Caller, Depends(current_caller)]) -> User:
    return caller.user


CurrentCaller = Annotated[Caller, Depends(current_caller)]
CurrentUser = Annotated[User, Depends(current_user)]


@dataclass
class ProjectAccess:
    project: Project
    role: Role
    user: User


def project_access(action: Action) -> object:
    """A dependency that loads /{owner}/{project} and checks ``action`` on it."""

    # The caller is resolved here rather than through a CurrentUser dependency: one
    # thread-pool hop for authentication, the project and its role instead of two.
    def dependency(owner: str, project: str, request: Request, ctx: Ctx, db: Db) -> ProjectAccess:
        user = current_caller(request, ctx, db).user
        row = get_project(db, owner, project)
        try:
            role = authorize(db, user, row, action)
        except Forbidden:
            # Someone who can see the project tried more than their role allows: worth a
            # line in the audit log (callers who cannot see it get a 404 and no line).
            audit.record_now(
                ctx.sessions,
                "access.denied",
                actor=user,
                target=f"project:{row.owner_name}/{row.slug}",
                address=client_address(request),
                outcome="denied",
                needs=ACTION_ROLES[action].name,
                method=request.method,
                path=request.url.path[:300],
            )
            raise
        return ProjectAccess(row, role, user)

    return Depends(dependency)


ViewProject = Annotated[ProjectAccess, project_access(Action.view)]
OperateProject = Annotated[ProjectAccess, project_access(Action.operate)]
WriteProject = Annotated[ProjectAccess, project_access(Action.write)]
AdminProject = Annotated[ProjectAccess, project_access(Action.admin)]


@dataclass
class WorkersAccess:
    """A session calling the Workers API with its token: its project, as its user."""

    session: Workload
    access: ProjectAccess


def workers_access(request: Request, db: Db) -> WorkersAccess:
    """The session whose live workers token is the Bearer credential; the session's user
    must still be allowed to run workloads in the project (their role today, not the day
    the session started)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(workload_tokens.PREFIX):
        raise NotAuthenticated(
            "the Workers API takes a session's workers token: "
            "'Authorization: Bearer $KILN_WORKERS_TOKEN'"
        )
    session = workload_tokens.resolve(db, token, workload_tokens.WORKERS)
    user = db.get(User, session.user_id) if session.user_id is not None else None
    project = db.get(Project, session.project_id)
    if user is None or not user.is_active or project is None:
        raise NotAuthenticated("the workers token's session has no active owner any more")
    role = authorize(db, user, project, Action.write)
    return WorkersAccess(session, ProjectAccess(project, role, user))


WorkersCaller = Annotated[WorkersAccess, Depends(workers_access)]
