"""Users, teams, browser sessions and API keys."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import (
    ApiKey,
    LoginFailure,
    Team,
    TeamMember,
    TeamRole,
    User,
    WebSession,
    utcnow,
)
from kiln.domain.errors import Conflict, InvalidInput, NotAuthenticated, NotFound, about_field
from kiln.domain.names import check_owner_name
from kiln.domain.passwords import hash_password, hash_token, new_token, verify_password

API_KEY_PREFIX = "kiln_"
MIN_PASSWORD_LENGTH = 8


# ---- users and teams ----------------------------------------------------------------------


def _namespace_taken(db: Session, name: str) -> bool:
    """Users and teams share one namespace: both can own projects at /{owner}/..."""
    return (
        db.scalar(select(User.id).where(User.username == name)) is not None
        or db.scalar(select(Team.id).where(Team.name == name)) is not None
    )


def create_user(
    db: Session,
    username: str,
    password: str,
    *,
    full_name: str = "",
    email: str = "",
    site_admin: bool = False,
) -> User:
    with about_field("username"):
        check_owner_name(username, "username")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"password must have at least {MIN_PASSWORD_LENGTH} characters", "password"
        )
    if _namespace_taken(db, username):
        raise Conflict(f"the name {username!r} is already taken", "username")
    user = User(
        username=username,
        password_hash=hash_password(password),
        full_name=full_name,
        email=email,
        is_site_admin=site_admin,
    )
    db.add(user)
    try:
        db.flush()
    except IntegrityError as exc:  # a concurrent create won the race
        raise Conflict(f"the name {username!r} is already taken", "username") from exc
    return user


def get_user(db: Session, username: str) -> User:
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"user {username!r} not found")
    return user


def set_password(user: User, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"password must have at least {MIN_PASSWORD_LENGTH} characters", "password"
        )
    user.password_hash = hash_password(password)


def authenticate_password(db: Session, username: str, password: str) -> User | None:
    user = db.scalar(select(User).where(User.username == username))
    ok = verify_password(user.password_hash if user else None, password)
    if user is None or not ok or not user.is_active:
        return None
    return user


def create_team(db: Session, name: str, creator: User, description: str = "") -> Team:
    with about_field("name"):
        check_owner_name(name, "team name")
    if _namespace_taken(db, name):
        raise Conflict(f"the name {name!r} is already taken", "name")
    team = Team(name=name, description=description)
    team.members.append(TeamMember(user_id=creator.id, role=TeamRole.maintainer))
    db.add(team)
    try:
        db.flush()
    except IntegrityError as exc:  # a concurrent create won the race
        raise Conflict(f"the name {name!r} is already taken", "name") from exc
    return team


def get_team(db: Session, name: str) -> Team:
    team = db.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise NotFound(f"team {name!r} not found")
    return team


def team_role(db: Session, team: Team, user: User) -> TeamRole | None:
    return db.scalar(
        select(TeamMember.role).where(TeamMember.team_id == team.id, TeamMember.user_id == user.id)
    )


# ---- browser sessions ---------------------------------------------------------------------


@dataclass(frozen=True)
class NewSession:
    token: str  # goes in the cookie; only its hash is stored
    csrf_token: str
    expires_at: datetime


def start_web_session(
    db: Session, user: User, lifetime: timedelta, old_token: str | None = None
) -> NewSession:
    """Log in: a fresh token every time (rotation), and the previous one, if any, dies."""
    if old_token:
        end_web_session(db, old_token)
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    expires = utcnow() + lifetime
    db.add(
        WebSession(
            token_hash=hash_token(token), csrf_token=csrf, user_id=user.id, expires_at=expires
        )
    )
    db.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
    return NewSession(token, csrf, expires)


def resolve_web_session(db: Session, token: str) -> WebSession | None:
    ws = db.scalar(select(WebSession).where(WebSession.token_hash == hash_token(token)))
    if ws is None or ws.expires_at < utcnow() or not ws.user.is_active:
        return None
    return ws


def end_web_session(db: Session, token: str) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == hash_token(token)))


def end_other_web_sessions(db: Session, user: User, keep_token: str | None = None) -> None:
    """After a password change: every browser signed in with the old password is signed out,
    except the one that made the change (``keep_token``)."""
    query = delete(WebSession).where(WebSession.user_id == user.id)
    if keep_token:
        query = query.where(WebSession.token_hash != hash_token(keep_token))
    db.execute(query)


# ---- API keys -----------------------------------------------------------------------------


def create_api_key(
    db: Session, user: User, name: str = "", expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput("expires_at must be in the future", "expires_at")
    if len(name) > 100:
        raise InvalidInput("name is longer than 100 characters", "name")
    key = new_token(API_KEY_PREFIX)
    row = ApiKey(
        user_id=user.id,
        name=name,
        prefix=key[: len(API_KEY_PREFIX) + 6],
        key_hash=hash_token(key),
        expires_at=expires_at,
    )
    db.add(row)
    db.flush()
    return row, key


# A key's last use is written at most this often, so reads do not all become writes.
LAST_USE_RESOLUTION = timedelta(minutes=1)


def resolve_api_key(db: Session, key: str) -> User:
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(key)))
    now = utcnow()
    if row is None or row.revoked_at is not None:
        raise NotAuthenticated("the API key is not valid")
    if row.expires_at is not None and row.expires_at <= now:
        raise NotAuthenticated("the API key has expired")
    if not row.user.is_active:
        raise NotAuthenticated("the account is disabled")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USE_RESOLUTION:
        db.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        db.commit()
    return row.user


def list_api_keys(db: Session, user: User) -> list[ApiKey]:
    return list(
        db.scalars(
            select(ApiKey)
            .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
            .order_by(ApiKey.id)
        )
    )


def revoke_api_key(db: Session, user: User, key_id: int) -> ApiKey:
    row = db.get(ApiKey, key_id)
    if row is None or row.user_id != user.id or row.revoked_at is not None:
        raise NotFound(f"API key {key_id} not found")
    row.revoked_at = utcnow()
    return row


# ---- login throttling ---------------------------------------------------------------------


class LoginThrottle:
    """Slows down repeated failed logins, per username and per client address.

    After ``free`` failures each further attempt must wait 2**(n - free) seconds (capped)
    after the last failure. Kept in the database (``login_failures``), so every web replica
    sees the same count: guessing cannot be spread over replicas. Rows whose longest delay
    ran out long ago are pruned as new failures arrive, so made-up names cannot grow the
    table without bound.
    """

    PRUNE_AFTER = 24 * 3600.0  # a day without failures: the count starts over

    def __init__(
        self,
        sessions: sessionmaker[Session],
        free: int = 3,
        cap_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions, self.free, self.cap, self.clock = sessions, free, cap_seconds, clock

    def retry_after(self, *keys: str) -> float:
        now = self.clock()
        with self.sessions() as db:
            rows = db.scalars(select(LoginFailure).where(LoginFailure.key.in_(keys))).all()
        wait = 0.0
        for row in rows:
            if row.count >= self.free:
                delay = min(2.0 ** (row.count - self.free), self.cap)
                wait = max(wait, row.last_at + delay - now)
        return max(wait, 0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self.sessions() as db:
            dialect = db.get_bind().dialect.name
            insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
            for key in keys:
                statement = insert(LoginFailure).values(key=key[:320], count=1, last_at=now)
                db.execute(
                    statement.on_conflict_do_update(
                        index_elements=[LoginFailure.key],
                        set_={"count": LoginFailure.count + 1, "last_at": now},
                    )
                )
            db.execute(delete(LoginFailure).where(LoginFailure.last_at < now - self.PRUNE_AFTER))
            db.commit()

    def succeeded(self, *keys: str) -> None:
        with self.sessions() as db:
            db.execute(delete(LoginFailure).where(LoginFailure.key.in_(keys)))
            db.commit()
