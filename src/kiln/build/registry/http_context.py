"""What every ``/v2/`` handler gets: the registry, settings, database, and the caller."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from kiln.build.registry.errors import Unauthorized
from kiln.build.registry.http_auth import Principal
from kiln.build.registry.service import Registry
from kiln.build.registry.tokens import signing_key
from kiln.db.models import User
from kiln.settings import Settings


@dataclass
class RegistryHttp:
    """What ``/v2/`` needs, built once by ``create_app``."""

    registry: Registry
    settings: Settings
    sessions: sessionmaker[Session]

    def __post_init__(self) -> None:
        self.key = signing_key(self.settings.secret)


@dataclass
class Call:
    """One request to a repository route, authenticated."""

    request: Request
    http: RegistryHttp
    principal: Principal
    name: str
    params: dict[str, str]

    def run(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """``fn(db, *args)`` in a worker thread with a fresh database session."""

        def call() -> Any:
            with self.http.sessions() as db:
                return fn(db, *args)

        return run_in_threadpool(call)

    def may(self, repository: str, action: str) -> Awaitable[bool]:
        return run_in_threadpool(self.principal.may, self.http.sessions, repository, action)


Handler = Callable[[Call], Awaitable[Response]]


async def check_active(call: Call) -> None:
    """Tokens cannot be revoked: what changes what others pull (manifests, deletions) at
    least stops with the account. Blob uploads need no check; nothing names them yet."""
    if call.principal.user_id is not None:
        await run_in_threadpool(_check_active, call.http.sessions, call.principal)


def _check_active(sessions: sessionmaker[Session], principal: Principal) -> None:
    with sessions() as db:
        user = db.get(User, principal.user_id)
        if user is None or not user.is_active:
            raise Unauthorized(f"the account {principal.subject} is disabled")
