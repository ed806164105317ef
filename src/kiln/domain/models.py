"""Models: a Python function of a project served as an authenticated endpoint.

This module holds the model itself (create, read, change, delete) and its access key. A
model's builds, deployments and replicas follow in their own modules; model API keys and the
decision whether a call may go through are ``kiln.domain.model_keys``. Every check runs
before anything is written, so a refused request writes nothing.

Who may do what (through ``kiln.domain.authz``, the one role table): viewers read models;
contributors create, change, build and delete them and rotate their access keys
(``Action.write``); operators deploy existing builds, scale and stop
(``Action.operate``, as they run existing jobs); switching a model's authentication off takes
a project admin, and only where the site allows it (``KILN_MODELS_ALLOW_UNAUTHENTICATED``).
"""

from __future__ import annotations

import json
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.build.registry_client import Reference
from kiln.db.model_models import Model, ModelDeployment, ModelReplica
from kiln.db.models import Project, Role, User, utcnow
from kiln.db.workload_models import ResourceProfile, Workload
from kiln.domain.builds import RUNTIME_REPOSITORIES
from kiln.domain.errors import Conflict, Forbidden, InvalidInput, NotFound, about_field
from kiln.domain.names import check_display_name
from kiln.domain.pagination import Page, paginate
from kiln.domain.passwords import hash_token
from kiln.domain.resources import get_profile
from kiln.domain.session_access import session_origin
from kiln.scheduling.states import TERMINAL_STATES, WorkloadState
from kiln.serving.model_server import MAX_DEPTH, too_deep  # the bound calls have
from kiln.settings import Settings

SERVING_MODES = ("threads", "processes")
MODEL_HOST_LABEL = "modelservice"  # the model host: modelservice.<content domain>
MAX_CONCURRENCY = 64
ACCESS_KEY_CHARS = 32  # CML's access keys are 32 lowercase letters and digits
_MODEL_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_ACCESS_KEY = re.compile(r"^[a-z0-9]{32}$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_LIVE = tuple(s.value for s in WorkloadState if s not in TERMINAL_STATES)  # queued too
MAX_EXAMPLE_BYTES = 64 * 1024  # an example input's JSON, compactly encoded
KEEP: Any = object()  # ModelSpec.example_input not given (None there removes the example)


@dataclass(frozen=True)
class ModelSpec:
    """What a user asks for; ``None`` fields keep their current (or default) value."""

    name: str | None = None
    description: str | None = None
    file: str | None = None
    function: str | None = None
    base: str | None = None  # "" resets to the site's default
    profile: str | None = None  # "" resets to the site's default profile
    serving_mode: str | None = None
    concurrency: int | None = None
    allow_unauthenticated: bool | None = None
    example_input: Any = KEEP  # any JSON value; None: no example


def check_model_name(value: str) -> str:
    """A model's name is one URL path segment and one DNS-safe label: lowercase letters,
    digits and '-' (it appears in ``/{owner}/{project}/{model}/...`` on the model host)."""
    if not _MODEL_NAME.match(value):
        raise InvalidInput(
            f"name {value[:80]!r} is not valid: use 1-64 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit",
            "name",
        )
    return value


def check_model_file(value: str) -> str:
    """A Python file in the project, as a relative path (checked again, for existence, by
    the build: the file may be written after the model is created)."""
    parts = value.split("/")
    bad_char = any(unicodedata.category(c) in ("Cc", "Cf") or c == "\\" for c in value)
    if (
        not value
        or len(value) > 1024
        or value.startswith("/")
        or bad_char
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] == ".git"
    ):
        raise InvalidInput(
            f"file {value[:200]!r} must be a relative path inside the project "
            "(no '..', no leading '/', no control characters)",
            "file",
        )
    if not value.endswith(".py"):
        raise InvalidInput(f"file {value[:200]!r} must be a Python file (.py)", "file")
    return value


def check_function_name(value: str) -> str:
    if not value.isidentifier() or not value.isascii() or len(value) > 200:
        raise InvalidInput(
            f"function {value[:80]!r} must be the name of a Python function in the file "
            "(letters, digits and '_', not starting with a digit)",
            "function",
        )
    return value


def check_base(value: str) -> str:
    try:
        ref = Reference.parse(value)
    except ValueError as exc:
        raise InvalidInput(f"base: {exc}", "base") from None
    if not ref.repository.startswith(RUNTIME_REPOSITORIES):
        raise InvalidInput(
            f"base {value[:300]!r}: models are built on a runtime image (runtimes/...)", "base"
        )
    return str(ref)


