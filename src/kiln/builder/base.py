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
from kiln.build.registry import tokens
from kiln.build.registry_client import Reference, RegistryError
from kiln.build.target import ImageTarget, RegistryTarget
from kiln.db.workload_models import Runtime
from kiln.settings import Settings

log = logging.getLogger("kiln.builder")
WAIT_NOTE_SECONDS = 10.0
RESOLVED_SECONDS = 30.0
REGISTRY_WAIT_SECONDS = 180.0


class TargetUnavailable(Exception):
    """No registry is configured or reachable for builds."""


def open_target(settings: Settings) -> ImageTarget:
    """The registry builds push to and read bases from: the one the settings name, else
    Kiln's own (``/v2/`` on this site's web tier)."""
    b = settings.builder
    if b.registry_url:
        return RegistryTarget.connect(
            b.registry_url,
            username=b.registry_username,
            password=b.registry_password,
            ca_file=b.registry_ca_file,
        )
    return own_registry(settings)


def own_registry(settings: Settings) -> ImageTarget:
    """Kiln's own registry, reached on the web tier's listener and trusted through the site's
    CA. The builder mints its own short-lived tokens for exactly the repositories a call
    names (it holds the site's secret, like the web tier); no user's key is involved."""
    ca_file = settings.pki_dir / "ca.crt"
    if not ca_file.is_file():
        raise TargetUnavailable(
            f"Kiln's registry cannot be trusted yet: {ca_file} is missing (start the web tier "
            "once, or set KILN_BUILDER_REGISTRY_URL to another registry)"
        )
    host = settings.web.host
    # The web tier's certificate names localhost and 127.0.0.1 (and the site's domain).
    if host in ("0.0.0.0", "::", "127.0.0.1", "::1", ""):  # noqa: S104 (a name to reach, not bind)
        host = "localhost"

    def mint(scopes: tuple[str, ...]) -> tuple[str, int]:
        lifetime = settings.registry.token_seconds
        grants = [grant for scope in scopes if (grant := scope_grant(scope)) is not None]
        return tokens.service_token(settings, "kiln-builder", grants, lifetime), lifetime

    return RegistryTarget.connect(
        f"https://{host}:{settings.web.port}",
        ca_file=ca_file,
        token_source=mint,
        host=f"{settings.domain}:{settings.web.port}",
    )


def scope_grant(scope: str) -> tokens.Grant | None:
    """``repository:alice/churn/build:pull,push`` → a grant of those actions there."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return tokens.Grant(name, frozenset(a for a in actions.split(",") if a))


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
            description = f"Debian with Python from Debian's packages; {reference} in the registry"
            if settings.builder.registry_url:
                resources.add_image_runtime(db, settings, archive.path, name, description)
            else:  # Kiln's own registry: the runtime records the digest, which GC then keeps
                resources.add_registry_runtime(db, settings, str(reference), name, description)
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
        """Check the registry for the default base in the background; build it if absent.
        Builds that need the default base meanwhile wait (the check is quick once the
        registry answers)."""
        if not self.settings.builder.build_base_on_start:
            return
        self._ready.clear()
        self._thread = threading.Thread(target=self._ensure, name="base-image", daemon=True)
        self._thread.start()

    def _note(self, line: str) -> None:
        self.progress_line = line
        log.info("base image: %s", line)

    def _ensure(self) -> None:
        try:
            if self._missing():
                self._note(f"the registry has no {self.default}: making Kiln's base image")
                publish_base(self.settings, self.target, self.sessions, self.default, self._note)
        except Exception as exc:  # reported to every build that waits for it
            log.exception("building the base image failed")
            self.error = str(exc)
        finally:
            self._ready.set()

    def _missing(self) -> bool:
        """Whether the registry lacks the default base. Kiln's own registry is the web tier,
        which `kiln up` starts beside the builder: an unreachable registry is waited for."""
        deadline = time.monotonic() + REGISTRY_WAIT_SECONDS
        while True:
            try:
                self.target.get_manifest(self.default)
                return False
            except RegistryError as exc:
                if exc.status == 404:
                    return True
                if exc.status == 0 and time.monotonic() < deadline:  # not answering yet
                    self.progress_line = f"waiting for the registry to answer ({exc})"
                    time.sleep(1)
                    continue
                log.warning("cannot check the registry for %s: %s", self.default, exc)
                return False

    def resolve(self, reference: Reference, say: Callable[[str], None]) -> Base:
        if reference == self.default and not self._ready.is_set():
            doing = self.progress_line or "checking the registry for it"
            say(f"waiting for the base image {reference}: {doing}")
            while not self._ready.wait(WAIT_NOTE_SECONDS):
                say(f"still waiting for the base image: {self.progress_line}")
            if self.error:
                raise BaseUnavailable(f"the base image could not be made: {self.error}")
        with self._lock:
            cached = self._resolved.get(reference)
        if cached is not None and time.monotonic() - cached[0] < RESOLVED_SECONDS:
            return cached[1]
        started = time.monotonic()
        base = resolve_base(
            self.target,
            reference,
            self.settings.runtimes_dir,
            unpack=self.settings.builder.runtime == "local",  # install pods pull it themselves
        )
        took = time.monotonic() - started
        if took > 1:
            say(f"fetched and unpacked the base image into the runtime cache in {took:.1f} s")
        with self._lock:
            self._resolved[reference] = (time.monotonic(), base)
        return base
