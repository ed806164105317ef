"""Bad input to the registry (SQLite and PostgreSQL): each gets a precise OCI error, and
nothing partial becomes visible — no blob, no manifest, no tag, no file under blobs/."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.db.registry_models import RegistryBlob, RegistryManifest, RegistryTag
from kiln.settings import Settings
from tests.conftest import Account
from tests.registry_support import (
    OCI_CONFIG,
    OCI_LAYER,
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


@pytest.fixture
def auth(client: TestClient, alice: Account) -> dict[str, str]:
    response = client.post("/api/v1/projects", json={"name": "churn"}, headers=alice.headers)
    assert response.status_code == 201
    return bearer(token(client, alice, push_scope(REPO)))


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


def _blob_files(settings: Settings) -> list[Path]:
    return [p for p in (settings.registry_dir / "blobs").rglob("*") if p.is_file()]


def _uploads(settings: Settings) -> list[Path]:
    return list((settings.registry_dir / "uploads").iterdir())


def _put_manifest(
    client: TestClient,
    auth: dict[str, str],
    body: bytes,
    media_type: str = OCI_MANIFEST,
    ref: str = "v1",
):  # type: ignore[no-untyped-def]
    return client.put(
        f"/v2/{REPO}/manifests/{ref}", content=body, headers={**auth, "Content-Type": media_type}
    )


def test_bad_manifests_are_refused_and_nothing_is_stored(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    image = make_image()
    for blob in image.blobs:
        assert push_blob(client, REPO, blob, auth).status_code == 201
    document = json.loads(image.manifest)

    not_json = _put_manifest(client, auth, b"{not json")
    assert not_json.status_code == 400 and errors_of(not_json) == ["MANIFEST_INVALID"]
    assert "not valid JSON" in not_json.json()["errors"][0]["message"]

    unknown_type = _put_manifest(client, auth, image.manifest, "application/vnd.example.thing+json")
    assert unknown_type.status_code == 400 and errors_of(unknown_type) == ["MANIFEST_INVALID"]
    assert "unsupported manifest media type" in unknown_type.json()["errors"][0]["message"]

    schema1 = dict(document, schemaVersion=1)
    assert errors_of(_put_manifest(client, auth, json.dumps(schema1).encode())) == [
        "MANIFEST_INVALID"
    ]

    ghost = "sha256:" + "ab" * 32
    missing = dict(document, layers=[{"mediaType": OCI_LAYER, "digest": ghost, "size": 10}])
    answer = _put_manifest(client, auth, json.dumps(missing).encode())
    assert answer.status_code == 404 and errors_of(answer) == ["MANIFEST_BLOB_UNKNOWN"]
    assert answer.json()["errors"][0]["detail"] == {"digest": ghost}

    wrong_size = json.loads(image.manifest)
    wrong_size["config"]["size"] += 1
    answer = _put_manifest(client, auth, json.dumps(wrong_size).encode())
    assert answer.status_code == 400 and "has" in answer.json()["errors"][0]["message"]

    bad_data = json.loads(image.manifest)
    bad_data["config"]["data"] = base64.b64encode(b"not the config").decode()
    assert errors_of(_put_manifest(client, auth, json.dumps(bad_data).encode())) == [
        "MANIFEST_INVALID"
    ]

    by_wrong_digest = _put_manifest(client, auth, image.manifest, ref="sha256:" + "cd" * 32)
    assert by_wrong_digest.status_code == 400 and errors_of(by_wrong_digest) == ["DIGEST_INVALID"]

    too_big = b'{"schemaVersion": 2, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    assert _put_manifest(client, auth, too_big).status_code == 413

    mismatched = _put_manifest(
        client, auth, image.manifest, "application/vnd.oci.image.index.v1+json"
    )
    assert errors_of(mismatched) == ["MANIFEST_INVALID"]

    assert _count(engine, RegistryManifest) == 0 and _count(engine, RegistryTag) == 0
    tags = client.get(f"/v2/{REPO}/tags/list", headers=auth)
    assert tags.json()["tags"] == []


def test_a_blob_that_does_not_match_its_digest_is_never_visible(
    client: TestClient, auth: dict[str, str], engine: Engine, settings: Settings
) -> None:
    claimed = sha256(b"the real content")
    monolithic = client.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"digest": claimed},
        content=b"something else",
        headers=auth,
    )
    assert monolithic.status_code == 400 and errors_of(monolithic) == ["DIGEST_INVALID"]
    assert monolithic.json()["errors"][0]["detail"]["actual"] == sha256(b"something else")

    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    assert client.patch(location, content=b"tampered chunk", headers=auth).status_code == 202
    finished = client.put(location, params={"digest": claimed}, headers=auth)
    assert finished.status_code == 400 and errors_of(finished) == ["DIGEST_INVALID"]
    assert client.get(location, headers=auth).status_code == 404  # the upload is discarded

    malformed = client.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": "sha256:xyz"}, content=b"x", headers=auth
    )
    assert malformed.status_code == 400 and errors_of(malformed) == ["DIGEST_INVALID"]
    unsupported = client.post(
        f"/v2/{REPO}/blobs/uploads/",
        params={"digest": "md5:" + "0" * 32},
        content=b"x",
        headers=auth,
    )
    assert "unsupported digest algorithm" in unsupported.json()["errors"][0]["message"]

    for digest in (claimed, sha256(b"something else"), sha256(b"tampered chunk")):
        assert client.head(f"/v2/{REPO}/blobs/{digest}", headers=auth).status_code == 404
    assert _count(engine, RegistryBlob) == 0
    assert _blob_files(settings) == [] and _uploads(settings) == []


def test_an_upload_over_the_limit_is_refused_and_discarded(
    client: TestClient, auth: dict[str, str], engine: Engine, settings: Settings
) -> None:
    settings.registry.max_upload_bytes = 1000
    data = b"z" * 1500
    declared = push_blob(client, REPO, data, auth)  # Content-Length says it up front
    assert declared.status_code == 413 and errors_of(declared) == ["SIZE_INVALID"]
    assert "1000 bytes" in declared.json()["errors"][0]["message"]
    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    streamed = client.patch(
        location, content=iter([data[:600], data[600:]]), headers=auth
    )  # chunked
    assert streamed.status_code == 413 and errors_of(streamed) == ["SIZE_INVALID"]
    assert client.get(location, headers=auth).status_code == 404
    assert _count(engine, RegistryBlob) == 0
    assert _blob_files(settings) == [] and _uploads(settings) == []


def test_chunks_out_of_order_are_refused_with_the_range_held(
    client: TestClient, auth: dict[str, str]
) -> None:
    location = client.post(f"/v2/{REPO}/blobs/uploads/", headers=auth).headers["location"]
    early = client.patch(location, content=b"abc", headers={**auth, "Content-Range": "5-7"})
    assert early.status_code == 416 and errors_of(early) == ["BLOB_UPLOAD_INVALID"]
    assert early.headers["range"] == "0-0"
    assert (
        client.patch(
            location, content=b"abcd", headers={**auth, "Content-Range": "0-3"}
        ).status_code
        == 202
    )
    again = client.patch(location, content=b"abcd", headers={**auth, "Content-Range": "0-3"})
    assert again.status_code == 416 and again.headers["range"] == "0-3"
    lying = client.patch(location, content=b"ef", headers={**auth, "Content-Range": "4-9"})
    assert lying.status_code == 416  # the range says 6 bytes, the body has 2
    garbage = client.patch(location, content=b"ef", headers={**auth, "Content-Range": "four-five"})
    assert garbage.status_code == 416
    status = client.get(location, headers=auth)
    assert status.headers["range"] == "0-3"  # nothing of the refused chunks was kept


@pytest.mark.parametrize(
    "name",
    [
        "alice/churn/%2E%2E/etc",  # '..' (encoded: a client would resolve it away)
        "alice/churn/a..b",
        "Alice/churn/app",
        "alice/churn/" + "a" * 290,
        "alice/churn/",
        "alice/churn",
        "app",
    ],
)
def test_bad_repository_names_are_refused(
    client: TestClient, auth: dict[str, str], name: str
) -> None:
    for method, path in (("POST", f"/v2/{name}/blobs/uploads/"), ("GET", f"/v2/{name}/tags/list")):
        answer = client.request(method, path, headers=auth)
        assert answer.status_code == 400, (name, answer.text)
        assert errors_of(answer) == ["NAME_INVALID"]


def test_pushing_into_another_users_project_is_refused(
    client: TestClient, auth: dict[str, str], bob: Account, engine: Engine
) -> None:
    image = make_image()
    as_bob = bearer(token(client, bob, push_scope(REPO)))
    answer = push_blob(client, REPO, image.layers[0], as_bob)
    assert answer.status_code == 401 and errors_of(answer) == ["UNAUTHORIZED"]
    # with alice's token for one of her repositories, bob's do not open either
    client.post("/api/v1/projects", json={"name": "private"}, headers=bob.headers)
    sideways = push_blob(client, "bob/private/app", image.layers[0], auth)
    assert sideways.status_code == 401
    assert _count(engine, RegistryBlob) == 0


def test_a_repository_for_a_project_that_does_not_exist_cannot_be_created(
    client: TestClient, admin: Account, engine: Engine
) -> None:
    as_admin = bearer(token(client, admin, push_scope("ghost/project/app")))
    answer = push_blob(client, "ghost/project/app", b"data", as_admin)
    assert answer.status_code == 401  # nothing granted for a project that is not there
    direct = push_blob(client, "ghost/project/app", b"data", admin.headers)
    assert direct.status_code == 401
    assert _count(engine, RegistryBlob) == 0


def test_an_index_naming_a_missing_manifest_is_refused(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    image = make_image()
    assert push_image(client, REPO, image, "v1", auth).status_code == 201
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)},
            {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "ee" * 32, "size": 100},
        ],
    }
    answer = _put_manifest(
        client, auth, json.dumps(index).encode(), "application/vnd.oci.image.index.v1+json", "all"
    )
    assert answer.status_code == 404 and errors_of(answer) == ["MANIFEST_BLOB_UNKNOWN"]
    assert _count(engine, RegistryManifest) == 1  # just the image


def test_config_media_type_is_free_but_descriptors_must_be_complete(
    client: TestClient, auth: dict[str, str]
) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(client, REPO, blob, auth)
    document = json.loads(image.manifest)
    document["config"] = {"digest": sha256(image.config), "size": len(image.config)}
    answer = _put_manifest(client, auth, json.dumps(document).encode())
    assert errors_of(answer) == ["MANIFEST_INVALID"] and "mediaType" in answer.text
    document["config"] = {"mediaType": OCI_CONFIG, "digest": sha256(image.config), "size": -1}
    assert errors_of(_put_manifest(client, auth, json.dumps(document).encode())) == [
        "MANIFEST_INVALID"
    ]
