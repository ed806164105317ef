"""The registry: blob store + metadata, as Python calls. ``/v2/`` is a thin layer over this,
and in-host writers (the builder, ``kiln runtimes``) call it directly.

Every method takes a database session and commits its own work (a blob must be recorded
while its digest's store lock is held), so pass a session with no pending changes.
Repository names are OCI names (``alice/churn/scorer``, ``runtimes/python``); authorization
is the caller's job (``kiln.build.registry.access``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.build.registry.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    Denied,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
)
from kiln.build.registry.manifests import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ParsedManifest,
    image_manifest,
    parse_manifest,
)
from kiln.build.registry.names import (
    check_digest,
    check_tag,
    digest_of,
    is_digest,
    parse_repository,
)
from kiln.build.registry.repositories import (
    ensure_repository,
    find_repository,
    registry_usage_bytes,
)
from kiln.build.registry.roots import root_holding
from kiln.build.registry.storage import CHUNK, BlobStore, UploadInfo
from kiln.db.models import Project, utcnow
from kiln.db.registry_models import (
    RegistryBlob,
    RegistryBlobLink,
    RegistryManifest,
    RegistryManifestRef,
    RegistryRepository,
    RegistryTag,
)
from kiln.settings import Settings
from kiln.storage.store import ProjectStore, project_store


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True)
class ManifestInfo:
    digest: str
    media_type: str
    size: int
    content: bytes
    subject: str | None = None
    tags: tuple[str, ...] = ()  # the tags a push set


class Registry:
    """One per process (it keeps the running hashes of chunked uploads)."""

    def __init__(self, store: BlobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._project_store: ProjectStore | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> Registry:
        return cls(BlobStore(settings.registry_dir), settings)

    # -- blobs ------------------------------------------------------------------------------
    def stat_blob(self, db: Session, repository: str, digest: str) -> BlobInfo:
        """The blob, if ``repository`` holds it (else BLOB_UNKNOWN)."""
        check_digest(digest)
        size = db.scalar(
            select(RegistryBlob.size)
            .join(RegistryBlobLink, RegistryBlobLink.digest == RegistryBlob.digest)
            .join(RegistryRepository, RegistryRepository.id == RegistryBlobLink.repository_id)
            .where(RegistryRepository.name == repository, RegistryBlob.digest == digest)
        )
        if size is None:
            raise BlobUnknown(f"blob {digest} is unknown in {repository}")
        return BlobInfo(digest, size)

    def start_upload(self, repository: str) -> UploadInfo:
        return self.store.create_upload(repository)

    def finish_upload(self, db: Session, repository: str, upload_id: str, digest: str) -> BlobInfo:
        """Verify upload ``upload_id`` against ``digest`` and make it visible in
        ``repository``: the bytes are renamed into place and recorded in one step under the
        digest's lock."""
        check_digest(digest)
        name = parse_repository(repository)
        upload = self.store.upload_info(upload_id, repository)
        with self.store.lock(digest):
            try:
                repo = ensure_repository(db, name)
                self._check_quota(db, repo, digest, upload.size)
                size = self.store.commit_upload(upload_id, digest)
                self._record_blob(db, repo, digest, size)
                db.commit()
            except BaseException:
                db.rollback()
                raise
        return BlobInfo(digest, size)

    def put_blob_file(self, db: Session, repository: str, path: Path) -> BlobInfo:
        """Copy a local file into ``repository`` as a blob (the builder's layers)."""
        upload = self.store.create_upload(repository)
        try:
            writer = self.store.open_writer(upload.id, 0, self.settings.registry.max_upload_bytes)
            try:
                with path.open("rb") as source:
                    while chunk := source.read(CHUNK):
                        writer.write(chunk)
                digest = writer.digest()
            finally:
                writer.close()
            assert digest is not None  # a fresh upload is hashed as it is written
            return self.finish_upload(db, repository, upload.id, digest)
        finally:
            self._discard_upload(upload.id)

    def put_blob_bytes(self, db: Session, repository: str, data: bytes) -> BlobInfo:
        upload = self.store.create_upload(repository)
        try:
            writer = self.store.open_writer(upload.id, 0, self.settings.registry.max_upload_bytes)
            try:
                writer.write(data)
            finally:
                writer.close()
            return self.finish_upload(db, repository, upload.id, digest_of(data))
        finally:
            self._discard_upload(upload.id)

    def mount_blob(self, db: Session, repository: str, digest: str, source: str) -> BlobInfo | None:
        """Make a blob of ``source`` visible in ``repository`` without copying it; None when
        ``source`` does not hold it (the client then uploads it). The caller must have
        checked that the pusher may pull from ``source``."""
        check_digest(digest)
        name = parse_repository(repository)
        try:
            blob = self.stat_blob(db, source, digest)
        except BlobUnknown:
            return None
        with self.store.lock(digest):
            repo = ensure_repository(db, name)
            self._check_quota(db, repo, digest, blob.size)
            if not self._record_blob(db, repo, digest, blob.size):
                db.rollback()
                return None
            db.commit()
        return blob

    def delete_blob(self, db: Session, repository: str, digest: str) -> None:
        """Remove the blob from ``repository`` (its bytes go when no repository holds it, at
        the next garbage collection)."""
        check_digest(digest)
        repo = find_repository(db, repository)
        link = None if repo is None else db.get(RegistryBlobLink, (repo.id, digest))
        if link is None:
            raise BlobUnknown(f"blob {digest} is unknown in {repository}")
        db.delete(link)
        db.commit()

    def _record_blob(self, db: Session, repo: RegistryRepository, digest: str, size: int) -> bool:
        """Blob row (if new) and link (touched if old); False if the blob's bytes are gone."""
        if self.store.size(digest) != size:
            return False
        if db.get(RegistryBlob, digest) is None:
            db.add(RegistryBlob(digest=digest, size=size))
            db.flush()
        link = db.get(RegistryBlobLink, (repo.id, digest))
        if link is None:
            db.add(RegistryBlobLink(repository_id=repo.id, digest=digest))
        else:
            link.touched_at = utcnow()
        db.flush()
        return True

    def _check_quota(self, db: Session, repo: RegistryRepository, digest: str, size: int) -> None:
        """A project's registry storage stays within its quota (files are checked by the
        file store against the same number)."""
        if repo.project_id is None or db.get(RegistryBlobLink, (repo.id, digest)) is not None:
            return
        project = db.get(Project, repo.project_id)
        limit = (
            project.quota_bytes
            if project is not None and project.quota_bytes is not None
            else self.settings.storage.project_quota_bytes
        )
        images = registry_usage_bytes(db, repo.project_id)
        files = self._projects().usage(repo.project_id).used_bytes
        if files + images + size > limit:
            raise Denied(
                f"pushing {size} bytes would take the project to {files + images + size} "
                f"bytes ({files} of files, {images} of images), over its quota of {limit}; "
                "delete images or files, or ask an administrator for a larger quota",
                status=403,
            )

    def _projects(self) -> ProjectStore:
        """The project store, for the files' share of a quota (made on first use)."""
        if self._project_store is None:
            self._project_store = project_store(self.settings)
        return self._project_store

    def _discard_upload(self, upload_id: str) -> None:
        with contextlib.suppress(BlobUploadUnknown):  # finished: gone already
            self.store.cancel_upload(upload_id)

    # -- manifests --------------------------------------------------------------------------
    def put_manifest(
        self,
        db: Session,
        repository: str,
        reference: str,
        body: bytes,
        content_type: str,
        *,
        tags: Sequence[str] = (),
        retry: bool = True,
    ) -> ManifestInfo:
        """Store a manifest under a tag or its digest (plus any ``tags``, as ``?tag=`` does
        on ``/v2/``), after checking it and that ``repository`` holds everything it names."""
        name = parse_repository(repository)
        parsed = parse_manifest(body, content_type)
        wanted_tags = [check_tag(t) for t in tags]
        if is_digest(reference):
            check_digest(reference)
            digest = digest_of(body, reference.partition(":")[0])
            if digest != reference:
                raise DigestInvalid(
                    f"the manifest's digest is {digest}, not {reference}",
                    detail={"expected": reference, "actual": digest},
                )
        else:
            wanted_tags.insert(0, check_tag(reference))
            digest = digest_of(body)
        try:
            repo = ensure_repository(db, name)
            self._check_references(db, repo, parsed)
            row = self._manifest_row(db, repo, digest, parsed, body)
            for tag in dict.fromkeys(wanted_tags):
                existing = db.get(RegistryTag, (repo.id, tag))
                if existing is None:
                    db.add(RegistryTag(repository_id=repo.id, name=tag, manifest_id=row.id))
                else:
                    existing.manifest_id = row.id
                    existing.updated_at = utcnow()
            db.commit()
        except IntegrityError:  # the same manifest or tag pushed concurrently: once more
            db.rollback()
            if not retry:
                raise
            return self.put_manifest(
                db, repository, reference, body, content_type, tags=tags, retry=False
            )
        except BaseException:
            db.rollback()
            raise
        return ManifestInfo(
            digest, parsed.media_type, len(body), body, parsed.subject, tuple(wanted_tags)
        )

    def _check_references(
        self, db: Session, repo: RegistryRepository, parsed: ParsedManifest
    ) -> None:
        wanted = {d.digest: d for d in parsed.blobs}
        if wanted:
            # Touching the links both proves they exist and keeps the garbage collector
            # (which deletes only untouched ones, in its own transaction) off them.
            db.execute(
                update(RegistryBlobLink)
                .where(
                    RegistryBlobLink.repository_id == repo.id,
                    RegistryBlobLink.digest.in_(list(wanted)),
                )
                .values(touched_at=utcnow())
            )
            sizes = db.execute(
                select(RegistryBlob.digest, RegistryBlob.size)
                .join(RegistryBlobLink, RegistryBlobLink.digest == RegistryBlob.digest)
                .where(
                    RegistryBlobLink.repository_id == repo.id,
                    RegistryBlob.digest.in_(list(wanted)),
                )
            ).all()
            _check_held(wanted, dict(sizes), f"the manifest names blob {{}}, which {repo.name}")
        children = {d.digest: d for d in parsed.manifests}
        if children:
            held = db.execute(
                select(RegistryManifest.digest, RegistryManifest.size).where(
                    RegistryManifest.repository_id == repo.id,
                    RegistryManifest.digest.in_(list(children)),
                )
            ).all()
            _check_held(children, dict(held), f"the index names manifest {{}}, which {repo.name}")

    def _manifest_row(
        self,
        db: Session,
        repo: RegistryRepository,
        digest: str,
        parsed: ParsedManifest,
        body: bytes,
    ) -> RegistryManifest:
        row = db.scalar(
            select(RegistryManifest).where(
                RegistryManifest.repository_id == repo.id, RegistryManifest.digest == digest
            )
        )
        if row is not None:
            return row
        row = RegistryManifest(
            repository_id=repo.id,
            digest=digest,
            media_type=parsed.media_type,
            artifact_type=parsed.artifact_type,
            subject_digest=parsed.subject,
            annotations=parsed.annotations,
            size=len(body),
            content=body,
        )
        db.add(row)
        db.flush()
        refs = {d.digest: "blob" for d in parsed.blobs}
        refs.update({d.digest: "manifest" for d in parsed.manifests})
        db.add_all(
            RegistryManifestRef(manifest_id=row.id, digest=ref, kind=kind)
            for ref, kind in refs.items()
        )
        db.flush()
        return row

    def get_manifest(self, db: Session, repository: str, reference: str) -> ManifestInfo:
        row = self._find_manifest(db, repository, reference)
        return ManifestInfo(row.digest, row.media_type, row.size, row.content, row.subject_digest)

    def _find_manifest(self, db: Session, repository: str, reference: str) -> RegistryManifest:
        query = select(RegistryManifest).join(
            RegistryRepository, RegistryRepository.id == RegistryManifest.repository_id
        )
        if is_digest(reference):
            check_digest(reference)
            query = query.where(RegistryManifest.digest == reference)
        else:
            check_tag(reference)
            query = query.join(RegistryTag, RegistryTag.manifest_id == RegistryManifest.id).where(
                RegistryTag.name == reference
            )
        row = db.scalar(query.where(RegistryRepository.name == repository))
        if row is None:
            raise ManifestUnknown(f"manifest {reference} is unknown in {repository}")
        return row

    def delete_manifest(self, db: Session, repository: str, reference: str) -> None:
        """By digest: the manifest and its tags (refused while a runtime, build or deployment
        points at it). By tag: just the tag."""
        row = self._find_manifest(db, repository, reference)
        if not is_digest(reference):
            db.execute(
                delete(RegistryTag).where(
                    RegistryTag.repository_id == row.repository_id, RegistryTag.name == reference
                )
            )
            db.commit()
            return
        holder = root_holding(db, repository, row.digest)
        if holder is not None:
            raise Denied(
                f"manifest {row.digest} is in use by {holder.holder}; remove that first",
                status=409,
            )
        db.delete(row)
        db.commit()

    def list_tags(
        self, db: Session, repository: str, n: int | None = None, last: str | None = None
    ) -> tuple[list[str], bool]:
        """Tags in lexical order after ``last``, at most ``n``; and whether more follow."""
        repo = find_repository(db, repository)
        if repo is None:
            raise NameUnknown(f"repository {repository} is unknown")
        tags = sorted(
            db.scalars(select(RegistryTag.name).where(RegistryTag.repository_id == repo.id))
        )
        if last is not None:
            tags = [t for t in tags if t > last]
        if n is not None and len(tags) > n:
            return tags[:n], True
        return tags, False

    def referrers(
        self, db: Session, repository: str, digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Manifests in ``repository`` whose subject is ``digest``, newest first."""
        check_digest(digest)
        query = (
            select(RegistryManifest)
            .join(RegistryRepository, RegistryRepository.id == RegistryManifest.repository_id)
            .where(RegistryRepository.name == repository, RegistryManifest.subject_digest == digest)
            .order_by(RegistryManifest.id.desc())
        )
        if artifact_type is not None:
            query = query.where(RegistryManifest.artifact_type == artifact_type)
        return [
            Descriptor(m.media_type, m.digest, m.size, m.artifact_type, dict(m.annotations or {}))
            for m in db.scalars(query)
        ]

    def repository_names(self, db: Session, project_id: int | None = None) -> list[str]:
        query = select(RegistryRepository.name).order_by(RegistryRepository.name)
        if project_id is not None:
            query = query.where(RegistryRepository.project_id == project_id)
        return list(db.scalars(query))

    # -- whole images (in-host writers) -----------------------------------------------------
    def commit_image(
        self,
        db: Session,
        repository: str,
        *,
        config: bytes,
        layers: Sequence[Descriptor],
        tag: str | None = None,
        annotations: dict[str, str] | None = None,
        config_media_type: str = OCI_CONFIG,
    ) -> ManifestInfo:
        """Store ``config`` and an OCI image manifest naming it and ``layers`` (blobs that
        ``repository`` already holds: ``put_blob_file`` or ``mount_blob`` them first), under
        ``tag`` or by digest only. Returns the manifest; its digest is the image's name."""
        blob = self.put_blob_bytes(db, repository, config)
        body = image_manifest(
            Descriptor(config_media_type, blob.digest, blob.size), layers, annotations=annotations
        )
        reference = tag if tag is not None else digest_of(body)
        return self.put_manifest(db, repository, reference, body, OCI_MANIFEST)


def _check_held(wanted: dict[str, Descriptor], held: dict[str, int], names: str) -> None:
    """Every descriptor of ``wanted`` is in ``held`` (digest → size) with its size."""
    for digest, descriptor in wanted.items():
        if digest not in held:
            raise ManifestBlobUnknown(
                f"{names.format(digest)} does not hold; push it first", detail={"digest": digest}
            )
        if held[digest] != descriptor.size:
            raise ManifestInvalid(
                f"{names.format(digest).split(',')[0]} with {descriptor.size} bytes; "
                f"it has {held[digest]}"
            )
