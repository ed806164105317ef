"""Who may do what in the registry (SQLite and PostgreSQL): project roles and the runtimes
namespace, tokens bound to repositories and to time, strangers told nothing."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from kiln.build.registry.tokens import Grant, issue, service_token, signing_key, verify
from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import User
from kiln.settings import Settings
from tests.conftest import Account
from tests.registry_support import (
    OCI_MANIFEST,
    basic,
    bearer,
    errors_of,
    make_image,
    push_image,
    push_scope,
    token,
)

REPO = "alice/churn/app"
ALL = "pull,push,delete"


@pytest.fixture
def churn(client: TestClient, alice: Account) -> None:
    response = client.post("/api/v1/projects", json={"name": "churn"}, headers=alice.headers)
    assert response.status_code == 201


def _granted(client: TestClient, who: Account, repo: str, actions: str = ALL) -> set[str]:
    raw = token(client, who, f"repository:{repo}:{actions}")
    claims = verify(signing_key(client.app.state.kiln.settings.secret), raw)  # type: ignore[attr-defined]
    return {a for g in claims.grants if g.repository == repo for a in g.actions}


def _collaborator(client: TestClient, owner: Account, who: Account, role: str) -> None:
    response = client.put(
        "/api/v1/projects/alice/churn/collaborators/" + who.username,
        json={"role": role},
        headers=owner.headers,
    )
    assert response.status_code == 200, response.text


def test_project_roles_map_to_pull_push_delete(
    client: TestClient, churn: None, alice: Account, bob: Account, make_user
) -> None:  # type: ignore[no-untyped-def]
    carol, dave = make_user("carol"), make_user("dave")
    _collaborator(client, alice, bob, "viewer")
    _collaborator(client, alice, carol, "contributor")
    _collaborator(client, alice, dave, "operator")
    assert _granted(client, alice, REPO) == {"pull", "push", "delete"}  # owner: admin
    assert _granted(client, bob, REPO) == {"pull"}
    assert _granted(client, dave, REPO) == {"pull"}
    assert _granted(client, carol, REPO) == {"pull", "push"}
    assert _granted(client, carol, REPO, "*") == {"pull", "push"}

    image = make_image()
    as_carol = bearer(token(client, carol, push_scope(REPO)))
    assert push_image(client, REPO, image, "v1", as_carol).status_code == 201
    as_bob = bearer(token(client, bob, push_scope(REPO)))
    assert client.get(f"/v2/{REPO}/manifests/v1", headers=as_bob).status_code == 200
    refused = client.put(
        f"/v2/{REPO}/manifests/v2",
        content=image.manifest,
        headers={**as_bob, "Content-Type": OCI_MANIFEST},
    )
    assert refused.status_code == 401 and errors_of(refused) == ["UNAUTHORIZED"]
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert f'scope="repository:{REPO}:pull,push"' in refused.headers["www-authenticate"]
    no_delete = client.delete(f"/v2/{REPO}/manifests/v1", headers=as_carol)
    assert no_delete.status_code == 401
    assert 'scope="repository:alice/churn/app:delete"' in no_delete.headers["www-authenticate"]


def test_a_stranger_sees_a_private_repository_as_a_missing_one(
    client: TestClient, churn: None, alice: Account, bob: Account
) -> None:
    auth = bearer(token(client, alice, push_scope(REPO)))
    assert push_image(client, REPO, make_image(), "v1", auth).status_code == 201
    answers = []
    for repo in (REPO, "alice/no-such-project/app", "nobody/churn/app"):
        assert _granted(client, bob, repo) == set()
        got = client.get(
            f"/v2/{repo}/manifests/v1",
            headers=bearer(token(client, bob, f"repository:{repo}:pull")),
        )
        challenge = got.headers["www-authenticate"].replace(repo, "REPO")
        message = got.json()["errors"][0]["message"].replace(repo, "REPO")
        answers.append((got.status_code, challenge, message))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 401
    # with his API key directly (no token) the answer is the same too
    direct = client.get(f"/v2/{REPO}/manifests/v1", headers=bob.headers)
    missing = client.get("/v2/alice/no-such-project/app/manifests/v1", headers=bob.headers)
    assert direct.status_code == missing.status_code == 401
    # and once the project is public he may pull, not push
    client.patch(
        "/api/v1/projects/alice/churn", json={"visibility": "public"}, headers=alice.headers
    )
    assert _granted(client, bob, REPO) == {"pull"}


def test_runtimes_are_pulled_by_everyone_and_pushed_by_site_admins(
    client: TestClient, alice: Account, admin: Account
) -> None:
    repo = "runtimes/python"
    assert _granted(client, admin, repo) == {"pull", "push", "delete"}
    assert _granted(client, alice, repo) == {"pull"}
    image = make_image()
    as_alice = bearer(token(client, alice, push_scope(repo)))
    blob = client.post(
        f"/v2/{repo}/blobs/uploads/", headers=as_alice, params={"digest": "sha256:" + "0" * 64}
    )
    assert blob.status_code == 401
    as_admin = bearer(token(client, admin, push_scope(repo)))
    assert push_image(client, repo, image, "3.12", as_admin).status_code == 201
    assert client.get(f"/v2/{repo}/manifests/3.12", headers=as_alice).status_code == 200


def test_credentials_anonymous_passwords_and_api_keys(
    client: TestClient, churn: None, alice: Account
) -> None:
    no_credentials = client.get("/v2/token", params={"scope": f"repository:{REPO}:pull"})
    assert no_credentials.status_code == 401 and errors_of(no_credentials) == ["UNAUTHORIZED"]
    password = client.get("/v2/token", headers=basic(alice.username, alice.password))
    assert password.status_code == 401
    assert "API key" in password.json()["errors"][0]["message"]
    wrong_user = client.get("/v2/token", headers=basic("bob", alice.key))
    assert wrong_user.status_code == 401
    # an API key as Bearer is accepted by the token endpoint, and on /v2/ itself
    assert client.get("/v2/token", headers=alice.headers).status_code == 200
    assert client.get(f"/v2/{REPO}/tags/list", headers=alice.headers).status_code == 404  # empty
    assert client.get("/v2/", headers=basic(alice.username, alice.key)).status_code == 200
    cookie_only = client.get("/v2/", headers={"Cookie": "__Host-kiln_session=x"})
    assert cookie_only.status_code == 401


def test_a_token_is_bound_to_its_repositories_its_site_and_its_lifetime(
    client: TestClient, settings: Settings, churn: None, alice: Account
) -> None:
    other = "alice/churn/other"
    for_app = bearer(token(client, alice, push_scope(REPO)))
    assert push_image(client, REPO, make_image(), "v1", for_app).status_code == 201
    elsewhere = client.get(f"/v2/{other}/tags/list", headers=for_app)
    assert (
        elsewhere.status_code == 401
        and 'error="insufficient_scope"' in elsewhere.headers["www-authenticate"]
    )
    key = signing_key(settings.secret)
    grants = [Grant(REPO, frozenset({"pull"}))]
    expired, _ = issue(
        key, subject="alice", user_id=1, grants=grants, lifetime=60, now=time.time() - 120
    )
    answer = client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(expired))
    assert answer.status_code == 401 and "expired" in answer.json()["errors"][0]["message"]
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    foreign, _ = issue(
        signing_key(b"another site's secret"),
        subject="alice",
        user_id=1,
        grants=grants,
        lifetime=60,
    )
    assert client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(foreign)).status_code == 401
    valid, _ = issue(key, subject="alice", user_id=1, grants=grants, lifetime=60)
    header, body, signature = valid.split(".")
    widened = body[:-4] + ("AAAA" if body[-4:] != "AAAA" else "BBBB")
    tampered = f"{header}.{widened}.{signature}"
    assert client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(tampered)).status_code == 401
    assert client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(valid)).status_code == 200
    # the builder's kind of token: a service, no user
    builder = service_token(settings, "kiln-builder", [Grant(REPO, frozenset({"pull", "push"}))])
    assert (
        push_image(
            client, REPO, make_image({"b": b"built"}), "build-1", bearer(builder)
        ).status_code
        == 201
    )


def test_a_disabled_account_cannot_write_with_a_token_it_still_holds(
    client: TestClient, engine: Engine, churn: None, alice: Account
) -> None:
    auth = bearer(token(client, alice, push_scope(REPO)))
    image = make_image()
    with transaction(make_sessionmaker(engine)) as db:
        db.execute(update(User).where(User.username == "alice").values(is_active=False))
    refused = client.put(
        f"/v2/{REPO}/manifests/v1",
        content=image.manifest,
        headers={**auth, "Content-Type": OCI_MANIFEST},
    )
    assert refused.status_code == 401 and "disabled" in refused.json()["errors"][0]["message"]


@pytest.mark.parametrize("name", ["runtimes", "v2"])
def test_names_the_registry_uses_are_reserved_for_users_and_teams(
    client: TestClient, admin: Account, name: str
) -> None:
    user = client.post(
        "/api/v1/users",
        json={"username": name, "password": "long-enough-password"},
        headers=admin.headers,
    )
    assert user.status_code == 422 and "reserved" in user.json()["detail"]
    team = client.post("/api/v1/teams", json={"name": name}, headers=admin.headers)
    assert team.status_code == 422 and "reserved" in team.json()["detail"]


def test_mapped_names_reach_their_project_and_never_a_newcomers(
    client: TestClient, make_user, admin: Account
) -> None:  # type: ignore[no-untyped-def]
    odd = make_user("x_-y")  # '_-' is no OCI separator: its repositories are x-y/…
    created = client.post("/api/v1/projects", json={"name": "proj"}, headers=odd.headers)
    assert created.status_code == 201
    as_odd = bearer(token(client, odd, push_scope("x-y/proj/app")))
    assert push_image(client, "x-y/proj/app", make_image(), "v1", as_odd).status_code == 201

    plain = make_user("x-y")  # a later user whose own name is that OCI form
    client.post("/api/v1/projects", json={"name": "proj"}, headers=plain.headers)
    assert _granted(client, plain, "x-y/proj/app") == set()  # x_-y's, not hers
    assert _granted(client, odd, "x-y/proj/app") == {"pull", "push", "delete"}
    # new repositories under that form are the exact name's
    assert _granted(client, plain, "x-y/proj/new") == {"pull", "push", "delete"}
    assert _granted(client, odd, "x-y/proj/new") == set()
