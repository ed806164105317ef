"""Registry storage over time (SQLite and PostgreSQL): garbage collection, roots that keep
images alive, uploads in progress, a push racing the collector, and per-project usage."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from kiln.build.registry.errors import BlobUnknown, Denied, ManifestUnknown
from kiln.build.registry.gc import collect_garbage
from kiln.build.registry.manifests import OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor
from kiln.build.registry.names import digest_of
from kiln.build.registry.repositories import registry_usage_bytes
from kiln.build.registry.service import Registry
from kiln.cli.main import app
from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import Project
from kiln.db.workload_models import Runtime
from kiln.domain.identity import create_user
from kiln.domain.projects import new_project
from kiln.settings import Settings

REPO = "alice/churn/app"
LATER = timedelta(hours=2)


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    factory = make_sessionmaker(engine)
    with transaction(factory) as db:
        alice = create_user(db, "alice", "correct-horse-battery")
        new_project(db, alice, "churn")
    return factory


@pytest.fixture
def registry(settings: Settings) -> Registry:
    return Registry.for_settings(settings)


def _image(
    registry: Registry, db: Session, repo: str, content: bytes, tag: str | None = "v1"
) -> tuple[str, list[str]]:
    layer = registry.put_blob_bytes(db, repo, content)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [layer.digest]}}).encode()
    image = registry.commit_image(
        db,
        repo,
        config=config,
        layers=[Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size)],
        tag=tag,
    )
    config_digest = json.loads(image.content)["config"]["digest"]
    return image.digest, [layer.digest, config_digest]


def _gc(sessions: sessionmaker[Session], registry: Registry, settings: Settings, **kw):  # type: ignore[no-untyped-def]
    return collect_garbage(sessions, registry.store, settings, **kw)


def test_unreferenced_blobs_go_after_the_grace_period_referenced_ones_stay(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    now = datetime.now(UTC)
    with sessions() as db:
        manifest, blobs = _image(registry, db, REPO, b"layer bytes")
        orphan = registry.put_blob_bytes(db, REPO, b"pushed, never named by a manifest")
    soon = _gc(sessions, registry, settings, now=now)
    assert (soon.blobs_removed, soon.links_removed) == (0, 0)  # within the grace period

    report = _gc(sessions, registry, settings, now=now + LATER)
    assert (report.links_removed, report.blobs_removed) == (1, 1)
    assert report.bytes_freed == orphan.size
    assert registry.store.local_path(orphan.digest) is None
    with sessions() as db:
        with pytest.raises(BlobUnknown):
            registry.stat_blob(db, REPO, orphan.digest)
        for digest in blobs:
            assert registry.stat_blob(db, REPO, digest).size > 0
            assert registry.store.local_path(digest) is not None
        registry.delete_manifest(db, REPO, manifest)
    gone = _gc(sessions, registry, settings, now=now + LATER)
    assert gone.blobs_removed == 2
    assert all(registry.store.local_path(d) is None for d in blobs)


def test_a_blob_shared_by_two_repositories_stays_while_one_needs_it(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    now = datetime.now(UTC)
    with sessions() as db:
        first, blobs = _image(registry, db, REPO, b"shared layer")
        registry.mount_blob(db, "alice/churn/copy", blobs[0], REPO)
        _image(registry, db, "alice/churn/copy", b"shared layer")
        registry.delete_manifest(db, REPO, first)
    _gc(sessions, registry, settings, now=now + LATER)
    with sessions() as db:
        assert registry.stat_blob(db, "alice/churn/copy", blobs[0]).size == len(b"shared layer")
        with pytest.raises(BlobUnknown):  # unlinked where nothing names it any more
            registry.stat_blob(db, REPO, blobs[0])


def test_uploads_in_progress_are_kept_abandoned_ones_removed(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    upload = registry.start_upload(REPO)
    writer = registry.store.open_writer(upload.id, 0, limit=1 << 20)
    writer.write(b"half a layer")
    writer.close()
    now = datetime.now(UTC)
    assert _gc(sessions, registry, settings, now=now + LATER).uploads_removed == 0
    assert registry.store.upload_info(upload.id).size == len(b"half a layer")
    later = now + timedelta(seconds=settings.registry.upload_expiry_seconds + 60)
    assert _gc(sessions, registry, settings, now=later).uploads_removed == 1
    assert list(registry.store.list_uploads()) == []


def test_what_a_runtime_points_at_is_never_removed(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    now = datetime.now(UTC)
    repo = "runtimes/python"
    with sessions() as db:
        manifest, _ = _image(registry, db, repo, b"python layer", tag="3.12")
        registry.delete_manifest(db, repo, "3.12")  # untagged now
    with transaction(sessions) as db:
        db.add(
            Runtime(
                name="python-3.12",
                source="registry",
                image_repository=repo,
                image_digest=manifest,
            )
        )
    report = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert (report.manifests_removed, report.blobs_removed, report.roots) == (0, 0, 1)
    with sessions() as db:
        with pytest.raises(Denied, match=r"in use by runtime python-3\.12") as refused:
            registry.delete_manifest(db, repo, manifest)
        assert refused.value.status == 409
        assert registry.get_manifest(db, repo, manifest).digest == manifest
    with transaction(sessions) as db:
        db.query(Runtime).delete()
    freed = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert (freed.manifests_removed, freed.blobs_removed) == (1, 2)


def test_untagged_collection_keeps_index_children_and_referrers_of_live_subjects(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    now = datetime.now(UTC)
    with sessions() as db:
        child, _ = _image(registry, db, REPO, b"amd64 layer", tag=None)
        child_size = registry.get_manifest(db, REPO, child).size
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": child_size}],
            }
        ).encode()
        registry.put_manifest(db, REPO, "multi", index, "application/vnd.oci.image.index.v1+json")
        subject, _ = _image(registry, db, REPO, b"signed image", tag="signed")
        empty = registry.put_blob_bytes(db, REPO, b"{}")
        signature = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": empty.digest,
                    "size": 2,
                },
                "layers": [],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
            }
        ).encode()
        signed = registry.put_manifest(db, REPO, digest_of(signature), signature, OCI_MANIFEST)
        loose, _ = _image(registry, db, REPO, b"nobody wants me", tag=None)
    report = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert report.manifests_removed == 1
    with sessions() as db:
        with pytest.raises(ManifestUnknown):
            registry.get_manifest(db, REPO, loose)
        for kept in (child, signed.digest, subject):
            registry.get_manifest(db, REPO, kept)
        registry.delete_manifest(db, REPO, "multi")
        registry.delete_manifest(db, REPO, "signed")
    cascade = _gc(sessions, registry, settings, untagged=True, now=now + LATER)
    assert cascade.manifests_removed == 4  # the index, its child, the subject, its referrer


def test_a_push_racing_the_collector_keeps_its_blob(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    """The collector lists a blob as unlinked; before it takes the digest's lock, a client
    pushes the same content again. The collector must re-check under the lock and keep it."""
    data = b"pushed twice"
    with sessions() as db:
        blob = registry.put_blob_bytes(db, REPO, data)
        registry.delete_blob(db, REPO, blob.digest)
    real_lock = registry.store.lock
    pushed = []

    @contextmanager
    def lock_after_a_push(digest: str) -> Iterator[None]:
        if digest == blob.digest and not pushed:
            pushed.append(True)
            with sessions() as db:
                registry.put_blob_bytes(db, "alice/churn/other", data)
        with real_lock(digest):
            yield

    registry.store.lock = lock_after_a_push  # type: ignore[method-assign]
    report = _gc(sessions, registry, settings, now=datetime.now(UTC) + LATER)
    assert pushed and report.blobs_removed == 0
    with sessions() as db:
        assert registry.stat_blob(db, "alice/churn/other", blob.digest).size == len(data)
    assert registry.store.local_path(blob.digest) is not None


def test_stray_blob_files_are_removed(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    stray = registry.store.blob_path("sha256:" + "f" * 64)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"a crash between rename and commit left me")
    old = (datetime.now(UTC) - LATER).timestamp()
    os.utime(stray, (old, old))
    assert _gc(sessions, registry, settings, dry_run=True).stray_files_removed == 1
    assert stray.exists()
    assert _gc(sessions, registry, settings).stray_files_removed == 1
    assert not stray.exists()


def test_project_usage_and_quota(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    with sessions() as db:
        _image(registry, db, REPO, b"x" * 1000)
        registry.mount_blob(
            db, "alice/churn/copy", registry.stat_blob(db, REPO, _layer(db, registry)).digest, REPO
        )
        project = db.query(Project).one()
        manifests = registry.get_manifest(db, REPO, "v1").size
        config = json.loads(registry.get_manifest(db, REPO, "v1").content)["config"]["size"]
        used = registry_usage_bytes(db, project.id)
        assert used == 1000 + config + manifests  # the mounted layer counts once
        project.quota_bytes = used + 100
        db.commit()
        with pytest.raises(Denied, match="over its quota") as refused:
            registry.put_blob_bytes(db, REPO, b"y" * 200)
        assert refused.value.status == 403
        registry.put_blob_bytes(db, REPO, b"y" * 50)
        assert registry_usage_bytes(db, project.id) == used + 50


def _layer(db: Session, registry: Registry) -> str:
    return str(json.loads(registry.get_manifest(db, REPO, "v1").content)["layers"][0]["digest"])


def test_kiln_registry_gc_command(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    with sessions() as db:
        registry.put_blob_bytes(db, REPO, b"orphan")
    env = {
        "KILN_DATA_DIR": str(settings.data_dir),
        "KILN_DATABASE_URL": settings.db_url,
        "KILN_REGISTRY_GC_GRACE_SECONDS": "0",
    }
    dry = CliRunner().invoke(app, ["registry", "gc", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["blobs_removed"] == 1
    real = CliRunner().invoke(app, ["registry", "gc"], env=env)
    assert real.exit_code == 0 and "removed 1 blobs (6 bytes)" in real.output


def test_the_runner_collects_on_a_schedule(
    sessions: sessionmaker[Session], registry: Registry, settings: Settings
) -> None:
    from kiln.build.registry.gc import PeriodicGc

    with sessions() as db:
        orphan = registry.put_blob_bytes(db, REPO, b"nobody names me")
    settings.registry.gc_grace_seconds = 0
    settings.registry.gc_interval_seconds = 1
    periodic = PeriodicGc(sessions, settings)
    periodic.start()
    try:
        deadline = time.monotonic() + 20
        while registry.store.local_path(orphan.digest) is not None:
            assert time.monotonic() < deadline, "the periodic collection never ran"
            time.sleep(0.2)
    finally:
        periodic.close()
