"""Where a build's image goes (and its base comes from): the ``ImageTarget`` seam.

A build only needs content-addressed blobs and manifests: is a blob there, make one present
in a repository (by mounting it from another repository of the same registry, or by
uploading it, verified before it becomes visible), put a manifest, read a manifest and a
blob. ``RegistryTarget`` does it over the OCI distribution HTTP API (any registry, with the
Docker token flow); an in-process target over Kiln's own registry storage can take its
place without the build noticing.

The manifest is always written last: a build that dies half-way leaves at most blobs that no
manifest names (garbage collection's to remove), never a tag pointing at a partial image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NoReturn

from kiln.build.layers import Blob
from kiln.build.registry_client import (
    Manifest,
    Reference,
    RegistryClient,
    RegistryError,
    TokenSource,
)

Placed = Literal["present", "mounted", "uploaded"]


class ImageTarget(ABC):
    """A registry (or registry storage) a build reads its base from and pushes to."""

    #: How users address this registry: ``host:port`` (shown in image references).
    host: str

    @abstractmethod
    def get_manifest(self, reference: Reference) -> Manifest:
        """The image manifest ``reference`` names; ``RegistryError`` (status 404) if none."""

    @abstractmethod
    def fetch_blob(self, repository: str, digest: str, dest: Path) -> int:
        """Copy a blob into ``dest`` (digest-checked); returns its size."""

    @abstractmethod
    def has_blob(self, repository: str, digest: str) -> bool: ...

    @abstractmethod
    def mount_blob(self, repository: str, digest: str, source: str) -> bool:
        """Make a blob of ``source`` present in ``repository`` without copying its bytes;
        False when that is not possible (then upload it)."""

    @abstractmethod
    def push_blob(self, repository: str, blob: Blob, path: Path) -> None:
        """Add ``path`` as ``blob``; it becomes visible only once its digest is verified."""

    @abstractmethod
    def put_manifest(self, repository: str, ref: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag (or its digest); returns its digest."""

    def close(self) -> None:  # noqa: B027  (optional)
        """Release connections."""

    def place_blob(
        self,
        repository: str,
        blob: Blob,
        *,
        sources: Sequence[str] = (),
        open_path: Callable[[], Path] | None = None,
        fresh: bool = False,
    ) -> Placed:
        """Make ``blob`` present in ``repository``: already there, mounted from one of
        ``sources``, or uploaded from ``open_path()`` (never re-uploaded when avoidable).
        ``fresh``: the blob is almost surely new (a code layer, a config): upload it without
        asking first (the registry keeps one copy anyway)."""
        if not fresh and self.has_blob(repository, blob.digest):
            return "present"
        for source in sources:
            if source != repository and self.mount_blob(repository, blob.digest, source):
                return "mounted"
        if open_path is None:
            raise RegistryError(
                f"blob {blob.digest} is in none of {', '.join(sources) or 'no repository'} "
                f"and cannot be uploaded to {repository}"
            )
        self.push_blob(repository, blob, open_path())
        return "uploaded"


class RegistryTarget(ImageTarget):
    """Any registry that speaks the OCI distribution API."""

    def __init__(self, client: RegistryClient, host: str) -> None:
        self.client = client
        self.host = host

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        token_source: TokenSource | None = None,
        host: str | None = None,
    ) -> RegistryTarget:
        """``host``: the registry's name in image references users pull (default: the
        URL's), when the builder reaches it under another name."""
        client = RegistryClient(
            url,
            username=username,
            password=password,
            verify=str(ca_file) if ca_file else True,
            token_source=token_source,
        )
        return cls(client, host or url.split("://", 1)[-1].rstrip("/"))

    def get_manifest(self, reference: Reference) -> Manifest:
        return self.client.get_manifest(reference)

    def fetch_blob(self, repository: str, digest: str, dest: Path) -> int:
        return self.client.fetch_blob(repository, digest, dest)

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.client.blob_exists(repository, digest)

    def mount_blob(self, repository: str, digest: str, source: str) -> bool:
        return self.client.mount_blob(repository, digest, source)

    def push_blob(self, repository: str, blob: Blob, path: Path) -> None:
        self.client.push_blob(repository, blob, path)

    def put_manifest(self, repository: str, ref: str, data: bytes, media_type: str) -> str:
        return self.client.put_manifest(repository, ref, data, media_type)

    def close(self) -> None:
        self.client.close()


class MissingTarget(ImageTarget):
    """Stands in when no registry is configured: every build fails, saying so."""

    host = "(no registry)"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> NoReturn:
        raise RegistryError(self.reason)

    def get_manifest(self, reference: Reference) -> Manifest:
        self._refuse()

    def fetch_blob(self, repository: str, digest: str, dest: Path) -> int:
        self._refuse()

    def has_blob(self, repository: str, digest: str) -> bool:
        self._refuse()

    def mount_blob(self, repository: str, digest: str, source: str) -> bool:
        self._refuse()

    def push_blob(self, repository: str, blob: Blob, path: Path) -> None:
        self._refuse()

    def put_manifest(self, repository: str, ref: str, data: bytes, media_type: str) -> str:
        self._refuse()
