"""Registry tokens: short-lived, signed statements of what a caller may do to which
repositories, as Docker's token flow hands them out from ``/v2/token``.

A token is a JWT (HS256) whose key is derived from the site secret, so ``/v2/`` verifies it
without the database: signature, audience, expiry, and that it grants the repository and
action of the request. Claims::

    {"iss": "kiln", "aud": "kiln-registry", "sub": "alice", "uid": 7,
     "iat": 1700000000, "nbf": 1700000000, "exp": 1700000300, "jti": "…",
     "access": [{"type": "repository", "name": "alice/churn/app", "actions": ["pull"]}]}

A token cannot be revoked; it lives ``registry.token_seconds`` (5 minutes by default), and
manifest pushes and deletions, which write the database anyway, also check that the user is
still active. Control-plane services (the builder) get tokens from ``service_token``
without any user's API key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kiln.settings import Settings

ISSUER = "kiln"
SERVICE = "kiln-registry"
_HEADER = {"alg": "HS256", "typ": "JWT"}
_ENCODED_HEADER = (
    base64.urlsafe_b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
    .rstrip(b"=")
    .decode()
)
MAX_TOKEN_LENGTH = 16_384


class InvalidToken(Exception):
    """Not a token of this site, tampered with, or expired (the message says which)."""


@dataclass(frozen=True)
class Grant:
    repository: str
    actions: frozenset[str]

    def to_claim(self) -> dict[str, object]:
        return {"type": "repository", "name": self.repository, "actions": sorted(self.actions)}


@dataclass(frozen=True)
class TokenClaims:
    subject: str
    user_id: int | None  # None for a service (the builder)
    grants: tuple[Grant, ...]
    issued_at: int
    expires_at: int

    def allows(self, repository: str, action: str) -> bool:
        return any(g.repository == repository and action in g.actions for g in self.grants)


def signing_key(secret: bytes) -> bytes:
    """A key for registry tokens only, derived from the site secret (so a token can never
    be mistaken for anything else the secret signs)."""
    return hmac.new(secret, b"kiln registry token signing key v1", hashlib.sha256).digest()


def issue(
    key: bytes,
    *,
    subject: str,
    user_id: int | None,
    grants: Iterable[Grant],
    lifetime: int,
    now: float | None = None,
) -> tuple[str, TokenClaims]:
    issued = int(now if now is not None else time.time())
    claims = TokenClaims(subject, user_id, tuple(grants), issued, issued + lifetime)
    payload = {
        "iss": ISSUER,
        "aud": SERVICE,
        "sub": subject,
        "uid": user_id,
        "iat": issued,
        "nbf": issued,
        "exp": claims.expires_at,
        "jti": secrets.token_urlsafe(12),
        "access": [g.to_claim() for g in claims.grants],
    }
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    signed = f"{_ENCODED_HEADER}.{body}"
    return f"{signed}.{_b64(_sign(key, signed))}", claims


def verify(key: bytes, token: str, now: float | None = None) -> TokenClaims:
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise InvalidToken("not a registry token")
    header, body, signature = token.split(".")
    if header != _ENCODED_HEADER:
        raise InvalidToken("not a registry token (unexpected header)")
    try:
        given = _unb64(signature)
        payload = json.loads(_unb64(body))
    except (binascii.Error, ValueError):
        raise InvalidToken("not a registry token (malformed)") from None
    if not hmac.compare_digest(given, _sign(key, f"{header}.{body}")):
        raise InvalidToken("the token's signature is not this site's")
    if not isinstance(payload, dict) or payload.get("iss") != ISSUER:
        raise InvalidToken("the token was not issued by this registry")
    if payload.get("aud") != SERVICE:
        raise InvalidToken("the token is for another service")
    current = now if now is not None else time.time()
    expires, issued = payload.get("exp"), payload.get("nbf")
    if not isinstance(expires, int) or not isinstance(issued, int):
        raise InvalidToken("the token has no validity period")
    if current >= expires:
        raise InvalidToken("the token has expired; log in again or request a new one")
    if current + 60 < issued:  # a minute of clock skew between web workers
        raise InvalidToken("the token is not valid yet")
    return TokenClaims(
        subject=str(payload.get("sub", "")),
        user_id=payload.get("uid") if isinstance(payload.get("uid"), int) else None,
        grants=tuple(_grants(payload.get("access"))),
        issued_at=int(payload.get("iat", issued)),
        expires_at=expires,
    )


def service_token(
    settings: Settings, subject: str, grants: Iterable[Grant], lifetime: int | None = None
) -> str:
    """A token for a control-plane service on this host (the builder pushing the images it
    builds: ``Grant("alice/churn/app", frozenset({"pull", "push"}))``). No user is
    involved; the subject (``"kiln-builder"``) shows in the registry's logs."""
    token, _ = issue(
        signing_key(settings.secret),
        subject=subject,
        user_id=None,
        grants=grants,
        lifetime=lifetime or settings.registry.token_seconds,
    )
    return token


def _grants(access: object) -> Iterable[Grant]:
    if not isinstance(access, list):
        return
    for entry in access:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("actions"), list)
        ):
            actions = frozenset(a for a in entry["actions"] if isinstance(a, str))
            yield Grant(entry["name"], actions)


def _sign(key: bytes, data: str) -> bytes:
    return hmac.new(key, data.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
