"""Logins, logouts and API keys."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, Field

from kiln.api.deps import (
    SESSION_COOKIE,
    Caller,
    Ctx,
    CurrentCaller,
    CurrentUser,
    Db,
    check_origin,
    check_password_login,
    client_address,
    resolve_caller,
)
from kiln.api.schemas import InputModel, UserPublic
from kiln.db.models import ApiKey
from kiln.domain import audit
from kiln.domain.errors import InvalidInput, NotAuthenticated
from kiln.domain.identity import (
    create_api_key,
    end_web_session,
    list_api_keys,
    revoke_api_key,
    start_web_session,
)
from kiln.domain.pagination import MAX_ROW_ID

router = APIRouter(prefix="/auth", tags=["auth"])


class LoginRequest(InputModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class LoginResponse(BaseModel):
    user: UserPublic
    csrf_token: str


def set_session_cookie(response: Response, token: str, expires: datetime) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        expires=expires,
        path="/",
        secure=True,
        httponly=True,
        samesite="lax",
    )


@router.post("/login", response_model=LoginResponse)
def login(body: LoginRequest, request: Request, response: Response, ctx: Ctx, db: Db) -> object:
    """Browser login: sets the session cookie and returns the CSRF token to send back."""
    check_origin(request)  # login CSRF: no other site may sign the browser in
    user = check_password_login(ctx, db, request, body.username, body.password)
    new = start_web_session(
        db,
        user,
        timedelta(hours=ctx.settings.web.session_hours),
        old_token=request.cookies.get(SESSION_COOKIE),
    )
    audit.record(db, "auth.login", actor=user, address=client_address(request))
    db.commit()
    set_session_cookie(response, new.token, new.expires_at)
    return LoginResponse(user=UserPublic.model_validate(user), csrf_token=new.csrf_token)


@router.post("/logout", status_code=204)
def logout(request: Request, caller: CurrentCaller, db: Db) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        end_web_session(db, token)
    audit.record(db, "auth.logout", actor=caller.user, address=client_address(request))
    db.commit()
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True)
    return response


@router.get("/me", response_model=UserPublic)
async def me(user: CurrentUser) -> object:
    return user


class ApiKeyCreate(InputModel):
    name: str = Field("", max_length=100)
    expires_at: datetime | None = Field(None, description="Optional expiry (ISO 8601, with zone)")


class ApiKeyPublic(BaseModel):
    model_config = {"from_attributes": True}

    id: int
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The key itself. Shown once; Kiln keeps only its hash.")


def password_or_any_caller(request: Request, ctx: Ctx, db: Db) -> Caller:
    """Creating a key is the one place a password is accepted over HTTP Basic."""
    caller = resolve_caller(request, ctx, db, allow_password=True)
    if caller is None:
        raise NotAuthenticated("send your username and password with HTTP Basic, or sign in")
    return caller


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated)
def create_key(
    request: Request,
    caller: Annotated[Caller, Depends(password_or_any_caller)],
    db: Db,
    body: ApiKeyCreate | None = None,
) -> object:
    body = body or ApiKeyCreate()
    expires = body.expires_at
    if expires is not None and expires.tzinfo is None:
        raise InvalidInput("expires_at needs a time zone, for example 2030-01-01T00:00:00Z")
    row, key = create_api_key(db, caller.user, body.name, expires)
    audit.record(
        db,
        "apikey.create",
        actor=caller.user,
        target=f"apikey:{row.id}",
        address=client_address(request),
        name=body.name,
    )
    db.commit()
    return ApiKeyCreated(**ApiKeyPublic.model_validate(row).model_dump(), key=key)


@router.get("/api-keys", response_model=list[ApiKeyPublic])
def list_keys(user: CurrentUser, db: Db) -> list[ApiKey]:
    return list_api_keys(db, user)


@router.delete("/api-keys/{key_id}", status_code=204)
def revoke_key(
    key_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], request: Request, user: CurrentUser, db: Db
) -> Response:
    revoke_api_key(db, user, key_id)
    audit.record(
        db, "apikey.revoke", actor=user, target=f"apikey:{key_id}", address=client_address(request)
    )
    db.commit()
    return Response(status_code=204)
