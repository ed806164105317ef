"""The OCI distribution API at /v2/ over raw HTTP (SQLite and PostgreSQL): the upload
protocols, pulls with ranges, tags, referrers, mounts, deletes, and the spec's error bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.build.registry.gc import collect_garbage
from kiln.build.registry.storage import BlobStore
from kiln.db.engine import make_sessionmaker
from kiln.db.registry_models import RegistryRepository
from kiln.settings import Settings
from tests.conftest import Account
from tests.registry_support import (
    OCI_MANIFEST,
    bearer,
    errors_of,
    make_image,
    push_blob,
    push_image,
    push_scope,
    sha256,
    token,
)

REPO = "alice/churn/app"


def _project(client: TestClient, who: Account, name: str = "churn") -> None:
    response = client.post("/api/v1/projects", json={"name": name}, headers=who.headers)
    assert response.status_code == 201, response.text


def test_push_then_pull_an_image_through_the_token_flow(client: TestClient, alice: Account) -> None:
    _project(client, alice)
    anonymous = client.get("/v2/")
    assert anonymous.status_code == 401 and errors_of(anonymous) == ["UNAUTHORIZED"]
    challenge = anonymous.headers["www-authenticate"]
    assert challenge == 'Bearer realm="https://testserver/v2/token",service="kiln-registry"'
    auth = bearer(token(client, alice, push_scope(REPO)))
    assert client.get("/v2/", headers=auth).json() == {}

    image = make_image({"model.bin": b"\x00\x01" * 1000})
    pushed = push_image(client, REPO, image, "v1", auth)
    assert pushed.status_code == 201, pushed.text
    assert pushed.headers["docker-content-digest"] == image.digest
    assert pushed.headers["location"] == f"/v2/{REPO}/manifests/{image.digest}"

    for reference in ("v1", image.digest):
        got = client.get(f"/v2/{REPO}/manifests/{reference}", headers=auth)
        assert got.status_code == 200 and got.content == image.manifest
        assert got.headers["content-type"] == OCI_MANIFEST
        assert got.headers["docker-content-digest"] == image.digest
        head = client.head(f"/v2/{REPO}/manifests/{reference}", headers=auth)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(image.manifest))
    layer = image.layers[0]
    blob = client.get(f"/v2/{REPO}/blobs/{sha256(layer)}", headers=auth)
    assert blob.status_code == 200 and blob.content == layer
    assert blob.headers["docker-content-digest"] == sha256(layer)
    part = client.get(f"/v2/{REPO}/blobs/{sha256(layer)}", headers={**auth, "Range": "bytes=3-9"})
    assert part.status_code == 206 and part.content == layer[3:10]
    backwards = client.get(
        f"/v2/{REPO}/blobs/{sha256(layer)}", headers={**auth, "Range": "bytes=9-3"}
    )
    assert backwards.status_code == 416
    assert backwards.headers["content-range"] == f"bytes */{len(layer)}"
    head = client.head(f"/v2/{REPO}/blobs/{sha256(layer)}", headers=auth)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(layer))
    tags = client.get(f"/v2/{REPO}/tags/list", headers=auth)
    assert tags.json() == {"name": REPO, "tags": ["v1"]}


def test_chunked_streamed_and_cancelled_uploads(client: TestClient, alice: Account) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, push_scope(REPO)))
    data = bytes(range(256)) * 40
    started = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth)
    assert started.status_code == 202 and started.headers["range"] == "0-0"
    location = started.headers["location"]
    assert location.startswith(f"/v2/{REPO}/blobs/uploads/")

    def patch(start: int, end: int) -> object:
        return client.patch(
            location,
            content=data[start : end + 1],
            headers={
                **auth,
                "Content-Range": f"{start}-{end}",
                "Content-Type": "application/octet-stream",
            },
        )

    first = patch(0, 999)
    assert first.status_code == 202 and first.headers["range"] == "0-999"  # type: ignore[attr-defined]
    skipped = patch(2000, 2999)  # a chunk that does not start where the upload ends
    assert skipped.status_code == 416  # type: ignore[attr-defined]
    assert errors_of(skipped) == ["BLOB_UPLOAD_INVALID"]  # type: ignore[arg-type]
    assert skipped.headers["range"] == "0-999"  # type: ignore[attr-defined]
    status = client.get(location, headers=auth)
    assert status.status_code == 204 and status.headers["range"] == "0-999"
    assert patch(1000, 4999).status_code == 202  # type: ignore[attr-defined]
    final = client.put(
        location,
        params={"digest": sha256(data)},
        content=data[5000:],
        headers={**auth, "Content-Range": f"5000-{len(data) - 1}"},
    )
    assert final.status_code == 201, final.text
    assert client.get(f"/v2/{REPO}/blobs/{sha256(data)}", headers=auth).content == data

    # streamed: one PATCH without Content-Range, then an empty PUT
    streamed = bytes(reversed(data))
    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    assert (
        client.patch(
            location, content=iter([streamed[:3000], streamed[3000:]]), headers=auth
        ).status_code
        == 202
    )
    done = client.put(location, params={"digest": sha256(streamed)}, headers=auth)
    assert done.status_code == 201
    assert done.headers["docker-content-digest"] == sha256(streamed)

    # cancelled: gone afterwards
    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    assert client.delete(location, headers=auth).status_code == 204
    gone = client.get(location, headers=auth)
    assert gone.status_code == 404 and errors_of(gone) == ["BLOB_UPLOAD_UNKNOWN"]


def test_an_upload_is_finished_only_in_its_own_repository(
    client: TestClient, alice: Account
) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, push_scope(REPO), push_scope("alice/churn/other")))
    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    upload_id = location.rsplit("/", 1)[1]
    elsewhere = client.put(
        f"/v2/alice/churn/other/blobs/uploads/{upload_id}",
        params={"digest": sha256(b"x")},
        content=b"x",
        headers=auth,
    )
    assert elsewhere.status_code == 404 and errors_of(elsewhere) == ["BLOB_UPLOAD_UNKNOWN"]


def test_tag_list_pages_with_n_and_last(client: TestClient, alice: Account) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, push_scope(REPO)))
    image = make_image()
    assert push_image(client, REPO, image, "b", auth).status_code == 201
    for tag in ("a", "c", "B", "a1"):
        put = client.put(
            f"/v2/{REPO}/manifests/{tag}",
            content=image.manifest,
            headers={**auth, "Content-Type": OCI_MANIFEST},
        )
        assert put.status_code == 201
    everything = client.get(f"/v2/{REPO}/tags/list", headers=auth).json()["tags"]
    assert everything == ["B", "a", "a1", "b", "c"]  # lexical (byte) order
    first = client.get(f"/v2/{REPO}/tags/list", params={"n": 2}, headers=auth)
    assert first.json()["tags"] == ["B", "a"]
    assert first.headers["link"] == f'</v2/{REPO}/tags/list?n=2&last=a>; rel="next"'
    rest = client.get(f"/v2/{REPO}/tags/list", params={"n": 10, "last": "a"}, headers=auth)
    assert rest.json()["tags"] == ["a1", "b", "c"] and "link" not in rest.headers
    assert client.get(f"/v2/{REPO}/tags/list", params={"n": 0}, headers=auth).json()["tags"] == []
    bad = client.get(f"/v2/{REPO}/tags/list", params={"n": "-1"}, headers=auth)
    assert bad.status_code == 400 and errors_of(bad)
    unknown = client.get(
        "/v2/alice/churn/never/tags/list",
        headers=bearer(token(client, alice, "repository:alice/churn/never:pull")),
    )
    assert unknown.status_code == 404 and errors_of(unknown) == ["NAME_UNKNOWN"]


def test_referrers_list_manifests_by_subject_and_filter_by_artifact_type(
    client: TestClient, alice: Account
) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, push_scope(REPO)))
    subject = make_image()
    assert push_image(client, REPO, subject, "v1", auth).status_code == 201
    empty = b"{}"
    assert push_blob(client, REPO, empty, auth).status_code == 201
    signature = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256(empty),
                "size": 2,
            },
            "layers": [],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": subject.digest,
                "size": len(subject.manifest),
            },
            "annotations": {"org.example.signer": "alice"},
        }
    ).encode()
    put = client.put(
        f"/v2/{REPO}/manifests/{sha256(signature)}",
        content=signature,
        headers={**auth, "Content-Type": OCI_MANIFEST},
    )
    assert put.status_code == 201 and put.headers["oci-subject"] == subject.digest
    listed = client.get(f"/v2/{REPO}/referrers/{subject.digest}", headers=auth)
    assert listed.status_code == 200
    assert listed.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
    assert listed.json()["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(signature),
            "size": len(signature),
            "artifactType": "application/vnd.example.signature",
            "annotations": {"org.example.signer": "alice"},
        }
    ]
    filtered = client.get(
        f"/v2/{REPO}/referrers/{subject.digest}",
        params={"artifactType": "application/vnd.example.sbom"},
        headers=auth,
    )
    assert filtered.json()["manifests"] == []
    assert filtered.headers["oci-filters-applied"] == "artifactType"


def test_deleting_tags_manifests_and_blobs(client: TestClient, alice: Account) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, "repository:alice/churn/app:pull,push,delete"))
    image = make_image()
    assert push_image(client, REPO, image, "v1", auth).status_code == 201
    assert client.delete(f"/v2/{REPO}/manifests/v1", headers=auth).status_code == 202
    assert client.get(f"/v2/{REPO}/manifests/v1", headers=auth).status_code == 404
    assert client.get(f"/v2/{REPO}/manifests/{image.digest}", headers=auth).status_code == 200
    assert client.delete(f"/v2/{REPO}/manifests/{image.digest}", headers=auth).status_code == 202
    gone = client.get(f"/v2/{REPO}/manifests/{image.digest}", headers=auth)
    assert gone.status_code == 404 and errors_of(gone) == ["MANIFEST_UNKNOWN"]
    layer = sha256(image.layers[0])
    assert client.delete(f"/v2/{REPO}/blobs/{layer}", headers=auth).status_code == 202
    missing = client.get(f"/v2/{REPO}/blobs/{layer}", headers=auth)
    assert missing.status_code == 404 and errors_of(missing) == ["BLOB_UNKNOWN"]


def test_cross_repository_mounts_need_pull_on_the_source(
    client: TestClient, alice: Account, bob: Account
) -> None:
    _project(client, alice)
    _project(client, bob, "secret")
    bob_auth = bearer(token(client, bob, push_scope("bob/secret/data")))
    private = b"bob's private weights"
    assert push_blob(client, "bob/secret/data", private, bob_auth).status_code == 201
    auth = bearer(token(client, alice, push_scope(REPO), "repository:alice/churn/base:pull,push"))
    shared = b"a base layer"
    assert push_blob(client, "alice/churn/base", shared, auth).status_code == 201

    mounted = client.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"mount": sha256(shared), "from": "alice/churn/base"},
        headers=auth,
    )
    assert mounted.status_code == 201
    assert mounted.headers["location"] == f"/v2/{REPO}/blobs/{sha256(shared)}"
    assert client.get(f"/v2/{REPO}/blobs/{sha256(shared)}", headers=auth).content == shared

    for params in (
        {"mount": sha256(private), "from": "bob/secret/data"},
        {"mount": sha256(private)},
    ):
        refused = client.post(f"/v2/{REPO}/blobs/uploads/", params=params, headers=auth)
        assert refused.status_code == 202, "a blob alice may not pull must not be mounted"
    assert client.get(f"/v2/{REPO}/blobs/{sha256(private)}", headers=auth).status_code == 404


def test_unknown_routes_and_methods_answer_in_the_oci_format(
    client: TestClient, alice: Account
) -> None:
    auth = alice.headers  # an API key as Bearer works on /v2/ too
    unknown = client.get("/v2/alice/churn/app/nothing/here", headers=auth)
    assert unknown.status_code == 404 and errors_of(unknown)
    wrong = client.post(f"/v2/{REPO}/manifests/v1", headers=auth)
    assert wrong.status_code == 405 and errors_of(wrong) == ["UNSUPPORTED"]


def test_manifest_pushes_and_deletions_are_audited(
    client: TestClient, alice: Account, admin: Account
) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, "repository:alice/churn/app:pull,push,delete"))
    image = make_image()
    assert push_image(client, REPO, image, "v1", auth).status_code == 201
    assert client.delete(f"/v2/{REPO}/manifests/v1", headers=auth).status_code == 202
    events = client.get("/api/v1/audit", headers=admin.headers).json()["items"]
    registry = [
        (e["action"], e["actor_name"], e["target"]) for e in events if "registry" in e["action"]
    ]
    assert ("registry.push", "alice", f"image:{REPO}@{image.digest}") in registry
    assert ("registry.delete", "alice", f"image:{REPO}:v1") in registry


def test_deleting_a_project_drops_its_repositories(
    client: TestClient, alice: Account, engine: Engine, settings: Settings
) -> None:
    _project(client, alice)
    auth = bearer(token(client, alice, push_scope(REPO)))
    assert push_image(client, REPO, make_image(), "v1", auth).status_code == 201
    deleted = client.delete("/api/v1/projects/alice/churn", headers=alice.headers)
    assert deleted.status_code == 204, deleted.text
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(RegistryRepository)) == 0
    later = datetime.now(UTC) + timedelta(hours=2)
    report = collect_garbage(
        make_sessionmaker(engine), BlobStore(settings.registry_dir), settings, now=later
    )
    assert report.blobs_removed == 2  # the layer and the config
    assert [p for p in (settings.registry_dir / "blobs").rglob("*") if p.is_file()] == []
