"""Authentication on ``/v2/``: Docker's token flow, and API keys for simple clients.

Every request needs one of
- ``Authorization: Bearer <registry token>`` from ``/v2/token`` (what podman, skopeo, crane,
  oras and Docker use after the 401 challenge): checked without the database;
- ``Authorization: Bearer <Kiln API key>`` or ``Basic <username>:<API key>`` (curl): the
  user's roles are looked up for the repository of the request.

Without either, or without the scope the request needs, the answer is 401 with the
challenge ``Bearer realm="https://HOST/v2/token",service="kiln-registry",scope="…"``; the
answer is the same whether the repository does not exist or the caller may not see it.
Cookies are never accepted here (a browser would send them to any page's requests).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from kiln.build.registry.access import Scope, allowed_actions, grants_for, parse_scopes
from kiln.build.registry.errors import Unauthorized
from kiln.build.registry.tokens import SERVICE, InvalidToken, TokenClaims, issue, verify
from kiln.db.models import User
from kiln.domain.errors import NotAuthenticated
from kiln.domain.identity import API_KEY_PREFIX, resolve_api_key
from kiln.settings import Settings


@dataclass
class Principal:
    """Who is calling, and what they may do: a verified token's grants, or a user whose
    roles are looked up per repository."""

    subject: str
    user_id: int | None
    claims: TokenClaims | None = None
    user: User | None = None
    _allowed: dict[str, frozenset[str]] = field(default_factory=dict)

    def may(self, db_factory: sessionmaker[Session], repository: str, action: str) -> bool:
        if self.claims is not None:
            return self.claims.allows(repository, action)
        if repository not in self._allowed:
            with db_factory() as db:
                self._allowed[repository] = allowed_actions(db, self.user, repository)
        return action in self._allowed[repository]


def challenge(request: Request, scopes: Sequence[Scope] = (), error: str | None = None) -> str:
    realm = f"{request.url.scheme}://{request.headers.get('host', 'localhost')}/v2/token"
    parts = [f'realm="{realm}"', f'service="{SERVICE}"']
    if scopes:
        parts.append(f'scope="{" ".join(s.header() for s in scopes)}"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def unauthorized(
    request: Request, message: str, scopes: Sequence[Scope] = (), error: str | None = None
) -> Unauthorized:
    return Unauthorized(message, headers={"WWW-Authenticate": challenge(request, scopes, error)})


def principal_from_header(
    request: Request, key: bytes, db_factory: sessionmaker[Session]
) -> Principal | None:
    """The caller named by the Authorization header; None when there is none. Runs in a
    worker thread (an API key is looked up in the database)."""
    header = request.headers.get("authorization", "")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and not value.startswith(API_KEY_PREFIX):
        try:
            claims = verify(key, value)
        except InvalidToken as exc:
            raise unauthorized(request, str(exc), error="invalid_token") from None
        return Principal(claims.subject, claims.user_id, claims=claims)
    user = user_from_credentials(request, db_factory)
    return Principal(user.username, user.id, user=user)


def user_from_credentials(request: Request, db_factory: sessionmaker[Session]) -> User:
    """A Kiln user from ``Basic <username>:<API key>`` or ``Bearer <API key>``."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        username, password = _basic(value)
    elif scheme.lower() == "bearer":
        username, password = "", value
    else:
        raise unauthorized(request, f"unsupported authorization scheme {scheme[:20]!r}")
    if not password.startswith(API_KEY_PREFIX):
        raise unauthorized(
            request,
            "use your Kiln username and an API key as the password "
            "(create a key on your account page or with `kiln keys create`)",
        )
    with db_factory() as db:
        try:
            user = resolve_api_key(db, password)
        except NotAuthenticated as exc:
            raise unauthorized(request, exc.detail) from None
        if username not in ("", user.username):
            raise unauthorized(request, "the API key does not belong to that user")
        db.expunge(user)
        return user


def _basic(value: str) -> tuple[str, str]:
    try:
        raw = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    username, sep, password = raw.partition(":")
    if not sep or "\x00" in raw:
        raise Unauthorized("malformed Basic credentials")
    return username, password


def token_response(
    request: Request, settings: Settings, key: bytes, db_factory: sessionmaker[Session]
) -> dict[str, object]:
    """``GET /v2/token?service=…&scope=…``: a token carrying what the caller's roles allow of
    the scopes asked for (possibly nothing: ``podman login`` asks for none)."""
    if not request.headers.get("authorization"):
        raise Unauthorized(
            "the registry needs credentials: your Kiln username, and an API key as the password",
            headers={"WWW-Authenticate": 'Basic realm="Kiln registry"'},
        )
    user = user_from_credentials(request, db_factory)
    scopes = parse_scopes(request.query_params.getlist("scope"))
    with db_factory() as db:
        grants = grants_for(db, user, scopes)
    token, claims = issue(
        key,
        subject=user.username,
        user_id=user.id,
        grants=grants,
        lifetime=settings.registry.token_seconds,
    )
    return {
        "token": token,
        "access_token": token,
        "expires_in": claims.expires_at - claims.issued_at,
        "issued_at": datetime.fromtimestamp(claims.issued_at, UTC).isoformat(),
    }
