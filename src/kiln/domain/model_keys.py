"""Model API keys, and the decision whether a model call may go through.

A call names its model by the model's *access key* (CML's ``accessKey``, in the body or the
query) or, for the other protocols, by ``/{owner}/{project}/{model}`` in the path. Unless the
model allows unauthenticated calls (and the site allows that), it must also carry
``Authorization: Bearer <model API key>`` of a user who may call the model: a user whose role
on the project allows ``authz.CALL_MODEL``. Model API keys open nothing else, and Kiln's
regular API keys do not call models: each refusal names the key to use instead.

Keys are random 256-bit tokens stored as SHA-256 (like API keys); each has an expiry
(``KILN_MODELS_API_KEY_DAYS``, one year, by default) unless its owner asks for none, and can
be revoked. Every decision reads the database, so a revoked key or a removed collaborator is
refused as soon as the router's short cache of decisions lapses (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kiln.db.model_models import Model, ModelApiKey
from kiln.db.models import Project, User, utcnow
from kiln.domain import authz, projects
from kiln.domain.errors import Forbidden, InvalidInput, NotAuthenticated, NotFound
from kiln.domain.identity import API_KEY_PREFIX, LAST_USE_RESOLUTION
from kiln.domain.passwords import hash_token, new_token
from kiln.domain.workload_tokens import PREFIX as WORKLOAD_TOKEN_PREFIX
from kiln.settings import Settings

PREFIX = "kilnm_"
MAX_DAYS = 3650
WHICH_KEY = (
    "calling a model takes a model API key ('Authorization: Bearer kilnm_...'; create one "
    "with POST /api/v1/auth/model-api-keys)"
)


def create_model_api_key(
    db: Session,
    settings: Settings,
    user: User,
    name: str = "",
    expires_in_days: int | None = None,
    never_expires: bool = False,
) -> tuple[ModelApiKey, str]:
    """A new key for ``user`` (flushed) and the key itself, shown this once."""
    if len(name) > 100:
        raise InvalidInput("name is longer than 100 characters", "name")
    if never_expires and expires_in_days is not None:
        raise InvalidInput("give expires_in_days or never_expires, not both", "expires_in_days")
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_DAYS:
        raise InvalidInput(f"expires_in_days must be 1 to {MAX_DAYS}", "expires_in_days")
    now = utcnow()
    days = expires_in_days or settings.models.api_key_days
    key = new_token(PREFIX)
    row = ModelApiKey(
        user_id=user.id,
        name=name,
        prefix=key[: len(PREFIX) + 6],
        key_hash=hash_token(key),
        created_at=now,
        expires_at=None if never_expires else now + timedelta(days=days),
    )
    db.add(row)
    db.flush()
    return row, key


def list_model_api_keys(db: Session, user: User) -> list[ModelApiKey]:
    """The user's keys that are not revoked (expired ones too: they say so)."""
    return list(
        db.scalars(
            select(ModelApiKey)
            .where(ModelApiKey.user_id == user.id, ModelApiKey.revoked_at.is_(None))
            .order_by(ModelApiKey.id)
        )
    )


def revoke_model_api_key(db: Session, user: User, key_id: int) -> ModelApiKey:
    row = db.get(ModelApiKey, key_id) if 1 <= key_id <= 2**31 - 1 else None
    if row is None or row.user_id != user.id or row.revoked_at is not None:
        raise NotFound(f"model API key {key_id} not found")
    row.revoked_at = utcnow()
    return row


