"""The models pages without a runner or a builder (the rows a runner writes come from
``model_support.serve_from``; the replica behind the test widget is a real model server):
the tab and its empty state, the create form with the access key shown once, bad input
shown with nothing written, the CSRF token required, the model page's sections, the test
widget through the router, replicas and their pages, deploy and rollback by operators, and
what viewers and strangers may see and do."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker, transaction
from tests.conftest import Account
from tests.integration.model_support import serve_from
from tests.integration.test_sessions_support import make_project, share
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(90)

FORM: dict[str, Any] = {
    "name": "adder",
    "description": "adds two numbers",
    "file": "model.py",
    "function": "predict",
    "base": "",
    "profile": "",
    "serving_mode": "threads",
    "concurrency": "2",
}


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


@pytest.fixture
def project(client: TestClient, alice: Account) -> tuple[str, str]:
    """alice's project: (API path, UI path)."""
    api = make_project(client, alice)
    return api, api.replace("/api/v1/projects", "/p")


def models(client: TestClient, api: str, who: Account) -> list[dict[str, Any]]:
    response = client.get(f"{api}/models", headers=who.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def deployments(client: TestClient, api: str, who: Account) -> list[dict[str, Any]]:
    response = client.get(f"{api}/models/adder/deployments", headers=who.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_empty_state_create_and_the_models_page(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    html = alice_ui.page(f"{page}/models")
    assert f'href="{page}/models" class="active">Models</a>' in html
    assert "No models yet" in html and f'href="{page}/models/new"' in html

    form = alice_ui.page(f"{page}/models/new")
    assert 'hx-post="/p/alice/demo/models/new"' in form and 'name="function"' in form
    created = alice_ui.htmx("POST", f"{page}/models/new", data=FORM)
    assert created.status_code == 200, created.text
    key = re.search(r'<pre class="code" id="access-key-value">([a-z0-9]{32})</pre>', created.text)
    assert key, created.text  # shown once, here
    [model] = models(client, api, alice)
    assert (model["file"], model["function"], model["concurrency"]) == ("model.py", "predict", 2)
    assert key.group(1).startswith(model["access_key_prefix"])
    assert model["example_input"] is None

    listed = alice_ui.page(f"{page}/models")
    assert f'href="{page}/models/adder"' in listed and "not deployed" in listed
    html = alice_ui.page(f"{page}/models/adder")
    assert key.group(1) not in html  # never again
    for words in (
        "nothing: the endpoint answers 503",
        "No replicas run.",
        "https://modelservice.kiln.localhost",  # the endpoint in the snippets
        "/modelservice/model",
        "curl -X POST",
        "import requests",
        "library(httr)",
        "No tracked metrics yet",
        "No builds yet",
        "Not deployed yet",
        "no calls in this period",
        'hx-post="/p/alice/demo/models/adder/test"',
        'hx-post="/p/alice/demo/models/adder/deploy"',  # alice may deploy
        "{}</textarea>",  # no example input: the test widget starts empty
        '"request": {}}\'</pre>',  # and so do the snippets
        "request = list()",
    ):
        assert words in html, words
    assert html.count("<svg viewBox") >= 3  # request rate, latency, errors

    # A new access key: shown once; the old one no longer names the model.
    rotated = alice_ui.htmx("POST", f"{page}/models/adder/access-key")
    assert rotated.status_code == 200 and "New access key" in rotated.text
    assert key.group(1) not in rotated.text
    # Tracked metrics: an aggregate posted through the API shows in the page's table.
    recorded = client.post(
        f"{api}/models/adder/metrics",
        json={
            "start_timestamp_ms": 1_700_000_000_000,
            "end_timestamp_ms": 1_700_000_060_000,
            "metrics": {"accuracy": 0.91},
        },
        headers=alice.headers,
    )
    assert recorded.status_code == 201, recorded.text
    html = alice_ui.page(f"{page}/models/adder")
    assert "No tracked metrics yet" not in html
    assert "2023-11-14 22:13:20 UTC" in html and "{&#34;accuracy&#34;: 0.91}" in html
    assert "aggregate" in html
    # A model build (queued: no builder here) is listed with its build's log link.
    built = alice_ui.htmx("POST", f"{page}/models/adder/builds", data={"comment": "first"})
    assert built.status_code == 204, built.text
    html = alice_ui.page(f"{page}/models/adder")
    assert "first" in html and f'href="{page}/builds/1"' in html

    deleted = alice_ui.htmx("POST", f"{page}/models/adder/delete")
    assert deleted.status_code == 204 and deleted.headers["hx-redirect"] == f"{page}/models"
    assert models(client, api, alice) == [] and "No models yet" in alice_ui.page(f"{page}/models")
    alice_ui.page(f"{page}/models/adder", status=404)


def test_bad_input_is_shown_and_nothing_is_written(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    cases = {
        "name": ("Not A Name", "name"),
        "file": ("../model.py", "must be a relative path"),
        "function": ("1abc", "function"),
        "concurrency": ("many", "concurrency must be a whole number"),
        "serving_mode": ("fibres", "serving_mode must be one of threads, processes"),
        "profile": ("huge", "no resource profile named 'huge'"),
    }
    for field, (value, message) in cases.items():
        response = alice_ui.htmx("POST", f"{page}/models/new", data=FORM | {field: value})
        assert 400 <= response.status_code < 500, (field, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert message in response.json()["detail"], (field, response.json())
    for example, message in (
        ("{not json", "the example input is not JSON"),
        ("[" * 101 + "]" * 101, "nested more than 100 levels"),
        (f'"{"x" * 65536}"', "at most 65536"),
        ("NaN", "NaN or infinity"),
    ):
        response = alice_ui.htmx(
            "POST", f"{page}/models/new", data=FORM | {"example_input": example}
        )
        assert response.status_code == 422, (example[:20], response.text)
        assert message in response.json()["detail"], response.json()
        assert response.json()["errors"][0]["field"] == "example_input"  # shown at the field
    too_many = alice_ui.htmx("POST", f"{page}/models/new", data=FORM | {"concurrency": "999"})
    assert too_many.status_code == 422, too_many.text
    assert models(client, api, alice) == []

    assert alice_ui.htmx("POST", f"{page}/models/new", data=FORM).status_code == 200
    for path, data, message in (
        ("deploy", {"replicas": "two"}, "replicas must be a whole number"),
        ("deploy", {"build": "7"}, "build"),
        ("deploy", {"env": "NOEQUALS"}, "NAME=VALUE"),
        ("scale", {"replicas": ""}, "how many replicas"),
        ("test", {"request": "{not json"}, "the request is not JSON"),
        ("test", {"request": "[" * 200 + "]" * 200}, "nested"),
    ):
        response = alice_ui.htmx("POST", f"{page}/models/adder/{path}", data=data)
        assert 400 <= response.status_code < 500, (path, response.text)
        assert message in response.json()["detail"], (path, response.json())
    assert deployments(client, api, alice) == []
    assert alice_ui.htmx("GET", f"{page}/models/adder/stats?range=week").status_code == 422


def test_the_example_input_fills_the_test_widget_and_the_snippets(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    example = '{"a": 1, "b": 2.5, "who": "O\'Brien", "ok": true, "none": null}'
    form = alice_ui.page(f"{page}/models/new")
    assert '<textarea name="example_input"' in form and "Example input (JSON)" in form
    made = alice_ui.htmx("POST", f"{page}/models/new", data=FORM | {"example_input": example})
    assert made.status_code == 200, made.text
    [model] = models(client, api, alice)
    expected = {"a": 1, "b": 2.5, "who": "O'Brien", "ok": True, "none": None}
    assert model["example_input"] == expected
    html = alice_ui.page(f"{page}/models/adder")
    textarea = re.search(r'<textarea name="request"[^>]*>(.*?)</textarea>', html, re.S)
    assert textarea, html
    pretty = textarea.group(1).replace("&#34;", '"').replace("&#39;", "'")
    assert pretty.startswith('{\n  "a": 1,\n') and json.loads(pretty) == expected
    snippets = {
        lang: re.search(rf'<pre class="code" id="snippet-{lang}">(.*?)</pre>', html, re.S)
        for lang in ("curl", "python", "r")
    }
    text = {
        k: v.group(1).replace("&#34;", '"').replace("&#39;", "'") for k, v in snippets.items() if v
    }
    assert len(text) == 3, html
    # curl: the JSON in single quotes, O'Brien's quote closed and reopened for the shell.
    assert (
        """"request": {"a": 1, "b": 2.5, "who": "O'\\''Brien", "ok": true, "none": null}}'"""
        in text["curl"]
    )
    # Python: a literal the snippet sends; R: JSON text jsonlite reads into lists.
    assert (
        "request = {'a': 1, 'b': 2.5, 'who': \"O'Brien\", 'ok': True, 'none': None}"
        in (text["python"])
    )
    assert '"request": request}' in text["python"]
    assert 'jsonlite::fromJSON(\'{"a": 1, "b": 2.5, "who": "O\\\'Brien"' in text["r"]
    assert "request = request)" in text["r"]

    # A change through the API shows at once; removing it brings back {}.
    for value, shown in (([1, 2], "[\n  1,\n  2\n]</textarea>"), (None, ">{}</textarea>")):
        changed = client.patch(
            f"{api}/models/adder", json={"example_input": value}, headers=alice.headers
        )
        assert changed.status_code == 200, changed.text
        assert shown in alice_ui.page(f"{page}/models/adder")


def test_the_csrf_token_is_required(
    alice_ui: UiClient, client: TestClient, alice: Account, project: tuple[str, str]
) -> None:
    api, page = project
    wrong = {"X-CSRF-Token": "wrong"}
    forged = alice_ui.htmx("POST", f"{page}/models/new", data=FORM, headers=wrong)
    assert forged.status_code == 403
    assert alice_ui.http.post(f"{page}/models/new", data=FORM).status_code == 403
    assert models(client, api, alice) == []
    assert alice_ui.htmx("POST", f"{page}/models/new", data=FORM).status_code == 200
    for action, data in (
        ("test", {"request": "{}"}),
        ("deploy", {}),
        ("builds", {}),
        ("access-key", {}),
        ("delete", {}),
    ):
        response = alice_ui.htmx("POST", f"{page}/models/adder/{action}", data=data, headers=wrong)
        assert response.status_code == 403, action
    assert len(models(client, api, alice)) == 1 and deployments(client, api, alice) == []


def test_viewers_see_and_test_but_do_not_deploy_and_strangers_see_nothing(
    app: FastAPI,
    alice_ui: UiClient,
    client: TestClient,
    alice: Account,
    bob: Account,
    make_user: Any,
    engine: Engine,
    project: tuple[str, str],
    replicas: Any,
) -> None:
    api, page = project
    assert alice_ui.htmx("POST", f"{page}/models/new", data=FORM).status_code == 200
    serve_from(engine, "adder", replicas(1))
    share(client, api, alice, bob, "viewer")
    bob_ui = sign_in(app, bob.username, bob.password)
    html = bob_ui.page(f"{page}/models/adder")
    assert 'data-serving="1"' in html and 'data-replica="replica0"' in html
    assert "/deploy" not in html and "/scale" not in html and "New access key" not in html
    assert "Delete model" not in html
    bob_ui.page(f"{page}/models/new", status=403)
    for action, data in (
        ("deploy", {"build": "1"}),
        ("scale", {"replicas": "3"}),
        ("stop", {}),
        ("builds", {}),
        ("access-key", {}),
        ("delete", {}),
    ):
        assert bob_ui.htmx("POST", f"{page}/models/adder/{action}", data=data).status_code == 403
    [serving] = deployments(client, api, alice)
    assert (serving["state"], serving["replicas"]) == ("serving", 1)

    # The test widget: bob may call the model (as with a model API key), through the router.
    # One event loop for the calls, as in a server (the router keeps connections per loop).
    with bob_ui.http:
        answer = bob_ui.htmx(
            "POST", f"{page}/models/adder/test", data={"request": '{"a": 2, "b": 3}'}
        )
        assert answer.status_code == 200, answer.text
        assert 'data-status="200"' in answer.text and "replica0" in answer.text
        assert "&#34;sum&#34;: 5" in answer.text
        failed = bob_ui.htmx("POST", f"{page}/models/adder/test", data={"request": '{"a": 2}'})
        assert re.search(r'data-status="[45]\d\d"', failed.text), failed.text
        app.model_router.stats.flush()  # type: ignore[attr-defined]
        stats = bob_ui.htmx("GET", f"{page}/models/adder/stats?range=day")
    assert 'data-range="day"' in stats.text and "Last day: 2 calls, 1 error" in stats.text

    # The replica's page, and its log through the poller shared with job runs and builds.
    replica = bob_ui.page(f"{page}/models/adder/replicas/replica0")
    assert 'data-replica-state="running"' in replica and "#1" in replica
    assert 'hx-get="/p/alice/demo/models/adder/replicas/replica0/log?' in replica
    log = bob_ui.htmx("GET", f"{page}/models/adder/replicas/replica0/log?offset=0")
    assert log.status_code == 200 and 'id="log-poller"' in log.text
    bob_ui.page(f"{page}/models/adder/replicas/nope", status=404)

    carol = make_user("carol")
    carol_ui = sign_in(app, carol.username, carol.password)
    for path in ("", "/adder", "/adder/replicas/replica0", "/adder/stats", "/adder/status"):
        carol_ui.page(f"{page}/models{path}", status=404)
    stranger = carol_ui.htmx("POST", f"{page}/models/adder/test", data={"request": "{}"})
    assert stranger.status_code == 404


def test_operators_deploy_scale_roll_back_and_stop(
    app: FastAPI,
    alice_ui: UiClient,
    client: TestClient,
    alice: Account,
    bob: Account,
    engine: Engine,
    project: tuple[str, str],
) -> None:
    api, page = project
    assert alice_ui.htmx("POST", f"{page}/models/new", data=FORM).status_code == 200
    serve_from(engine, "adder", {"r0": "127.0.0.1:1"})  # build 1, serving
    serve_from(engine, "adder", {"r1": "127.0.0.1:2"})  # build 2, serving now
    with transaction(make_sessionmaker(engine)) as db:  # the images the builder would push
        db.execute(update(Build).values(image_digest="sha256:" + "a" * 64))
    share(client, api, alice, bob, "operator")
    bob_ui = sign_in(app, bob.username, bob.password)
    html = bob_ui.page(f"{page}/models/adder")
    assert "Roll back to this" in html and 'hx-post="/p/alice/demo/models/adder/deploy"' in html
    rollback = bob_ui.htmx("POST", f"{page}/models/adder/deploy", data={"build": "1"})
    assert rollback.status_code == 204, rollback.text
    assert rollback.headers["hx-redirect"] == f"{page}/models/adder"
    newest = deployments(client, api, alice)[0]
    assert (newest["build"], newest["state"], newest["replicas"]) == (1, "deploying", 1)
    scaled = bob_ui.htmx("POST", f"{page}/models/adder/scale", data={"replicas": "2"})
    assert scaled.status_code == 204, scaled.text
    assert deployments(client, api, alice)[0]["replicas"] == 2
    status = bob_ui.htmx("GET", f"{page}/models/adder/status")
    assert "is starting" in status.text and 'data-deployment-state="serving"' in status.text
    assert bob_ui.htmx("POST", f"{page}/models/adder/stop").status_code == 204
    assert {d["state"] for d in deployments(client, api, alice)} <= {"stopped", "draining"}
