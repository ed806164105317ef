"""Model images on this runner: a model build's image unpacked into the runtime cache
(``settings.runtimes_dir``), where the runner accepts image roots from.

Unpacking the first image on a new base takes seconds to minutes, so it runs on a thread of
its own and the keeper's pass never waits for it: ``get`` answers ``None`` until the image is
there (the keeper looks again on its next pass). The cache keeps images layer by layer
(``kiln.build.oci.cache``), so a second build of the same model unpacks only its code layer,
and an image unpacked before a runner restart is found again by reading its manifest.

Images come from Kiln's own registry (``load_registry_image``: the blobs are read from the
registry's store on this host), or, on a site whose builds push to another registry
(``KILN_BUILDER_REGISTRY_URL``), are pulled from it the way the builder pulls its bases.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from kiln.db.build_models import Build
from kiln.domain.errors import KilnError
from kiln.settings import Settings

log = logging.getLogger("kiln.runner.model_images")


class ImageUnavailable(Exception):
    """The image cannot be run; the message says why (a deployment's failure reason)."""


@dataclass(frozen=True)
class ReplicaImage:
    rootfs: Path  # inside the runtime cache
    digest: str  # the image id (its config's digest)
    env: dict[str, str]  # the image config's Env: the bottom of a replica's environment


Key = tuple[str, str]  # (repository, manifest digest)


class ModelImages:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-model-image")
        self._lock = threading.Lock()
        self._jobs: dict[Key, Future[ReplicaImage]] = {}

    def get(self, build: Build) -> ReplicaImage | None:
        """The build's image once unpacked; ``None`` while it is being unpacked. Raises
        ``ImageUnavailable`` once when unpacking failed (the next call tries again)."""
        if not build.image_digest or not build.repository:
            raise ImageUnavailable(f"build {build.number} recorded no image")
        key = (build.repository, build.image_digest)
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                job = self._pool.submit(self._unpack, key)
                self._jobs[key] = job
            if not job.done():
                return None
            error = job.exception()
            if error is not None:
                del self._jobs[key]  # a later deployment of this build tries again
                raise ImageUnavailable(str(error)) from error
            image = job.result()
        if not image.rootfs.is_dir():  # the cache was cleared under us: unpack again
            with self._lock:
                self._jobs.pop(key, None)
            return None
        return image

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _unpack(self, key: Key) -> ReplicaImage:
        repository, digest = key
        log.info("unpacking model image %s@%s", repository, digest)
        try:
            if self.settings.builder.registry_url:
                return self._pull(repository, digest)
            return self._load(repository, digest)
        except ImageUnavailable:
            raise
        except KilnError as exc:
            raise ImageUnavailable(f"image {repository}@{digest[:19]}: {exc.detail}") from exc
        except Exception as exc:
            log.exception("unpacking model image %s@%s failed", repository, digest)
            raise ImageUnavailable(f"image {repository}@{digest[:19]}: {exc}") from exc

    def _load(self, repository: str, digest: str) -> ReplicaImage:
        from kiln.build.oci.registry_source import ImageRef, load_registry_image
        from kiln.build.registry.service import Registry

        with self.sessions() as db:
            image, _ = load_registry_image(
                Registry.for_settings(self.settings),
                db,
                ImageRef(repository, digest),
                self.settings.runtimes_dir,
                name=f"{repository}@{digest[:19]}",
            )
        if image.rootfs is None or image.digest is None:
            raise ImageUnavailable(f"image {repository}@{digest[:19]} has no root filesystem")
        return ReplicaImage(image.rootfs, image.digest, dict(image.env))

    def _pull(self, repository: str, digest: str) -> ReplicaImage:
        from kiln.build.bases import BaseUnavailable, resolve_base
        from kiln.build.registry_client import Reference
        from kiln.builder.base import open_target

        target = open_target(self.settings)
        try:
            base = resolve_base(
                target, Reference(repository, digest=digest), self.settings.runtimes_dir
            )
        except BaseUnavailable as exc:
            raise ImageUnavailable(str(exc).replace("base image", "image")) from exc
        finally:
            target.close()
        return ReplicaImage(base.rootfs, base.config_digest, base.env)