def check_example_input(value: Any) -> Any:
    """An example input is any JSON value a call could carry: nested no deeper than the
    model server accepts, at most ``MAX_EXAMPLE_BYTES`` of JSON, no NaN or infinity."""
    if too_deep(value, MAX_DEPTH):
        raise InvalidInput(
            f"example_input is nested more than {MAX_DEPTH} levels deep", "example_input"
        )
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except ValueError:
        raise InvalidInput("example_input must not hold NaN or infinity", "example_input") from None
    if size > MAX_EXAMPLE_BYTES:
        raise InvalidInput(
            f"example_input is {size} bytes of JSON; it may be at most {MAX_EXAMPLE_BYTES}",
            "example_input",
        )
    return value


def new_access_key() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(ACCESS_KEY_CHARS))


def looks_like_access_key(value: str) -> bool:
    return bool(_ACCESS_KEY.match(value))


def _apply(
    db: Session, settings: Settings, role: Role, model: Model, spec: ModelSpec, creating: bool
) -> None:
    """Check every given field of ``spec`` and set it on ``model`` (nothing is flushed)."""
    if spec.name is not None:
        model.name = check_model_name(spec.name)
    if spec.description is not None:
        with about_field("description"):
            text = spec.description.strip()
            if text:
                check_display_name(text, "description", 2000)
            model.description = text
    if spec.file is not None:
        model.file = check_model_file(spec.file)
    if spec.function is not None:
        model.function = check_function_name(spec.function)
    if spec.base is not None:
        model.base_image = check_base(spec.base) if spec.base else ""
    if spec.profile is not None:
        try:
            model.profile_id = get_profile(db, spec.profile).id if spec.profile else None
        except NotFound:
            raise InvalidInput(
                f"there is no resource profile named {spec.profile[:64]!r}", "profile"
            ) from None
    if spec.serving_mode is not None:
        if spec.serving_mode not in SERVING_MODES:
            raise InvalidInput(
                f"serving_mode must be one of {', '.join(SERVING_MODES)}", "serving_mode"
            )
        model.serving_mode = spec.serving_mode
    if spec.concurrency is not None:
        if not 1 <= spec.concurrency <= MAX_CONCURRENCY:
            raise InvalidInput(f"concurrency must be 1 to {MAX_CONCURRENCY}", "concurrency")
        model.concurrency = spec.concurrency
    if spec.allow_unauthenticated is not None and (
        spec.allow_unauthenticated != bool(model.allow_unauthenticated) or creating
    ):
        if spec.allow_unauthenticated:
            if not settings.models.allow_unauthenticated:
                raise Forbidden(
                    "this site does not allow models without authentication "
                    "(a site admin can allow it: KILN_MODELS_ALLOW_UNAUTHENTICATED)",
                    "allow_unauthenticated",
                )
            if role < Role.admin:
                raise Forbidden(
                    "switching a model's authentication off needs the admin role",
                    "allow_unauthenticated",
                )
        model.allow_unauthenticated = spec.allow_unauthenticated
    if spec.example_input is not KEEP:
        model.example_input = (
            None if spec.example_input is None else check_example_input(spec.example_input)
        )


