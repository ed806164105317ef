"""Signing in and out, and the account page (API keys, password).

The login form calls the API's own login (``kiln.api.auth.login``): one code path sets the
session cookie, rotates the session, throttles and audits, for the browser UI and for API
clients alike.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from pydantic import ValidationError

from kiln.api import admin as admin_api
from kiln.api import auth as auth_api
from kiln.api.deps import Ctx, Db, resolve_caller
from kiln.api.errors import problem
from kiln.domain.errors import (
    Forbidden,
    InvalidInput,
    KilnError,
    NotAuthenticated,
    TooManyRequests,
)
from kiln.web.rendering import (
    DEFAULT_NEXT,
    UiCaller,
    UiRoute,
    is_htmx,
    redirect,
    render,
    safe_next,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)


def _signed_in(request: Request, ctx: Ctx, db: Db) -> bool:
    try:
        return resolve_caller(request, ctx, db) is not None
    except KilnError:
        return False


@router.get("/")
def home(request: Request, ctx: Ctx, db: Db) -> Response:
    return redirect(request, DEFAULT_NEXT if _signed_in(request, ctx, db) else "/login")


@router.get("/login")
def login_page(request: Request, ctx: Ctx, db: Db, next: str = "") -> Response:
    if _signed_in(request, ctx, db):
        return redirect(request, safe_next(next))
    return render(request, "login.html", None, next=safe_next(next), username="", error="")


def _refuse_foreign_origin(request: Request) -> None:
    """Login has no session yet, hence no CSRF token; a foreign Origin is still refused so
    another site cannot sign a visitor into an account of its choosing."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
        raise Forbidden("cross-origin login refused")


@router.post("/login")
def login_submit(
    request: Request,
    ctx: Ctx,
    db: Db,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    target = safe_next(next)
    response = redirect(request, target)
    try:
        _refuse_foreign_origin(request)
        body = auth_api.LoginRequest(username=username, password=password)
        auth_api.login(body, request, response, ctx, db)
    except ValidationError:
        error: KilnError = NotAuthenticated("wrong username or password")
    except KilnError as exc:
        error = exc
    else:
        return response
    headers = {}
    if isinstance(error, TooManyRequests):
        headers["Retry-After"] = str(int(error.retry_after) + 1)
    if is_htmx(request):  # shown in the form by kiln.js (not the usual 401 -> login redirect)
        return problem(error.status, error.title, error.detail, headers=headers)
    # Without JavaScript: the form again, with the reason.
    return render(
        request,
        "login.html",
        None,
        status_code=error.status,
        headers=headers,
        next=target,
        username=username[:64],
        error=error.detail,
    )


@router.post("/logout")
def logout(request: Request, caller: UiCaller, db: Db) -> Response:
    response = auth_api.logout(request, caller, db)
    response.headers["HX-Redirect"] = "/login"
    return response


# ---- account ------------------------------------------------------------------------------


@router.get("/account")
def account_page(request: Request, caller: UiCaller, db: Db) -> Response:
    keys = auth_api.list_keys(caller.user, db)
    return render(request, "account.html", caller, keys=keys, new_key=None)


def _expiry(value: str) -> datetime | None:
    """An ``<input type=date>`` value: the key works until the end of that day (UTC)."""
    if not value:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError as exc:
        raise InvalidInput("expiry must be a date like 2030-01-31", "expires_at") from exc
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC)


@router.post("/account/keys")
def create_key(
    request: Request,
    caller: UiCaller,
    db: Db,
    name: Annotated[str, Form(max_length=100)] = "",
    expires_at: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    body = auth_api.ApiKeyCreate(name=name.strip(), expires_at=_expiry(expires_at))
    created = auth_api.create_key(request, caller, db, body)
    keys = auth_api.list_keys(caller.user, db)
    return render(request, "account/_keys.html", caller, keys=keys, new_key=created)


@router.delete("/account/keys/{key_id}")
def revoke_key(request: Request, key_id: int, caller: UiCaller, db: Db) -> Response:
    auth_api.revoke_key(key_id, request, caller.user, db)
    keys = auth_api.list_keys(caller.user, db)
    return render(request, "account/_keys.html", caller, keys=keys, new_key=None)


@router.post("/account/password")
def change_password(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    current: Annotated[str, Form(max_length=1024)],
    new: Annotated[str, Form(max_length=1024)],
    confirm: Annotated[str, Form(max_length=1024)],
) -> Response:
    if new != confirm:
        raise InvalidInput("the new password and its confirmation differ", "confirm")
    # The API checks the current password, throttled and audited like a login.
    change = admin_api.UserUpdate(password=new, current_password=current)
    try:
        admin_api.update_user(caller.user.username, change, request, db, caller.user, ctx)
    except KilnError as exc:  # the API's field names, as this form calls them
        exc.field = {"password": "new", "current_password": "current"}.get(exc.field or "")
        raise
    return render(request, "account/_password_changed.html", caller)
