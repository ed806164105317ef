"""Applications pages: the site-wide list of the applications a user can open (what CML's
business users see), a project's applications with their state, link, logs and resources,
the create/edit form, one application's page with its live log, and ``/open/<label>``, where
a browser without access to an origin of the content domain signs in and is handed over.

As elsewhere in the UI, each action calls the API's handler (``kiln.api.applications``), so
the rules, runner calls, audit records and commits are the API's own; this module parses
forms and renders.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from kiln.api import applications as api
from kiln.api.deps import Ctx, Db, client_address
from kiln.domain import audit
from kiln.domain.app_access import Kind, kind_of
from kiln.domain.errors import NotFound
from kiln.web.rendering import UiCaller, UiRoute, safe_next

router = APIRouter(route_class=UiRoute, include_in_schema=False)

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@router.get("/open/{label}")
def open_origin(
    request: Request,
    label: str,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    next_path: Annotated[str, Query(alias="next", max_length=2000)] = "/",
) -> Response:
    """Sign the browser in on ``<label>.<content domain>`` (an application, or a session's
    editor or web UI), then land on ``next`` there. Where the proxy sends a browser without
    access; 404 for those who may not see it."""
    if not _LABEL.fullmatch(label):
        raise NotFound("there is no application at this address")
    after = safe_next(next_path) if next_path != "/" else "/"
    redirect = api.handoff_redirect(request, ctx, db, label, caller.user.id, after)
    kind = kind_of(label)[0]
    action = "application.open" if kind is Kind.APPLICATION else "session.open"
    audit.record(
        db,
        action,
        actor=caller.user,
        target=f"origin:{label}",
        address=client_address(request),
    )
    db.commit()
    return redirect
