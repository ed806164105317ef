"""Models: a Python function of a project served as an endpoint (``kiln.domain.models``).

Viewers read models; contributors create, change and delete them and rotate their access
keys; switching authentication off takes a project admin where the site allows it. The
access key is answered once, when it is made (create, rotate): Kiln keeps only its hash.

Model API keys (``/auth/model-api-keys``) are the caller's own keys for calling models.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt

from kiln.api.deps import Ctx, Db, ViewProject, WriteProject, client_address
from kiln.api.deps import CurrentUser as CallerUser
from kiln.api.projects import commit_audited
from kiln.api.schemas import InputModel, PageOut
from kiln.db.model_models import Model, ModelApiKey
from kiln.domain import audit, model_keys
from kiln.domain import models as domain
from kiln.domain.pagination import MAX_ROW_ID
from kiln.domain.sessions import profile_names, usernames

router = APIRouter(tags=["models"])

MODELS = "/projects/{owner}/{project}/models"
MODEL = MODELS + "/{name}"
Name = Annotated[str, Path(max_length=64, description="The model's name in the project.")]


class ModelFields(InputModel):
    description: str | None = Field(None, max_length=2000)
    base: str | None = Field(
        None, max_length=300, description="Base runtime image (runtimes/...); '' = the site's."
    )
    profile: str | None = Field(
        None, max_length=64, description="Resource profile of replicas; '' = the default."
    )
    serving_mode: str | None = Field(
        None, max_length=16, description="threads (default) or processes: how calls run at once."
    )
    concurrency: StrictInt | None = Field(
        None, ge=1, le=domain.MAX_CONCURRENCY, description="Calls one replica serves at once."
    )
    allow_unauthenticated: StrictBool | None = Field(
        None,
        description="Answer calls without a model API key (project admins, where the site "
        "allows it).",
    )
    example_input: Any = Field(
        None,
        description="A sample request (any JSON value, at most 64 KiB): it fills the test "
        "widget and the call snippets of the model's page. null removes it.",
    )


class ModelCreate(ModelFields):
    name: str = Field(max_length=64, description="Lowercase letters, digits and '-'.")
    file: str = Field(max_length=1024, description="The Python file, relative to the project.")
    function: str = Field(max_length=200, description="The function in that file to call.")


class ModelUpdate(ModelFields):
    name: str | None = Field(None, max_length=64)
    file: str | None = Field(None, max_length=1024)
    function: str | None = Field(None, max_length=200)


class ModelPublic(BaseModel):
    name: str
    project: str
    description: str
    file: str
    function: str
    base: str | None
    profile: str | None
    serving_mode: str
    concurrency: int
    allow_unauthenticated: bool
    example_input: Any = Field(description="The sample request; null: none.")
    access_key_prefix: str = Field(description="The first characters of the access key.")
    endpoint_url: str = Field(
        description='CML\'s endpoint: POST {"accessKey": ..., "request": {...}} here with '
        "'Authorization: Bearer <model API key>'. Without wildcard DNS: "
        "https://<site>/modelservice/model."
    )
    protocols_url: str = Field(
        description="The prefix of the model's other protocols on the model host "
        "(https://modelservice.<content domain>/<owner>/<project>/<model>/)."
    )
    serving_deployment: int | None = Field(
        description="The number of the deployment that answers calls; null: none does."
    )
    created_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ModelCreated(ModelPublic):
    access_key: str = Field(description="The model's access key. Shown once; Kiln keeps its hash.")


class AccessKey(BaseModel):
    access_key: str = Field(description="The new access key. Shown once; the old one is void.")


def _spec(body: ModelFields) -> domain.ModelSpec:
    values: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    return domain.ModelSpec(**values)


def _publish(
    db: Db, request: Request, ctx: Ctx, access: ViewProject, models: list[Model]
) -> list[ModelPublic]:
    users = usernames(db, {m.created_by_id for m in models})
    profiles = profile_names(db, {m.profile_id for m in models})
    serving = domain.serving_numbers(db, models)
    owner, slug = access.project.owner_name, access.project.slug
    scheme, port = request.url.scheme, request.url.port
    published = []
    for m in models:
        urls = domain.endpoint_urls(ctx.settings.domain, scheme, port, owner, slug, m.name)
        published.append(
            ModelPublic(
                **domain.model_public_fields(m),
                project=f"{owner}/{slug}",
                profile=profiles.get(m.profile_id) if m.profile_id else None,
                created_by=users.get(m.created_by_id) if m.created_by_id else None,
                endpoint_url=urls.cml,
                protocols_url=urls.protocols,
                serving_deployment=serving.get(m.id),
            )
        )
    return published


@router.post(MODELS, status_code=201, response_model=ModelCreated)
def create_model(
    body: ModelCreate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> ModelCreated:
    """Create a model (contributors and up). The answer carries its access key, once."""
    model, key = domain.create_model(
        db, ctx.settings, access.project, access.user, access.role, _spec(body)
    )
    commit_audited(db, access, request, "model.create", model=model.name, file=model.file)
    public = _publish(db, request, ctx, access, [model])[0]
    return ModelCreated(**public.model_dump(), access_key=key)


@router.get(MODELS, response_model=PageOut[ModelPublic])
def list_models(
    access: ViewProject,
    request: Request,
    ctx: Ctx,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> PageOut[ModelPublic]:
    """The project's models, oldest first."""
    page = domain.list_models(db, access.project, limit, cursor)
    items = _publish(db, request, ctx, access, page.items)
    return PageOut(items=items, next_cursor=page.next_cursor)


