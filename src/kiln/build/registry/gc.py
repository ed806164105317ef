"""Garbage collection: remove what no manifest needs, never what a root points at, never
what a push in progress is about to name.

Passes, each in its own short transactions (pushes go on meanwhile):
1. with ``untagged``: manifests without a tag, older than the grace period, that no root,
   no index of their repository and no live subject holds (repeated: deleting an index frees
   its children);
2. blob links older than the grace period that no manifest of their repository names
   (``touched_at`` is refreshed by every push, mount and manifest naming the blob, so a
   client that pushed layers and is about to push their manifest keeps them);
3. blobs no repository links: under the digest's store lock the row is re-checked,
   deleted and committed, then the file unlinked, so a concurrent re-push of the same digest
   (which takes the same lock) either completes first, and the blob stays, or starts after;
4. blob files without a row (a crash between rename and commit), older than the grace;
5. uploads untouched for ``registry.upload_expiry_seconds``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, bindparam, delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from kiln.build.registry.roots import image_roots
from kiln.build.registry.storage import BlobStore
from kiln.db.models import UTCDateTime
from kiln.db.registry_models import (
    RegistryBlob,
    RegistryBlobLink,
    RegistryManifest,
    RegistryManifestRef,
    RegistryRepository,
    RegistryTag,
)
from kiln.settings import Settings

log = logging.getLogger("kiln.registry.gc")

_MAX_UNTAGGED_PASSES = 8


@dataclass
class GcReport:
    manifests_removed: int = 0
    links_removed: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    stray_files_removed: int = 0
    uploads_removed: int = 0
    roots: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {self.blobs_removed} blobs ({self.bytes_freed} bytes), "
            f"{self.links_removed} unreferenced blob links, {self.manifests_removed} untagged "
            f"manifests, {self.stray_files_removed} stray files, {self.uploads_removed} "
            f"abandoned uploads; kept {self.roots} images that runtimes, builds or "
            "deployments point at"
        )


def collect_garbage(
    sessions: sessionmaker[Session],
    store: BlobStore,
    settings: Settings,
    *,
    untagged: bool = False,
    dry_run: bool = False,
    now: datetime | None = None,
) -> GcReport:
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=settings.registry.gc_grace_seconds)
    report = GcReport(dry_run=dry_run)
    with sessions() as db:
        roots = {(r.repository, r.digest) for r in image_roots(db)}
    report.roots = len(roots)
    if untagged:
        report.manifests_removed = _remove_untagged(sessions, roots, cutoff, dry_run)
    report.links_removed = _remove_unreferenced_links(sessions, cutoff, dry_run)
    _remove_unlinked_blobs(sessions, store, cutoff, dry_run, report)
    report.stray_files_removed = _remove_stray_files(sessions, store, cutoff, dry_run)
    expiry = now.timestamp() - settings.registry.upload_expiry_seconds
    for upload in list(store.list_uploads()):
        if upload.touched_at < expiry:
            report.uploads_removed += 1
            if not dry_run:
                store.cancel_upload(upload.id)
    log.info("registry garbage collection: %s", report.summary())
    return report


def _remove_untagged(
    sessions: sessionmaker[Session],
    roots: set[tuple[str, str]],
    cutoff: datetime,
    dry_run: bool,
) -> int:
    removed = 0
    for _ in range(_MAX_UNTAGGED_PASSES):
        with sessions() as db, db.begin():
            doomed = [
                m
                for m, repo_name in db.execute(_untagged_query(cutoff))
                if (repo_name, m.digest) not in roots
            ]
            if dry_run:
                return len(doomed)
            for manifest in doomed:
                db.delete(manifest)
        removed += len(doomed)
        if not doomed:
            break
    return removed


def _untagged_query(cutoff: datetime):  # type: ignore[no-untyped-def]
    manifest = RegistryManifest
    parent = RegistryManifest.__table__.alias("parent")
    subject = RegistryManifest.__table__.alias("subject")
    tagged = exists().where(RegistryTag.manifest_id == manifest.id)
    in_index = exists().where(
        RegistryManifestRef.digest == manifest.digest,
        RegistryManifestRef.manifest_id == parent.c.id,
        parent.c.repository_id == manifest.repository_id,
    )
    subject_alive = exists().where(
        subject.c.repository_id == manifest.repository_id,
        subject.c.digest == manifest.subject_digest,
    )
    return (
        select(manifest, RegistryRepository.name)
        .join(RegistryRepository, RegistryRepository.id == manifest.repository_id)
        .where(
            manifest.created_at < cutoff,
            ~tagged,
            ~in_index,
            ~and_(manifest.subject_digest.is_not(None), subject_alive),
        )
    )


def _removable_link() -> ColumnElement[bool]:
    """A link past the grace period that no manifest of its repository names."""
    named = exists().where(
        RegistryManifestRef.digest == RegistryBlobLink.digest,
        RegistryManifestRef.manifest_id == RegistryManifest.id,
        RegistryManifest.repository_id == RegistryBlobLink.repository_id,
    )
    return and_(RegistryBlobLink.touched_at < _cutoff_param(), ~named)


def _cutoff_param() -> ColumnElement[datetime]:
    return bindparam("cutoff", type_=UTCDateTime())


def _remove_unreferenced_links(
    sessions: sessionmaker[Session], cutoff: datetime, dry_run: bool
) -> int:
    with sessions() as db, db.begin():
        if dry_run:
            query = select(func.count()).select_from(RegistryBlobLink).where(_removable_link())
            return int(db.scalar(query, {"cutoff": cutoff}) or 0)
        result = db.execute(delete(RegistryBlobLink).where(_removable_link()), {"cutoff": cutoff})
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _remove_unlinked_blobs(
    sessions: sessionmaker[Session],
    store: BlobStore,
    cutoff: datetime,
    dry_run: bool,
    report: GcReport,
) -> None:
    # Blobs without a link that survives the link pass (in a dry run those links are still
    # there; otherwise they are gone and this is simply "no link").
    surviving = exists().where(RegistryBlobLink.digest == RegistryBlob.digest, ~_removable_link())
    with sessions() as db:
        candidates = db.execute(
            select(RegistryBlob.digest, RegistryBlob.size).where(
                RegistryBlob.created_at < cutoff, ~surviving
            ),
            {"cutoff": cutoff},
        ).all()
    for digest, size in candidates:
        if dry_run:
            report.blobs_removed += 1
            report.bytes_freed += size
            continue
        with store.lock(digest), sessions() as db:
            still_unlinked = db.scalar(
                select(RegistryBlob.digest).where(
                    RegistryBlob.digest == digest,
                    ~exists().where(RegistryBlobLink.digest == RegistryBlob.digest),
                )
            )
            if still_unlinked is None:
                continue
            db.execute(delete(RegistryBlob).where(RegistryBlob.digest == digest))
            db.commit()
            store.delete(digest)
            report.blobs_removed += 1
            report.bytes_freed += size


def _remove_stray_files(
    sessions: sessionmaker[Session], store: BlobStore, cutoff: datetime, dry_run: bool
) -> int:
    removed = 0
    limit = cutoff.timestamp()
    for blob in store.iter_blobs():
        if blob.modified_at >= limit:
            continue
        with store.lock(blob.digest), sessions() as db:
            if db.get(RegistryBlob, blob.digest) is not None:
                continue
            removed += 1
            if not dry_run:
                log.warning("removing %s: its file has no record (an interrupted push)", blob)
                store.delete(blob.digest)
    return removed


class PeriodicGc:
    """Runs ``collect_garbage`` every ``registry.gc_interval_seconds`` in a daemon thread
    (the runner starts one; the first run comes one interval after start)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions, self.settings = sessions, settings
        self.store = BlobStore(settings.registry_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry-gc", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        interval = self.settings.registry.gc_interval_seconds
        while not self._stop.wait(interval):
            try:
                collect_garbage(self.sessions, self.store, self.settings)
            except Exception:
                log.exception("registry garbage collection failed; trying again next time")
