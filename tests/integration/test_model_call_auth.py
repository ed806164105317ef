"""Who may call a model: the access key names the model; a model API key of a user with a
role on the project authenticates the call; every refusal says which key to use. On SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from kiln.db.engine import make_sessionmaker
from kiln.db.model_models import Model, ModelApiKey
from kiln.db.models import Collaborator, Role, User, Visibility, utcnow
from kiln.domain import model_keys
from kiln.domain import models as domain
from kiln.domain.errors import Forbidden, NotAuthenticated
from kiln.domain.identity import create_api_key, create_user
from kiln.domain.projects import new_project
from kiln.settings import Settings


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    with make_sessionmaker(engine)() as session:
        yield session


@pytest.fixture
def world(db: Session, settings: Settings) -> dict[str, object]:
    alice = create_user(db, "alice", "correct-horse-battery")
    bob = create_user(db, "bob", "correct-horse-battery")
    project = new_project(db, alice, "demo")
    spec = domain.ModelSpec(name="adder", file="model.py", function="predict")
    model, access_key = domain.create_model(db, settings, project, alice, Role.admin, spec)
    db.commit()
    return {"alice": alice, "bob": bob, "project": project, "model": model, "key": access_key}


def refused(call: Callable[[], object], kind: type[Exception], words: str) -> None:
    with pytest.raises(kind) as caught:
        call()
    assert words in str(caught.value), str(caught.value)


def test_the_access_key_names_the_model(db: Session, world: dict[str, object]) -> None:
    model = world["model"]
    assert isinstance(model, Model)
    key = str(world["key"])
    assert domain.looks_like_access_key(key)
    assert model_keys.model_by_access_key(db, key).id == model.id
    for wrong in ("", "x" * 32, key.upper(), key[:-1]):
        words = "names its model by its access key" if not wrong else "names no model"
        refused(lambda w=wrong: model_keys.model_by_access_key(db, w), NotAuthenticated, words)
    new = domain.rotate_access_key(model)
    db.commit()
    refused(lambda: model_keys.model_by_access_key(db, key), NotAuthenticated, "rotated")
    assert model_keys.model_by_access_key(db, new).id == model.id
    project = world["project"]
    with db.no_autoflush:
        model.deleted_at = utcnow()
    db.commit()
    refused(lambda: model_keys.model_by_access_key(db, new), NotAuthenticated, "deleted")
    assert project is not None


def test_a_model_api_key_of_a_collaborator_calls(
    db: Session, settings: Settings, world: dict[str, object]
) -> None:
    alice, bob, model = world["alice"], world["bob"], world["model"]
    assert isinstance(alice, User) and isinstance(bob, User) and isinstance(model, Model)
    _, alices = model_keys.create_model_api_key(db, settings, alice)
    row, bobs = model_keys.create_model_api_key(db, settings, bob, "bob's")
    db.commit()
    grant = model_keys.authorize_call(db, settings, model, alices)
    assert (grant.model_id, grant.user_id) == (model.id, alice.id)
    # Bob has no role on the project: his key is valid, but not for this model.
    refused(
        lambda: model_keys.authorize_call(db, settings, model, bobs),
        Forbidden,
        "bob may not call models of alice/demo",
    )
    db.add(Collaborator(project_id=model.project_id, user_id=bob.id, role=Role.viewer))
    db.commit()
    assert model_keys.authorize_call(db, settings, model, bobs).user_id == bob.id
    # Removed again: refused at once (the router caches decisions for seconds only).
    db.query(Collaborator).delete()
    db.commit()
    refused(lambda: model_keys.authorize_call(db, settings, model, bobs), Forbidden, "bob")
    # A public project: any signed-in user views it, and so may call its models.
    project = world["project"]
    project.visibility = Visibility.public
    db.commit()
    assert model_keys.authorize_call(db, settings, model, bobs).user_id == bob.id
    # Revoked, expired, disabled.
    model_keys.revoke_model_api_key(db, bob, row.id)
    db.commit()
    refused(
        lambda: model_keys.authorize_call(db, settings, model, bobs), NotAuthenticated, "revoked"
    )
    row2, bobs2 = model_keys.create_model_api_key(db, settings, bob, expires_in_days=1)
    db.commit()
    db.execute(
        update(ModelApiKey)
        .where(ModelApiKey.id == row2.id)
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    refused(
        lambda: model_keys.authorize_call(db, settings, model, bobs2), NotAuthenticated, "expired"
    )
    bob.is_active = False
    _, bobs3 = model_keys.create_model_api_key(db, settings, bob)
    db.commit()
    refused(
        lambda: model_keys.authorize_call(db, settings, model, bobs3), NotAuthenticated, "disabled"
    )


def test_refusals_name_the_key_to_use(
    db: Session, settings: Settings, world: dict[str, object]
) -> None:
    alice, model = world["alice"], world["model"]
    assert isinstance(alice, User) and isinstance(model, Model)
    _, api_key = create_api_key(db, alice, "regular")
    db.commit()
    for bearer, words in (
        (None, "this model needs authentication: calling a model takes a model API key"),
        (api_key, "that is not a model API key"),
        ("kwt_workers-token", "that is not a model API key"),
        ("something", "the model API key is not valid"),
        ("kilnm_" + "x" * 43, "the model API key is not valid"),
    ):
        refused(
            lambda b=bearer: model_keys.authorize_call(db, settings, model, b),
            NotAuthenticated,
            words,
        )
    for header, expected in (
        (None, None),
        ("", None),
        ("Bearer kilnm_abc", "kilnm_abc"),
        ("bearer  kilnm_abc ", "kilnm_abc"),
    ):
        assert model_keys.bearer_of(header) == expected
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Token x"):
        refused(lambda h=header: model_keys.bearer_of(h), NotAuthenticated, "model API key")


def test_unauthenticated_models_only_where_the_site_allows(
    db: Session, settings: Settings, world: dict[str, object]
) -> None:
    model = world["model"]
    assert isinstance(model, Model)
    model.allow_unauthenticated = True
    db.commit()
    refused(
        lambda: model_keys.authorize_call(db, settings, model, None),
        NotAuthenticated,
        "needs authentication",
    )
    settings.models.allow_unauthenticated = True
    grant = model_keys.authorize_call(db, settings, model, None)
    assert grant.user_id is None and grant.model_id == model.id
