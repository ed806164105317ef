"""The web tier's ASGI application: REST API, UI, git smart HTTP, static assets."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from sqlalchemy import Engine

from kiln import __version__, gitserver, web
from kiln.api import admin, auth, files, projects
from kiln.api.deps import KilnContext
from kiln.api.errors import install_error_handlers
from kiln.api.limits import RequestLimits
from kiln.db.engine import make_engine, make_sessionmaker
from kiln.db.migrate import check_migrated
from kiln.domain.identity import LoginThrottle
from kiln.settings import Settings
from kiln.storage.store import ProjectStore

log = logging.getLogger("kiln.web")

API_PREFIX = "/api/v1"


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    router.include_router(auth.router)
    router.include_router(projects.router)
    router.include_router(files.router)
    router.include_router(admin.router)
    return router


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. Refuses an unmigrated database, naming the command that fixes it."""
    engine = engine or make_engine(settings.db_url)
    check_migrated(engine)
    app = FastAPI(
        title="Kiln",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.state.kiln = KilnContext(
        settings=settings,
        sessions=make_sessionmaker(engine),
        store=ProjectStore(settings.projects_dir),
        throttle=LoginThrottle(free=settings.web.login_failures_before_delay),
    )
    install_error_handlers(app)
    app.include_router(api_router())
    app.include_router(gitserver.router)  # /git/{owner}/{project}.git smart HTTP
    web.install(app)  # UI pages and /static
    _install_middleware(app, settings)
    return app


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(RequestLimits, max_body=settings.web.max_request_bytes)

    @app.middleware("http")
    async def _security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if settings.web.tls:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response