def create_model(
    db: Session, settings: Settings, project: Project, user: User, role: Role, spec: ModelSpec
) -> tuple[Model, str]:
    """A new model (flushed; the caller commits) and its access key, shown this once."""
    for required in ("name", "file", "function"):
        if getattr(spec, required) is None:
            raise InvalidInput(f"{required} is required", required)
    key = new_access_key()
    model = Model(
        project_id=project.id,
        description="",
        base_image="",
        serving_mode="threads",
        concurrency=4,
        allow_unauthenticated=False,
        access_key_hash=hash_token(key),
        access_key_prefix=key[:6],
        created_by_id=user.id,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    _apply(db, settings, role, model, spec, creating=True)
    _check_name_free(db, project, model.name)
    db.add(model)
    try:
        db.flush()
    except IntegrityError:  # created at the same moment by another request
        db.rollback()
        raise Conflict(f"a model named {model.name!r} already exists in this project") from None
    return model, key


def _check_name_free(db: Session, project: Project, name: str, but: int | None = None) -> None:
    other = db.scalar(select(Model).where(Model.project_id == project.id, Model.name == name))
    if other is None or other.id == but:
        return
    if other.deleted_at is not None:
        raise Conflict(f"model {name!r} is being deleted; try again once its replicas stopped")
    raise Conflict(f"a model named {name!r} already exists in this project", "name")


def update_model(
    db: Session, settings: Settings, model: Model, role: Role, spec: ModelSpec
) -> list[str]:
    """Change the given fields; returns their names (for the audit log). A new file or
    function takes effect with the next build."""
    project = db.get(Project, model.project_id)
    assert project is not None  # the FK cascades
    before = {name: getattr(model, column) for name, column in _AUDITED.items()}
    with db.no_autoflush:  # the checks query; nothing half-changed may be written by them
        try:
            _apply(db, settings, role, model, spec, creating=False)
            if spec.name is not None:
                _check_name_free(db, project, model.name, but=model.id)
        except Exception:
            for name, column in _AUDITED.items():
                setattr(model, column, before[name])
            raise
    changed = [name for name, column in _AUDITED.items() if getattr(model, column) != before[name]]
    if changed:
        model.updated_at = utcnow()
        try:
            db.flush()
        except IntegrityError:
            db.rollback()
            raise Conflict(f"a model named {spec.name!r} already exists in this project") from None
    return changed


_AUDITED = {
    "name": "name",
    "description": "description",
    "file": "file",
    "function": "function",
    "base": "base_image",
    "profile": "profile_id",
    "serving_mode": "serving_mode",
    "concurrency": "concurrency",
    "allow_unauthenticated": "allow_unauthenticated",
    "example_input": "example_input",
}


def rotate_access_key(model: Model) -> str:
    """A new access key; the old one stops working at once (within the router's cache
    period). Shown this once."""
    key = new_access_key()
    model.access_key_hash = hash_token(key)
    model.access_key_prefix = key[:6]
    model.updated_at = utcnow()
    return key


def get_model(db: Session, project: Project, name: str) -> Model:
    model = db.scalar(
        select(Model).where(
            Model.project_id == project.id, Model.name == name, Model.deleted_at.is_(None)
        )
    )
    if model is None:
        raise NotFound(f"{project.owner_name}/{project.slug} has no model {name[:80]!r}")
    return model


def list_models(db: Session, project: Project, limit: int, cursor: str | None) -> Page[Model]:
    query = select(Model).where(Model.project_id == project.id, Model.deleted_at.is_(None))
    return paginate(db, query, Model.id, limit, cursor)


def serving_numbers(db: Session, models: list[Model]) -> dict[int, int]:
    """Model id -> the number of the deployment that serves it (models that serve only)."""
    ids = [m.serving_deployment_id for m in models if m.serving_deployment_id is not None]
    if not ids:
        return {}
    query = select(ModelDeployment.model_id, ModelDeployment.number).where(
        ModelDeployment.id.in_(ids)
    )
    return {model_id: number for model_id, number in db.execute(query)}


def live_replicas(db: Session, model: Model) -> list[Workload]:
    """The model's replica workloads that have not ended, of every deployment."""
    return list(
        db.scalars(
            select(Workload)
            .join(ModelReplica, ModelReplica.workload_id == Workload.id)
            .join(ModelDeployment, ModelDeployment.id == ModelReplica.deployment_id)
            .where(ModelDeployment.model_id == model.id, Workload.state.in_(_LIVE))
        )
    )


def delete_model(db: Session, model: Model) -> bool:
    """Delete a model and everything it owns. Without live replicas the rows go at once
    (True). With live replicas the model is marked deleted (gone from every list and from
    the endpoint at once) and its deployments stopping; the runner stops the replicas and
    then removes the rows (False)."""
    if not live_replicas(db, model):
        db.delete(model)
        db.flush()
        return True
    now = utcnow()
    model.deleted_at = now
    model.serving_deployment_id = None
    for deployment in db.scalars(
        select(ModelDeployment).where(
            ModelDeployment.model_id == model.id,
            ModelDeployment.state.in_(("deploying", "serving", "draining")),
        )
    ):
        deployment.state = "draining"
        deployment.reason = "the model was deleted"
    return False


def profile_of(db: Session, model: Model) -> ResourceProfile | None:
    return db.get(ResourceProfile, model.profile_id) if model.profile_id else None


def model_public_fields(model: Model) -> dict[str, Any]:
    """The fields every view of a model shows (the API's and the UI's)."""
    return {
        "name": model.name,
        "description": model.description,
        "file": model.file,
        "function": model.function,
        "base": model.base_image or None,
        "serving_mode": model.serving_mode,
        "concurrency": model.concurrency,
        "allow_unauthenticated": model.allow_unauthenticated,
        "example_input": model.example_input,
        "access_key_prefix": model.access_key_prefix,
        "created_at": model.created_at,
        "updated_at": model.updated_at,
    }


@dataclass(frozen=True)
class EndpointUrls:
    """Where a model is called: CML's endpoint (the access key in the body names the model)
    and the prefix of the other protocols (the path names it), on the model host."""

    cml: str
    protocols: str


def endpoint_urls(
    domain: str, scheme: str, port: int | None, owner: str, project: str, name: str
) -> EndpointUrls:
    """The model's URLs on the model host ``modelservice.<content domain>``, on the port the
    site was reached on (one listener serves every host). Sites without wildcard DNS reach
    the same paths under ``/modelservice/`` on the main host."""
    origin = session_origin(domain, scheme, port, MODEL_HOST_LABEL)
    return EndpointUrls(cml=f"{origin}/model", protocols=f"{origin}/{owner}/{project}/{name}/")
