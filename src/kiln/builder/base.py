"""The builder's base images: Kiln's own made on first start, any ``runtimes/…`` one resolved.

On start the builder checks whether the registry has its default base
(``runtimes/python:3.11``). If not, it builds Kiln's Debian base in a background thread
(``kiln up`` does not wait), pushes it, and adds it to the runtime catalog; a build that needs
it meanwhile waits, showing the base build's progress in its log. ``kiln runtimes
build-base`` runs the same steps in the foreground.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kiln.build.base_image import BaseRecipe, build_base_archive
from kiln.build.bases import Base, BaseUnavailable, push_archive, resolve_base
from kiln.build.registry_client import Reference, RegistryError
from kiln.build.target import ImageTarget, RegistryTarget
from kiln.db.workload_models import Runtime
from kiln.settings import Settings

log = logging.getLogger("kiln.builder")
WAIT_NOTE_SECONDS = 10.0
RESOLVED_SECONDS = 30.0


class TargetUnavailable(Exception):
    """No registry is configured or reachable for builds."""


def open_target(settings: Settings) -> ImageTarget:
    """The registry builds push to and read bases from."""
    b = settings.builder
    if b.registry_url:
        return RegistryTarget.connect(
            b.registry_url,
            username=b.registry_username,
            password=b.registry_password,
            ca_file=b.registry_ca_file,
        )
    raise TargetUnavailable(
        "no registry for builds: set KILN_BUILDER_REGISTRY_URL (and _USERNAME, _PASSWORD, "
        "_CA_FILE) to an OCI registry"
    )


def builder_state_dir(settings: Settings) -> Path:
    return settings.builder.state_dir or settings.data_dir / "builder"


def recipe_for(settings: Settings) -> BaseRecipe:
    return BaseRecipe.for_site(settings.builder.base_ca_dir, mirror=settings.builder.debian_mirror)


def base_cache_dir(settings: Settings) -> Path:
    return settings.builder.base_cache_dir or builder_state_dir(settings) / "base"


def runtime_name(reference: Reference) -> str:
    """Catalog name of a base: ``runtimes/python:3.11`` → ``python3.11``."""
    return f"{reference.repository.split('/')[-1]}{reference.tag or ''}"


def publish_base(
    settings: Settings,
    target: ImageTarget,
    sessions: sessionmaker[Session],
    reference: Reference,
    progress: Callable[[str], None],
) -> str:
    """Build (or take from the cache) Kiln's base image, push it as ``reference`` and list
    it in the runtime catalog; returns its manifest digest."""
    from kiln.domain import resources

    archive = build_base_archive(recipe_for(settings), base_cache_dir(settings), progress)
    progress(f"pushing it to {target.host}/{reference}")
    with tempfile.TemporaryDirectory(prefix="kiln-base-push-") as tmp:
        digest = push_archive(target, archive, reference, Path(tmp))
    name = runtime_name(reference)
    with sessions() as db:
        if db.scalar(select(Runtime.id).where(Runtime.name == name)) is None:
            progress(f"adding runtime {name} to the catalog (unpacking it)")
            resources.add_image_runtime(
                db,
                settings,
                archive.path,
                name,
                f"Debian with Python from Debian's packages; {reference} in the registry",
            )
            db.commit()
    progress(f"base image {reference} is ready ({digest})")
    return digest


class BaseImages:
    """Resolves bases for builds, waiting for the default one while it is being made."""

    def __init__(
        self, settings: Settings, target: ImageTarget, sessions: sessionmaker[Session]
    ) -> None:
        self.settings = settings
        self.target = target
        self.sessions = sessions
        self.default = Reference.parse(settings.builder.base_image)
        self.progress_line = ""
        self.error: str | None = None
        self._ready = threading.Event()
        self._ready.set()
        self._thread: threading.Thread | None = None
        # A base resolved moments ago is used again as it was (a tag an admin moves is
        # seen within RESOLVED_SECONDS): one registry round trip less per build.
        self._resolved: dict[Reference, tuple[float, Base]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Check the registry for the default base; build it in the background if absent."""
        if not self.settings.builder.build_base_on_start:
            return
        try:
            self.target.get_manifest(self.default)
            return
        except RegistryError as exc:
            if exc.status != 404:
                log.warning("cannot check the registry for %s: %s", self.default, exc)
                return
        self._ready.clear()
        self._thread = threading.Thread(target=self._build, name="base-image", daemon=True)
        self._thread.start()

    def _note(self, line: str) -> None:
        self.progress_line = line
        log.info("base image: %s", line)

    def _build(self) -> None:
        try:
            log.info("the registry has no %s: building Kiln's base image", self.default)
            publish_base(self.settings, self.target, self.sessions, self.default, self._note)
        except Exception as exc:  # reported to every build that waits for it
            log.exception("building the base image failed")
            self.error = str(exc)
        finally:
            self._ready.set()

    def resolve(self, reference: Reference, say: Callable[[str], None]) -> Base:
        if reference == self.default and not self._ready.is_set():
            say(f"waiting for the base image {reference}, which the builder is making now")
            while not self._ready.wait(WAIT_NOTE_SECONDS):
                say(f"still making the base image: {self.progress_line}")
            if self.error:
                raise BaseUnavailable(f"the base image could not be made: {self.error}")
        with self._lock:
            cached = self._resolved.get(reference)
        if cached is not None and time.monotonic() - cached[0] < RESOLVED_SECONDS:
            return cached[1]
        started = time.monotonic()
        base = resolve_base(self.target, reference, self.settings.runtimes_dir)
        took = time.monotonic() - started
        if took > 1:
            say(f"fetched and unpacked the base image into the runtime cache in {took:.1f} s")
        with self._lock:
            self._resolved[reference] = (time.monotonic(), base)
        return base
