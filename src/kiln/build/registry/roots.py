"""Roots: images that something in Kiln still points at, which the registry keeps.

A feature that records an image by digest (runtimes, model deployments; builds later)
registers a provider; the garbage collector never removes what a root reaches, and
deleting a rooted manifest through the API is refused, naming the holder::

    from kiln.build.registry.roots import ImageRoot, register_root_provider

    def deployment_roots(db: Session) -> Iterable[ImageRoot]:
        for repo, digest, name in db.execute(select(...)):
            yield ImageRoot(repo, digest, f"deployment {name}")

    register_root_provider("deployments", deployment_roots)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.build_models import Build
from kiln.db.model_models import Model, ModelBuild, ModelDeployment
from kiln.db.workload_models import Runtime


@dataclass(frozen=True)
class ImageRoot:
    repository: str  # e.g. "runtimes/python"
    digest: str  # the manifest digest it points at
    holder: str  # who holds it, for messages: "runtime python3.12"


RootProvider = Callable[[Session], Iterable[ImageRoot]]
_providers: dict[str, RootProvider] = {}


def register_root_provider(name: str, provider: RootProvider) -> None:
    """Register (or replace) the provider called ``name``."""
    _providers[name] = provider


def image_roots(db: Session) -> list[ImageRoot]:
    return [root for provider in _providers.values() for root in provider(db)]


def root_holding(db: Session, repository: str, digest: str) -> ImageRoot | None:
    for root in image_roots(db):
        if root.repository == repository and root.digest == digest:
            return root
    return None


def runtime_roots(db: Session) -> Iterable[ImageRoot]:
    rows = db.execute(
        select(Runtime.image_repository, Runtime.image_digest, Runtime.name).where(
            Runtime.image_digest.is_not(None)
        )
    )
    for repository, digest, name in rows:
        if repository and digest:
            yield ImageRoot(repository, digest, f"runtime {name}")


register_root_provider("runtimes", runtime_roots)


def model_roots(db: Session) -> Iterable[ImageRoot]:
    """The images of model deployments that run or may run again soon: every one not
    ``stopped`` or ``failed`` (a draining one still has replicas; a deploying one is being
    unpacked). The images of builds no deployment runs are not roots here."""
    rows = db.execute(
        select(Build.repository, Build.image_digest, Model.name, ModelDeployment.number)
        .join(ModelBuild, ModelBuild.build_id == Build.workload_id)
        .join(ModelDeployment, ModelDeployment.model_build_id == ModelBuild.id)
        .join(Model, Model.id == ModelDeployment.model_id)
        .where(ModelDeployment.state.not_in(("stopped", "failed")))
    )
    for repository, digest, name, number in rows:
        if repository and digest:
            yield ImageRoot(repository, digest, f"model {name} deployment {number}")


register_root_provider("models", model_roots)