def resolve_model_api_key(db: Session, key: str) -> User:
    """The active user whose model API key this is, or ``NotAuthenticated`` saying why."""
    row = db.scalar(select(ModelApiKey).where(ModelApiKey.key_hash == hash_token(key)))
    now = utcnow()
    if row is None:
        raise NotAuthenticated("the model API key is not valid")
    if row.revoked_at is not None:
        raise NotAuthenticated(f"the model API key {row.prefix}... was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise NotAuthenticated(
            f"the model API key {row.prefix}... expired on {_day(row.expires_at)}"
        )
    user = db.get(User, row.user_id)
    if user is None or not user.is_active:
        raise NotAuthenticated("the model API key's account is disabled")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USE_RESOLUTION:
        db.execute(update(ModelApiKey).where(ModelApiKey.id == row.id).values(last_used_at=now))
        db.commit()
    return user


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def bearer_of(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer`` header; None when there is none;
    ``NotAuthenticated`` for another scheme (a model takes nothing else)."""
    if authorization is None or not authorization.strip():
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise NotAuthenticated(f"unsupported authorization for a model call: {WHICH_KEY}")
    return value.strip()


@dataclass(frozen=True)
class CallGrant:
    """A call may go to ``model``; ``user`` is who called (None: an unauthenticated model)."""

    model_id: int
    project_id: int
    user_id: int | None


def model_by_access_key(db: Session, access_key: str) -> Model:
    """The (not deleted) model whose access key this is."""
    if not access_key:
        raise NotAuthenticated(
            'a model call names its model by its access key: {"accessKey": "...", '
            '"request": {...}} or ?accessKey=...'
        )
    model = db.scalar(select(Model).where(Model.access_key_hash == hash_token(access_key)))
    if model is None or model.deleted_at is not None:
        raise NotAuthenticated("the access key names no model (wrong, rotated or deleted)")
    return model


def authorize_call(db: Session, settings: Settings, model: Model, bearer: str | None) -> CallGrant:
    """Whether a call with ``bearer`` (the Bearer credential, if any) may reach ``model``."""
    if bearer is None:
        return _unauthenticated(settings, model)
    user = _caller(db, bearer)
    project = db.get(Project, model.project_id)
    assert project is not None  # the FK cascades
    role = authz.effective_role(db, user, project)
    if role is None or role < authz.ACTION_ROLES[authz.CALL_MODEL]:
        raise Forbidden(
            f"{user.username} may not call models of {project.owner_name}/{project.slug}: "
            "callers must be collaborators of the model's project"
        )
    return CallGrant(model.id, model.project_id, user.id)


def authorize_path_call(
    db: Session, settings: Settings, owner: str, project_slug: str, name: str, bearer: str | None
) -> CallGrant:
    """Whether a call to ``/{owner}/{project}/{name}/...`` (the other protocols) with
    ``bearer`` may go through. The same rules as ``authorize_call``, and the answer for a
    model that does not exist is the answer for one the caller may not see: a stranger learns
    nothing (401 without a key, 404 with one, whatever exists)."""
    user = _caller(db, bearer) if bearer is not None else None  # a bad key: 401 first
    project = projects.find_project(db, owner, project_slug)
    model = None
    if project is not None:
        model = db.scalar(
            select(Model).where(
                Model.project_id == project.id, Model.name == name, Model.deleted_at.is_(None)
            )
        )
    if user is None:
        if model is None:
            raise NotAuthenticated(f"this model needs authentication: {WHICH_KEY}")
        return _unauthenticated(settings, model)
    role = authz.effective_role(db, user, project) if project is not None else None
    if model is None or project is None or role is None:
        raise NotFound(f"there is no model {owner[:64]}/{project_slug[:64]}/{name[:64]}")
    if role < authz.ACTION_ROLES[authz.CALL_MODEL]:
        raise Forbidden(
            f"{user.username} may not call models of {project.owner_name}/{project.slug}: "
            "callers must be collaborators of the model's project"
        )
    return CallGrant(model.id, model.project_id, user.id)


def _unauthenticated(settings: Settings, model: Model) -> CallGrant:
    """A call without a key: only to a model that allows it, where the site allows it."""
    if model.allow_unauthenticated and settings.models.allow_unauthenticated:
        return CallGrant(model.id, model.project_id, None)
    raise NotAuthenticated(f"this model needs authentication: {WHICH_KEY}")


def _caller(db: Session, bearer: str) -> User:
    """The user of a model API key; ``NotAuthenticated`` naming the key to use otherwise."""
    if bearer.startswith((API_KEY_PREFIX, WORKLOAD_TOKEN_PREFIX)):
        raise NotAuthenticated(f"that is not a model API key: {WHICH_KEY}")
    if not bearer.startswith(PREFIX):
        raise NotAuthenticated(f"the model API key is not valid: {WHICH_KEY}")
    return resolve_model_api_key(db, bearer)
