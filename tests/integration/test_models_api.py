"""The models API: create, read, change, rotate the access key, delete; model API keys.
Roles, strangers, cross-tenant paths, and bad input as precise problem+json with nothing
written. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model, ModelApiKey
from kiln.db.models import AuditEvent
from kiln.domain.passwords import hash_token
from kiln.domain.resources import Resources, create_profile
from kiln.settings import Settings
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project, share

KEYS = "/api/v1/auth/model-api-keys"
MODEL = {"name": "adder", "file": "model.py", "function": "predict"}


def create(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/models", json={**MODEL, **body}, headers=who.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def count(engine: Engine, table: type[Any] = Model) -> int:
    with make_sessionmaker(engine)() as db:
        return int(db.scalar(select(func.count()).select_from(table)) or 0)


def problem(response: Any, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert words in response.json()["detail"], response.text


def test_create_read_change_rotate_delete(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    created = create(client, project, alice, description="adds two numbers", concurrency=8)
    key = created.pop("access_key")
    assert len(key) == 32 and key.isalnum() and key.islower()
    assert created["access_key_prefix"] == key[:6]
    assert created["project"] == "alice/demo" and created["created_by"] == "alice"
    assert (created["serving_mode"], created["concurrency"]) == ("threads", 8)
    assert created["allow_unauthenticated"] is False and created["base"] is None
    with make_sessionmaker(engine)() as db:  # only the key's hash is kept
        row = db.scalar(select(Model))
        assert row is not None and row.access_key_hash == hash_token(key)
        assert key not in str([getattr(row, c.key) for c in Model.__table__.columns])
    got = client.get(f"{project}/models/adder", headers=alice.headers).json()
    assert got == {**created, "updated_at": got["updated_at"]}
    listed = client.get(f"{project}/models", headers=alice.headers).json()
    assert [m["name"] for m in listed["items"]] == ["adder"] and listed["next_cursor"] is None

    changed = client.patch(
        f"{project}/models/adder",
        json={"file": "src/serve.py", "serving_mode": "processes", "description": None},
        headers=alice.headers,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["file"], body["serving_mode"]) == ("src/serve.py", "processes")
    assert body["description"] == "adds two numbers"  # null leaves it as it is

    rotated = client.post(f"{project}/models/adder/access-key", headers=alice.headers)
    assert rotated.status_code == 200
    new_key = rotated.json()["access_key"]
    assert new_key != key
    with make_sessionmaker(engine)() as db:
        row = db.scalar(select(Model))
        assert row is not None and row.access_key_hash == hash_token(new_key)

    assert client.delete(f"{project}/models/adder", headers=alice.headers).status_code == 204
    problem(client.get(f"{project}/models/adder", headers=alice.headers), 404, "no model 'adder'")
    assert count(engine) == 0
    create(client, project, alice)  # the name is free again
    with make_sessionmaker(engine)() as db:
        actions = list(
            db.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.action.like("model.%"))
                .order_by(AuditEvent.id)
            )
        )
        update = db.scalar(select(AuditEvent).where(AuditEvent.action == "model.update"))
        assert update is not None
        assert update.details["changed"] == ["file", "serving_mode"]
    assert actions == [
        "model.create",
        "model.update",
        "model.access_key.rotate",
        "model.delete",
        "model.create",
    ]


def test_names_are_per_project_and_unique_within(client: TestClient, alice: Account) -> None:
    one, two = make_project(client, alice, "one"), make_project(client, alice, "two")
    create(client, one, alice)
    create(client, two, alice)
    problem(client.post(f"{one}/models", json=MODEL, headers=alice.headers), 409, "already exists")
    create(client, one, alice, name="other")
    problem(
        client.patch(f"{one}/models/other", json={"name": "adder"}, headers=alice.headers),
        409,
        "already exists",
    )


def test_roles_strangers_and_other_projects(
    client: TestClient, alice: Account, bob: Account, make_user: Any, engine: Engine
) -> None:
    carol = make_user("carol")
    project = make_project(client, alice)
    create(client, project, alice)
    calls = [
        ("GET", "/models", None),
        ("GET", "/models/adder", None),
        ("POST", "/models", {**MODEL, "name": "x"}),
        ("PATCH", "/models/adder", {"concurrency": 2}),
        ("POST", "/models/adder/access-key", None),
        ("DELETE", "/models/adder", None),
    ]
    # A stranger cannot tell the project (or its models) exist.
    for method, path, body in calls:
        response = client.request(method, f"{project}{path}", headers=bob.headers, json=body)
        assert response.status_code == 404, (method, path, response.text)
    # Viewers and operators read; changing models is writing: contributors and up.
    for role in ("viewer", "operator"):
        share(client, project, alice, bob, role)
        for method, path, body in calls:
            response = client.request(method, f"{project}{path}", headers=bob.headers, json=body)
            expected = 200 if method == "GET" else 403
            assert response.status_code == expected, (role, method, path, response.text)
    share(client, project, alice, carol, "contributor")
    create(client, project, carol, name="carols")
    # Bob's own project does not reach Alice's model by its name.
    mine = make_project(client, bob, "mine")
    problem(client.get(f"{mine}/models/adder", headers=bob.headers), 404, "no model 'adder'")
    problem(client.patch(f"{mine}/models/adder", json={}, headers=bob.headers), 404, "no model")
    assert count(engine) == 2


def test_switching_authentication_off(
    client: TestClient, alice: Account, bob: Account, settings: Settings
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    off = {"allow_unauthenticated": True}
    problem(
        client.patch(f"{project}/models/adder", json=off, headers=alice.headers),
        403,
        "this site does not allow models without authentication",
    )
    problem(
        client.post(f"{project}/models", json={**MODEL, "name": "b", **off}, headers=alice.headers),
        403,
        "KILN_MODELS_ALLOW_UNAUTHENTICATED",
    )
    settings.models.allow_unauthenticated = True
    share(client, project, alice, bob, "contributor")
    problem(
        client.patch(f"{project}/models/adder", json=off, headers=bob.headers),
        403,
        "needs the admin role",
    )
    response = client.patch(f"{project}/models/adder", json=off, headers=alice.headers)
    assert response.status_code == 200 and response.json()["allow_unauthenticated"] is True
    # Other changes by a contributor leave the admin's choice alone.
    response = client.patch(
        f"{project}/models/adder", json={"concurrency": 2, **off}, headers=bob.headers
    )
    assert response.status_code == 200, response.text


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"name": "Adder"}, "name 'Adder' is not valid"),
    ({"name": "-x"}, "is not valid"),
    ({"name": "a_b"}, "is not valid"),
    ({"name": "a" * 65}, "name"),
    ({"name": 5}, "name"),
    ({"file": "../x.py"}, "relative path inside the project"),
    ({"file": "/etc/x.py"}, "relative path inside the project"),
    ({"file": "a//b.py"}, "relative path inside the project"),
    ({"file": ".git/hooks/x.py"}, "relative path inside the project"),
    ({"file": "a\u0001.py"}, "control characters"),
    ({"file": "model.R"}, "must be a Python file"),
    ({"file": "m\u0000.py"}, "NUL"),
    ({"function": "1x"}, "name of a Python function"),
    ({"function": "a-b"}, "name of a Python function"),
    ({"function": "f\u00e9"}, "name of a Python function"),
    ({"function": "x" * 201}, "function"),
    ({"base": "library/python:3.11"}, "runtimes/"),
    ({"base": "runtimes/../x"}, "base"),
    ({"profile": "huge"}, "no resource profile named 'huge'"),
    ({"serving_mode": "forks"}, "serving_mode must be one of threads, processes"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": 65}, "concurrency"),
    ({"concurrency": "4"}, "concurrency"),
    ({"allow_unauthenticated": "yes"}, "allow_unauthenticated"),
    ({"description": "x" * 2001}, "description"),
]


def test_bad_input_is_a_precise_422_and_writes_nothing(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    for body, words in BAD_BODIES:
        response = client.post(f"{project}/models", json={**MODEL, **body}, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert words in response.text, (body, response.text)
    for missing in ("name", "file", "function"):
        body = {k: v for k, v in MODEL.items() if k != missing}
        response = client.post(f"{project}/models", json=body, headers=alice.headers)
        assert response.status_code == 422 and missing in response.text, response.text
    for raw in (b"not json", b"[]", b'"x"'):
        response = client.post(
            f"{project}/models",
            content=raw,
            headers={**alice.headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
    assert count(engine) == 0
    create(client, project, alice)
    for body, words in BAD_BODIES:
        response = client.patch(f"{project}/models/adder", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert words in response.text, (body, response.text)
    unchanged = client.get(f"{project}/models/adder", headers=alice.headers).json()
    assert (unchanged["file"], unchanged["function"], unchanged["concurrency"]) == (
        "model.py",
        "predict",
        4,
    )


def test_a_profile_by_name(client: TestClient, alice: Account, engine: Engine) -> None:
    with transaction(make_sessionmaker(engine)) as db:
        create_profile(db, "small", Resources(500, 1024**3, 0))
    project = make_project(client, alice)
    assert create(client, project, alice, profile="small")["profile"] == "small"
    response = client.patch(f"{project}/models/adder", json={"profile": ""}, headers=alice.headers)
    assert response.status_code == 200 and response.json()["profile"] is None


def test_unknown_models_and_bad_paths(client: TestClient, alice: Account) -> None:
    project = make_project(client, alice)
    for path, status in (
        ("/models/nope", 404),
        ("/models/NOPE", 404),
        ("/models/" + "a" * 65, 422),
        ("/models/%00", 400),  # the web tier refuses a NUL anywhere in a URL
    ):
        response = client.get(f"{project}{path}", headers=alice.headers)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    for query in ("cursor=%%%", "limit=0", "limit=201"):
        response = client.get(f"{project}/models?{query}", headers=alice.headers)
        assert response.status_code == 422, (query, response.text)
    response = client.get("/api/v1/projects/nobody/nothing/models", headers=alice.headers)
    assert response.status_code == 404


def test_model_api_keys(client: TestClient, alice: Account, bob: Account, engine: Engine) -> None:
    made = client.post(KEYS, json={"name": "ci"}, headers=alice.headers)
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["key"].startswith("kilnm_") and key["prefix"] == key["key"][:12]
    lifetime = _days(key["expires_at"]) - _days(key["created_at"])
    assert 364.9 < lifetime < 365.1
    forever = client.post(KEYS, json={"never_expires": True}, headers=alice.headers).json()
    assert forever["expires_at"] is None
    short = client.post(KEYS, json={"expires_in_days": 7}, headers=alice.headers).json()
    assert 6.9 < _days(short["expires_at"]) - _days(short["created_at"]) < 7.1
    listed = client.get(KEYS, headers=alice.headers).json()
    assert [k["id"] for k in listed] == [key["id"], forever["id"], short["id"]]
    assert all("key" not in k for k in listed)
    assert client.get(KEYS, headers=bob.headers).json() == []
    # A model API key opens nothing but model calls, and says so.
    problem(
        client.get(KEYS, headers={"Authorization": f"Bearer {key['key']}"}),
        401,
        "a model API key only calls models",
    )
    # Revoking: one's own keys only.
    problem(client.delete(f"{KEYS}/{key['id']}", headers=bob.headers), 404, "not found")
    assert client.delete(f"{KEYS}/{key['id']}", headers=alice.headers).status_code == 204
    problem(client.delete(f"{KEYS}/{key['id']}", headers=alice.headers), 404, "not found")
    assert [k["id"] for k in client.get(KEYS, headers=alice.headers).json()] == [
        forever["id"],
        short["id"],
    ]
    before = count(engine, ModelApiKey)
    for body, words in (
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": 4000}, "expires_in_days"),
        ({"expires_in_days": 5, "never_expires": True}, "not both"),
        ({"never_expires": "yes"}, "never_expires"),
        ({"name": "x" * 101}, "name"),
    ):
        response = client.post(KEYS, json=body, headers=alice.headers)
        assert response.status_code == 422 and words in response.text, (body, response.text)
    assert count(engine, ModelApiKey) == before
    for path in (f"{KEYS}/0", f"{KEYS}/abc", f"{KEYS}/99999999999"):
        assert client.delete(path, headers=alice.headers).status_code == 422
    assert client.post(KEYS, json={}).status_code == 401
    with make_sessionmaker(engine)() as db:
        actions = list(
            db.scalars(select(AuditEvent.action).where(AuditEvent.action.like("model_api_key.%")))
        )
    assert actions.count("model_api_key.create") == 3 and "model_api_key.revoke" in actions


def _days(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() / 86400


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_an_example_input(
    client: TestClient, alice: Account, bob: Account, make_user: Any, engine: Engine
) -> None:
    """Any JSON value, kept as given; null removes it; too big, too deep or NaN is a 422
    that writes nothing; only contributors and up change it; strangers do not see it."""
    project = make_project(client, alice)
    assert create(client, project, alice)["example_input"] is None
    made = create(client, project, alice, name="ex", example_input={"a": 1, "b": [2, None]})
    assert made["example_input"] == {"a": 1, "b": [2, None]}
    url = f"{project}/models/ex"
    assert client.get(url, headers=alice.headers).json()["example_input"] == made["example_input"]
    limit = "x" * (64 * 1024 - 2)  # exactly 64 KiB of JSON with its quotes
    values = ("a string", ["nul \u0000 inside"], 3, 2.5, True, [1, {"y": False}], {}, _nested(100))
    for value in (*values, limit):
        response = client.patch(url, json={"example_input": value}, headers=alice.headers)
        assert response.status_code == 200, (value, response.text)
        assert response.json()["example_input"] == value
    kept = client.patch(url, json={"concurrency": 2}, headers=alice.headers).json()
    assert kept["example_input"] == limit  # a patch without it leaves it

    bad: list[tuple[bytes, str]] = [
        (b'{"example_input": NaN}', "must not hold NaN or infinity"),
        (b'{"example_input": "a\\u0000"}', "must not contain a NUL"),  # as every text field
        (b'{"example_input": [Infinity]}', "must not hold NaN or infinity"),
        (b'{"example_input": "' + b"x" * 64 * 1024 + b'"}', "65538 bytes of JSON"),
        (f'{{"example_input": {[_nested(101)]}}}'.encode(), "nested more than 100 levels"),
    ]
    models_before = count(engine)
    for raw, words in bad:
        headers = {**alice.headers, "Content-Type": "application/json"}
        body = raw[:1] + b'"name": "other", "file": "m.py", "function": "f", ' + raw[1:]
        problem(client.post(f"{project}/models", content=body, headers=headers), 422, words)
        problem(client.patch(url, content=raw, headers=headers), 422, words)
    assert count(engine) == models_before
    assert client.get(url, headers=alice.headers).json()["example_input"] == limit

    # Viewers see it but do not change it; strangers see nothing.
    carol = make_user("carol")
    share(client, project, alice, bob, "viewer")
    problem(
        client.patch(url, json={"example_input": 1}, headers=bob.headers),
        403,
        "needs the contributor role",
    )
    problem(client.get(url, headers=carol.headers), 404, "")
    problem(client.patch(url, json={"example_input": 1}, headers=carol.headers), 404, "")
    assert client.get(url, headers=bob.headers).json()["example_input"] == limit

    removed = client.patch(url, json={"example_input": None}, headers=alice.headers)
    assert removed.status_code == 200 and removed.json()["example_input"] is None
    with make_sessionmaker(engine)() as db:  # SQL NULL, not JSON 'null'
        stored = db.execute(text("SELECT example_input IS NULL FROM models WHERE name = 'ex'"))
        assert stored.scalar_one() in (True, 1)
        changes = db.scalars(
            select(AuditEvent.details).where(AuditEvent.action == "model.update")
        ).all()
    assert {"example_input"} in [set(c["changed"]) for c in changes]
