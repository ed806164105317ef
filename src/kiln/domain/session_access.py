"""Who may use a session's own origin, and the hand-off that carries a user there.

User content is served on ``<session id>.<content domain>``, never on the UI's origin, so the
UI's host-only ``__Host-`` login cookie is never sent there. A signed-in user crosses over in
two steps:

1. On the UI's origin, ``handoff_token`` (after ``admit``) signs a short-lived token naming the
   session and the user; the UI redirects to ``https://<id>.<content domain>/_kiln/auth?token=``.
2. On the session's origin, ``redeem_handoff`` checks the signature, the expiry, that the
   token is for *this* session, and that it was never used (its nonce goes into
   ``session_handoffs``; a second insert fails, whichever web worker sees it). The answer sets
   ``access_cookie``: host-only to that one session's origin, signed, naming session and user.

Every request on the session's origin then carries that cookie; ``read_access_cookie`` checks
it and ``admit`` decides, on every look, whether the user may still use the session (the one
rule is ``authz.USE_SESSION``) and whether it runs. Tokens and cookies are signed with keys
derived from the site secret for each purpose, so one can never stand in for the other.

Both also name the sign-in they came from (``grant``: ``web:<id>`` for a browser's login,
``key:<id>`` for an API key), and ``grant_alive`` checks it on every look: signing out of
Kiln (or revoking the key) ends the access on every content origin within seconds.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.db.models import ApiKey, Project, User, WebSession
from kiln.db.workload_models import SessionHandoff, Workload
from kiln.domain.authz import USE_SESSION, authorize
from kiln.domain.errors import Conflict, Forbidden, NotFound
from kiln.pki.ca import content_domain

HANDOFF_SECONDS = 60
ACCESS_COOKIE = "__Host-kiln_session_access"  # __Host-: Secure, Path=/, host-only
AUTH_PATH = "/_kiln/auth"  # the one path of a session's origin that Kiln answers itself
_HANDOFF = "handoff"
_COOKIE = "cookie"


class AccessRefused(Forbidden):
    """A missing, forged, expired, reused or misdirected token or cookie."""


@dataclass(frozen=True)
class Claims:
    workload_id: str
    user_id: int
    expires: float  # Unix time
    nonce: str
    grant: str = ""  # the sign-in it came from: web:<id>, key:<id> ("" in older cookies)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: bytes, purpose: str) -> bytes:
    return hmac.new(secret, f"kiln session access: {purpose}".encode(), hashlib.sha256).digest()


def _sign(secret: bytes, purpose: str, claims: dict[str, Any]) -> str:
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(_key(secret, purpose), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def _verify(secret: bytes, purpose: str, token: str, workload_id: str, now: float) -> Claims:
    """The claims of a well-signed, unexpired ``token`` for ``workload_id``; else refused."""
    body, dot, mac = token.partition(".")
    if not dot or len(token) > 1000:
        raise AccessRefused("the access token is malformed")
    try:
        given = _unb64(mac)
        expected = hmac.new(_key(secret, purpose), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise AccessRefused("the access token's signature is not Kiln's")
        data = json.loads(_unb64(body))
        claims = Claims(
            str(data["w"]),
            int(data["u"]),
            float(data["exp"]),
            str(data["n"]),
            str(data.get("g", "")),
        )
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AccessRefused("the access token is malformed") from exc
    if claims.expires <= now:
        raise AccessRefused("the access token has expired; open the session from Kiln again")
    if claims.workload_id != workload_id:
        raise AccessRefused("the access token is for another session")
    return claims


def handoff_token(
    secret: bytes, workload_id: str, user_id: int, now: float, grant: str = ""
) -> str:
    """A token that opens ``workload_id`` for ``user_id`` once, within ``HANDOFF_SECONDS``."""
    claims = {"w": workload_id, "u": user_id, "exp": now + HANDOFF_SECONDS, "g": grant}
    return _sign(secret, _HANDOFF, {**claims, "n": secrets.token_urlsafe(18)})


def redeem_handoff(db: Session, secret: bytes, token: str, workload_id: str, now: float) -> int:
    """The user id of a valid hand-off token for ``workload_id``, spending it (commits)."""
    return redeem_handoff_claims(db, secret, token, workload_id, now).user_id


def redeem_handoff_claims(
    db: Session, secret: bytes, token: str, workload_id: str, now: float
) -> Claims:
    """The claims of a valid hand-off token for ``workload_id``, spending it (commits)."""
    claims = _verify(secret, _HANDOFF, token, workload_id, now)
    expires = dt.datetime.fromtimestamp(claims.expires, dt.UTC)
    # Tokens past their expiry are refused by their signature alone: their nonces can go.
    db.execute(
        delete(SessionHandoff).where(
            SessionHandoff.expires_at < dt.datetime.fromtimestamp(now, dt.UTC)
        )
    )
    try:
        db.execute(insert(SessionHandoff).values(nonce=claims.nonce[:64], expires_at=expires))
        db.commit()
    except IntegrityError:
        db.rollback()
        raise AccessRefused(
            "this link to the session was already used; open the session from Kiln again"
        ) from None
    return claims


def access_cookie(
    secret: bytes, workload_id: str, user_id: int, now: float, lifetime: float, grant: str = ""
) -> str:
    claims = {"w": workload_id, "u": user_id, "exp": now + lifetime, "g": grant}
    return _sign(secret, _COOKIE, {**claims, "n": ""})


def read_access_cookie(secret: bytes, value: str | None, workload_id: str, now: float) -> int:
    """The user id an access cookie for ``workload_id`` names; refused when absent or bad."""
    return read_access_claims(secret, value, workload_id, now).user_id


def read_access_claims(secret: bytes, value: str | None, workload_id: str, now: float) -> Claims:
    if not value:
        raise AccessRefused("open this session from Kiln: this browser has no access to it yet")
    return _verify(secret, _COOKIE, value, workload_id, now)


def grant_alive(db: Session, grant: str, user_id: int) -> bool:
    """Is the sign-in an access came from still there: the browser's login not ended, the
    API key neither revoked nor expired, both still the same user's?"""
    kind, _, number = grant.partition(":")
    if not number.isdigit() or len(number) > 18:
        return grant == ""  # cookies from before sign-ins were named stay good until expiry
    now = dt.datetime.now(dt.UTC)
    if kind == "web":
        login = db.get(WebSession, int(number))
        return login is not None and login.user_id == user_id and login.expires_at > now
    if kind == "key":
        key = db.get(ApiKey, int(number))
        return (
            key is not None
            and key.user_id == user_id
            and key.revoked_at is None
            and (key.expires_at is None or key.expires_at > now)
        )
    return False


