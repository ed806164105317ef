"""The registry keeps the images of model deployments that run or may run (deploying,
serving, draining): garbage collection leaves them and deleting one is refused, naming the
deployment; once the deployment stopped or failed the image is collectable. SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.build.registry.errors import Denied
from kiln.build.registry.service import Registry
from kiln.db.build_models import Build
from kiln.db.engine import transaction
from kiln.db.model_models import Model, ModelBuild, ModelDeployment
from kiln.db.models import Project
from kiln.db.workload_models import Workload
from kiln.settings import Settings
from tests.integration.test_registry_gc import LATER, _gc, _image, registry, sessions  # noqa: F401

REPO = "alice/churn/build"


def _deployed(factory: sessionmaker[Session], digest: str, state: str) -> None:
    """A model whose build's image is ``digest``, deployed once, in ``state``."""
    with transaction(factory) as db:
        project = db.scalar(select(Project))
        assert project is not None
        workload = Workload(
            id="b" * 16,
            kind="build",
            project_id=project.id,
            cpu_millis=1000,
            memory_bytes=1024**3,
            state="succeeded",
        )
        db.add(workload)
        db.flush()
        db.add(
            Build(
                workload_id=workload.id,
                project_id=project.id,
                number=1,
                base_image="runtimes/python:3.11",
                repository=REPO,
                image_digest=digest,
            )
        )
        model = Model(
            project_id=project.id,
            name="adder",
            file="model.py",
            function="predict",
            access_key_hash="0" * 64,
            access_key_prefix="000000",
        )
        db.add(model)
        db.flush()
        version = ModelBuild(
            model_id=model.id, number=1, build_id=workload.id, file="model.py", function="predict"
        )
        db.add(version)
        db.flush()
        db.add(
            ModelDeployment(
                model_id=model.id,
                number=1,
                model_build_id=version.id,
                cpu_millis=500,
                memory_bytes=1024**3,
                state=state,
            )
        )


def _set_state(factory: sessionmaker[Session], state: str) -> None:
    with transaction(factory) as db:
        deployment = db.scalar(select(ModelDeployment))
        assert deployment is not None
        deployment.state = state


@pytest.mark.parametrize("state", ["deploying", "serving", "draining"])
def test_a_deployed_models_image_is_kept_until_its_deployment_ends(
    sessions: sessionmaker[Session],  # noqa: F811
    registry: Registry,  # noqa: F811
    settings: Settings,
    state: str,
) -> None:
    now = datetime.now(UTC)
    with sessions() as db:
        manifest, _ = _image(registry, db, REPO, b"model image layer", tag=None)
    _deployed(sessions, manifest, state)
    kept = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert (kept.manifests_removed, kept.blobs_removed) == (0, 0)
    with sessions() as db:
        with pytest.raises(Denied, match="in use by model adder deployment 1"):
            registry.delete_manifest(db, REPO, manifest)
        assert registry.get_manifest(db, REPO, manifest).digest == manifest

    _set_state(sessions, "stopped")
    freed = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert (freed.manifests_removed, freed.blobs_removed) == (1, 2)


def test_a_failed_deployment_holds_nothing(
    sessions: sessionmaker[Session],  # noqa: F811
    registry: Registry,  # noqa: F811
    settings: Settings,
) -> None:
    now = datetime.now(UTC)
    with sessions() as db:
        manifest, _ = _image(registry, db, REPO, b"a broken model", tag=None)
    _deployed(sessions, manifest, "failed")
    freed = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert freed.manifests_removed == 1
