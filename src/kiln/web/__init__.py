"""The browser UI: server-rendered Jinja2 pages enhanced with htmx.

``include_pages(routes)`` adds the UI routes; ``mount_static(app)`` serves ``static/`` (Kiln's
own CSS and JS, plus the front-end libraries that ``make assets`` copies from npm into
``static/vendor``).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from kiln.web import (
    account_pages,
    admin_pages,
    admin_resource_pages,
    app_pages,
    build_pages,
    file_pages,
    job_pages,
    model_pages,
    project_overview,
    project_pages,
    session_pages,
)
from kiln.web.rendering import STATIC_DIR


def include_pages(routes: APIRouter) -> None:
    """The UI's pages, in order (the project fallback last)."""
    for router in (
        account_pages.router,
        project_pages.router,
        project_overview.router,
        file_pages.router,
        session_pages.router,
        job_pages.router,
        build_pages.router,
        app_pages.router,
        model_pages.router,
        admin_pages.router,
        admin_resource_pages.router,
        project_pages.fallback_router,  # last: it answers every other /p/... address
    ):
        routes.include_router(router)


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