@dataclass(frozen=True)
class Admission:
    workload: Workload
    project: Project
    user: User


def admit(db: Session, workload_id: str, user: User | int) -> Admission:
    """May ``user`` use session ``workload_id`` now? The session must exist, the user must
    hold ``USE_SESSION`` on its project (callers who cannot even see the project are told it
    does not exist), and it must be running. Raises NotFound, Forbidden or Conflict."""
    if isinstance(user, int):
        found = db.get(User, user)
        if found is None or not found.is_active:
            raise AccessRefused("the account this access was granted to is gone or disabled")
        user = found
    row = db.get(Workload, workload_id[:32]) if workload_id.isascii() else None
    project = db.get(Project, row.project_id) if row is not None else None
    if row is None or row.kind != "session" or project is None:
        raise NotFound(f"no session {workload_id[:40]!r}")
    try:
        authorize(db, user, project, USE_SESSION)
    except NotFound:
        raise NotFound(f"no session {workload_id[:40]!r}") from None
    if row.state != "running":
        raise Conflict(f"session {row.id} is {row.state}, not running")
    if not row.endpoint:
        raise Conflict(
            f"session {row.id} has no editor served over the web: its editor is the {row.editor}"
        )
    return Admission(row, project, user)


def session_origin(domain: str, scheme: str, port: int | None, workload_id: str) -> str:
    """``scheme://<id>.<content domain>[:port]``: the session's own origin, on the port the
    UI was reached on (one listener serves both)."""
    default = {"https": 443, "http": 80}.get(scheme)
    suffix = f":{port}" if port and port != default else ""
    return f"{scheme}://{workload_id}.{content_domain(domain)}{suffix}"
