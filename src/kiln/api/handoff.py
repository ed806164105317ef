"""The hand-off from Kiln's own origin to an origin of the content domain (a session's
editor or web UI, an application): a redirect to ``<label>.<content domain>/_kiln/auth``
with a single-use token naming the user and the sign-in it came from
(``kiln.domain.session_access``), so signing out of Kiln ends that access too."""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.api.deps import SESSION_COOKIE, KilnContext
from kiln.db.models import ApiKey
from kiln.domain import session_access
from kiln.domain.app_access import Unavailable, admit
from kiln.domain.identity import resolve_web_session
from kiln.domain.passwords import hash_token


def caller_grant(request: Request, db: Session) -> str:
    """The sign-in this request was made with: ``key:<id>`` (an API key as Bearer or Basic
    password) or ``web:<id>`` (the browser's login cookie)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "basic"):
        key = value.strip()
        if scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, ValueError):
                key = base64.b64decode(key).decode().partition(":")[2]
        found = db.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_token(key)))
        return f"key:{found}" if found is not None else ""
    token = request.cookies.get(SESSION_COOKIE)
    login = resolve_web_session(db, token) if token else None
    return f"web:{login.id}" if login is not None else ""


def handoff_redirect(
    request: Request, ctx: KilnContext, db: Session, label: str, user_id: int, after: str
) -> RedirectResponse:
    """The hand-off to ``label``'s origin for ``user_id`` (who may use it: checked here and
    again there), landing on the path ``after``."""
    grant = caller_grant(request, db)
    with contextlib.suppress(Unavailable):  # allowed in; its origin says it is not serving
        admit(db, label, user_id, grant=grant)
    token = session_access.handoff_token(ctx.settings.secret, label, user_id, time.time(), grant)
    origin = session_access.session_origin(
        ctx.settings.domain, request.url.scheme, request.url.port, label
    )
    query = urlencode({"token": token, "next": after})
    return RedirectResponse(
        f"{origin}{session_access.AUTH_PATH}?{query}",
        status_code=303,
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
