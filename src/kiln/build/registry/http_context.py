"""What every ``/v2/`` handler gets: the registry, settings, database, and the caller."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from kiln.build.registry.http_auth import Principal
from kiln.build.registry.service import Registry
from kiln.build.registry.tokens import signing_key
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
