"""Model builds through the API without a builder: a queued source-to-image build with the
model server's layer and the server as the image's command, numbered per model; roles,
strangers, unknown models and bad input. Builds that run: test_model_image.py."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.build.serving_layer import SERVER_PATH
from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker
from kiln.db.model_models import ModelBuild
from tests.conftest import Account
from tests.integration.test_models_api import create
from tests.integration.test_sessions_support import make_project, share


def build(client: TestClient, project: str, who: Account, **body: Any) -> dict[str, Any]:
    response = client.post(f"{project}/models/adder/builds", json=body, headers=who.headers)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def counts(engine: Engine) -> tuple[int, int]:
    with make_sessionmaker(engine)() as db:
        return (
            int(db.scalar(select(func.count()).select_from(ModelBuild)) or 0),
            int(db.scalar(select(func.count()).select_from(Build)) or 0),
        )


def test_a_model_build_is_a_queued_image_build_with_the_server(
    client: TestClient, alice: Account, engine: Engine
) -> None:
    project = make_project(client, alice)
    create(client, project, alice, concurrency=3)
    first = build(client, project, alice, comment="first version")
    assert (first["number"], first["model"], first["comment"]) == (1, "adder", "first version")
    assert (first["file"], first["function"], first["created_by"]) == (
        "model.py",
        "predict",
        "alice",
    )
    assert first["build"]["state"] == "queued" and first["build"]["number"] == 1
    assert first["build"]["command"] == [
        "python3", SERVER_PATH, "--file", "model.py", "--function", "predict",
        "--port", "8080", "--threads", "3", "--processes", "1",
    ]  # fmt: skip
    with make_sessionmaker(engine)() as db:
        row = db.scalar(select(Build).where(Build.workload_id == first["build"]["id"]))
        assert row is not None and row.serving is True
    # Processes mode, a new file: the next build follows the model as it is then.
    response = client.patch(
        f"{project}/models/adder",
        json={"serving_mode": "processes", "file": "serve.py"},
        headers=alice.headers,
    )
    assert response.status_code == 200
    second = build(client, project, alice, commit="main")
    assert second["number"] == 2 and second["file"] == "serve.py"
    assert second["build"]["source_commit"] == "main"
    assert second["build"]["command"][-4:] == ["--threads", "1", "--processes", "3"]
    # An ordinary build of the project takes the next project build number, no server.
    plain = client.post(f"{project}/builds", json={}, headers=alice.headers).json()
    assert plain["number"] == 3 and plain["command"] == ["python3"]
    listed = client.get(f"{project}/models/adder/builds?limit=1", headers=alice.headers).json()
    assert [b["number"] for b in listed["items"]] == [2]
    rest = client.get(
        f"{project}/models/adder/builds?cursor={listed['next_cursor']}", headers=alice.headers
    ).json()
    assert [b["number"] for b in rest["items"]] == [1] and rest["next_cursor"] is None
    got = client.get(f"{project}/models/adder/builds/1", headers=alice.headers).json()
    assert got == {**first, "build": got["build"]} and got["build"]["id"] == first["build"]["id"]
    # Deleting the model removes its builds' rows (the project's builds stay).
    assert client.delete(f"{project}/models/adder", headers=alice.headers).status_code == 204
    assert counts(engine) == (0, 3)


def test_roles_and_strangers(
    client: TestClient, alice: Account, bob: Account, make_user: Any
) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    build(client, project, alice)
    for method, path in (
        ("GET", "/models/adder/builds"),
        ("GET", "/models/adder/builds/1"),
        ("POST", "/models/adder/builds"),
    ):
        response = client.request(method, f"{project}{path}", headers=bob.headers, json={})
        assert response.status_code == 404, (method, path, response.text)
    share(client, project, alice, bob, "operator")
    assert client.get(f"{project}/models/adder/builds/1", headers=bob.headers).status_code == 200
    response = client.post(f"{project}/models/adder/builds", headers=bob.headers, json={})
    assert response.status_code == 403 and "contributor" in response.json()["detail"]
    carol = make_user("carol")
    share(client, project, alice, carol, "contributor")
    assert build(client, project, carol)["created_by"] == "carol"


def test_bad_input_and_unknown_things(client: TestClient, alice: Account, engine: Engine) -> None:
    project = make_project(client, alice)
    create(client, project, alice)
    for body, words in (
        ({"commit": "--upload-pack=x"}, "not a commit name"),
        ({"commit": 5}, "commit"),
        ({"comment": "x" * 501}, "comment"),
        ({"comment": "a\u0001b"}, "control characters"),
    ):
        response = client.post(f"{project}/models/adder/builds", json=body, headers=alice.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert words in response.text, (body, response.text)
    assert counts(engine) == (0, 0)
    for path, status in (
        ("/models/nope/builds", 404),
        ("/models/adder/builds/1", 404),
        ("/models/adder/builds/0", 422),
        ("/models/adder/builds/x", 422),
    ):
        response = client.get(f"{project}{path}", headers=alice.headers)
        assert response.status_code == status, (path, response.text)
    response = client.post(f"{project}/models/nope/builds", json={}, headers=alice.headers)
    assert response.status_code == 404 and "no model 'nope'" in response.json()["detail"]