@router.get(MODEL, response_model=ModelPublic)
def get_model(name: Name, access: ViewProject, request: Request, ctx: Ctx, db: Db) -> ModelPublic:
    """One model, with its endpoint URLs and the deployment that serves it."""
    model = domain.get_model(db, access.project, name)
    return _publish(db, request, ctx, access, [model])[0]


@router.patch(MODEL, response_model=ModelPublic)
def update_model(
    name: Name, body: ModelUpdate, access: WriteProject, request: Request, ctx: Ctx, db: Db
) -> ModelPublic:
    """Change a model (contributors and up). A new file or function takes effect with the
    next build."""
    model = domain.get_model(db, access.project, name)
    changed = domain.update_model(db, ctx.settings, model, access.role, _spec(body))
    if changed:
        commit_audited(db, access, request, "model.update", model=model.name, changed=changed)
    return _publish(db, request, ctx, access, [model])[0]


@router.post(MODEL + "/access-key", response_model=AccessKey)
def rotate_access_key(name: Name, access: WriteProject, request: Request, db: Db) -> AccessKey:
    """A new access key (contributors and up); the old one stops working within seconds."""
    model = domain.get_model(db, access.project, name)
    key = domain.rotate_access_key(model)
    commit_audited(db, access, request, "model.access_key.rotate", model=model.name)
    return AccessKey(access_key=key)


@router.delete(MODEL, status_code=204)
def delete_model(name: Name, access: WriteProject, request: Request, db: Db) -> Response:
    """Delete a model with its builds, deployments and replicas (contributors and up): 204
    when it is gone, 202 while its replicas are being stopped (it is gone from lists and
    from the endpoint at once)."""
    model = domain.get_model(db, access.project, name)
    gone = domain.delete_model(db, model)
    commit_audited(db, access, request, "model.delete", model=name)
    return Response(status_code=204 if gone else 202)


# ---- model API keys ------------------------------------------------------------------------


class ModelApiKeyCreate(InputModel):
    name: str = Field("", max_length=100)
    expires_in_days: StrictInt | None = Field(
        None, ge=1, le=model_keys.MAX_DAYS, description="Default: the site's (one year)."
    )
    never_expires: StrictBool = Field(False, description="A key without expiry.")


class ModelApiKeyPublic(BaseModel):
    model_config = {"from_attributes": True}

    id: int
    name: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None


class ModelApiKeyCreated(ModelApiKeyPublic):
    key: str = Field(description="The key itself. Shown once; Kiln keeps only its hash.")


KEYS = "/auth/model-api-keys"


@router.post(KEYS, status_code=201, response_model=ModelApiKeyCreated, tags=["auth"])
def create_model_api_key(
    request: Request, user: CallerUser, ctx: Ctx, db: Db, body: ModelApiKeyCreate | None = None
) -> ModelApiKeyCreated:
    """A key for calling models as yourself (``Authorization: Bearer kilnm_...``)."""
    body = body or ModelApiKeyCreate()
    row, key = model_keys.create_model_api_key(
        db, ctx.settings, user, body.name, body.expires_in_days, body.never_expires
    )
    audit.record(
        db,
        "model_api_key.create",
        actor=user,
        target=f"model_api_key:{row.id}",
        address=client_address(request),
        name=body.name,
    )
    db.commit()
    return ModelApiKeyCreated(**ModelApiKeyPublic.model_validate(row).model_dump(), key=key)


@router.get(KEYS, response_model=list[ModelApiKeyPublic], tags=["auth"])
def list_model_api_keys(user: CallerUser, db: Db) -> list[ModelApiKey]:
    return model_keys.list_model_api_keys(db, user)


@router.delete(KEYS + "/{key_id}", status_code=204, tags=["auth"])
def revoke_model_api_key(
    key_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], request: Request, user: CallerUser, db: Db
) -> Response:
    model_keys.revoke_model_api_key(db, user, key_id)
    audit.record(
        db,
        "model_api_key.revoke",
        actor=user,
        target=f"model_api_key:{key_id}",
        address=client_address(request),
    )
    db.commit()
    return Response(status_code=204)
