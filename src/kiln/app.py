"""The web tier's ASGI application: REST API, UI, git smart HTTP, the OCI registry, static
assets."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from sqlalchemy import Engine
from starlette.types import Receive, Scope, Send

from kiln import __version__, gitserver, web
from kiln.api import (
    admin,
    applications,
    auth,
    builds,
    docs,
    files,
    jobs,
    model_builds,
    model_deploys,
    model_metrics,
    model_replicas,
    models,
    project_storage,
    projects,
    resources,
    sessions,
    site_settings,
    workers,
)
from kiln.api.deps import KilnContext
from kiln.api.errors import install_error_handlers
from kiln.api.headers import SecurityHeaders
from kiln.api.limits import RequestLimits
from kiln.apps.proxy import ContentProxy
from kiln.apps.upstream import UpstreamPool
from kiln.build.registry import http as registry_http
from kiln.build.registry.http_context import RegistryHttp
from kiln.build.registry.service import Registry
from kiln.db.engine import make_engine, make_sessionmaker
from kiln.db.migrate import check_migrated
from kiln.domain.identity import LoginThrottle
from kiln.serving.router import ModelRouter
from kiln.settings import Settings
from kiln.storage.store import project_store

log = logging.getLogger("kiln.web")

API_PREFIX = "/api/v1"


class KilnApp(FastAPI):
    """Kiln's ASGI application. Requests for the content domain's hosts (sessions' and
    applications' own origins) go straight to the content proxy, ahead of the middleware
    stack meant for Kiln's own routes: each layer would cost every proxied request."""

    content_proxy: ContentProxy | None = None
    model_router: ModelRouter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = self.model_router
        if router is not None and scope["type"] in ("http", "websocket"):
            path = router.target(scope)  # before the content proxy: modelservice.<domain>
            if path is not None:
                await router.serve(path, scope, receive, send)
                return
        proxy = self.content_proxy
        if proxy is not None and scope["type"] in ("http", "websocket"):
            target = proxy.target(scope)
            if target is not None:
                await proxy.serve(target, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    router = getattr(app, "model_router", None)
    if router is not None:
        router.stats.close()  # the model calls counted since the last flush


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)
    router.include_router(auth.router)
    router.include_router(projects.router)
    router.include_router(files.router)
    router.include_router(project_storage.router)
    router.include_router(admin.router)
    router.include_router(resources.router)
    router.include_router(sessions.router)
    router.include_router(workers.router)
    router.include_router(jobs.router)
    router.include_router(builds.router)
    router.include_router(applications.router)
    router.include_router(site_settings.router)
    router.include_router(models.router)
    router.include_router(model_builds.router)
    router.include_router(model_deploys.router)
    router.include_router(model_metrics.router)
    router.include_router(model_replicas.router)
    return router


@functools.cache
def _routes() -> APIRouter:
    """Every route of the app, built once per process. FastAPI's ``include_router`` analyses
    each endpoint's dependencies again for every app (0.4 s of the 0.5 s a ``create_app``
    took); the routes hold no per-app state (handlers reach it through ``request.app``), so
    each app shares these. Nothing uses ``dependency_overrides``, which shared routes would
    not see."""
    routes = APIRouter()
    routes.include_router(api_router())
    routes.include_router(docs.router)
    routes.include_router(gitserver.router)  # /git/{owner}/{project}.git smart HTTP
    routes.include_router(registry_http.router)  # /v2/: the OCI distribution API
    web.include_pages(routes)  # the UI's pages
    return routes


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app. Refuses an unmigrated database, naming the command that fixes it."""
    engine = engine or make_engine(settings.db_url)
    check_migrated(engine)
    app = KilnApp(
        title="Kiln",
        version=__version__,
        openapi_url=docs.OPENAPI_PATH,
        docs_url=None,  # Kiln serves its own, without CDNs: kiln.api.docs
        redoc_url=None,
        lifespan=_lifespan,
    )
    app.state.kiln = KilnContext(
        settings=settings,
        sessions=make_sessionmaker(engine),
        store=project_store(settings),
        throttle=LoginThrottle(
            make_sessionmaker(engine), free=settings.web.login_failures_before_delay
        ),
    )
    install_error_handlers(app)
    app.state.registry_http = RegistryHttp(
        Registry.for_settings(settings), settings, app.state.kiln.sessions
    )
    app.router.routes.extend(_routes().routes)
    web.mount_static(app)
    _install_middleware(app, settings)
    # Requests for <label>.<content domain> (sessions, applications) never reach the routes.
    app.content_proxy = ContentProxy(app.state.kiln, settings.domain)
    # Model calls (modelservice.<content domain>, /modelservice/ here): kiln.serving.router.
    app.model_router = ModelRouter(app.state.kiln, settings.domain, UpstreamPool())
    return app


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(RequestLimits, max_body=settings.web.max_request_bytes)
    app.add_middleware(SecurityHeaders, hsts=settings.web.tls)


def app_from_environment() -> FastAPI:
    """The factory each web worker process calls when ``KILN_WEB_WORKERS`` > 1: settings come
    from the same ``KILN_*`` environment `kiln up` was started with."""
    return create_app(Settings())
