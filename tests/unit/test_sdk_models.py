"""``kiln.sdk.Client``'s models part against a stand-in transport: what a model call sends
(the model API key, never the client's own API key), how refusals and failed functions are
reported, which build a rollback deploys, and names checked before anything is sent. (The
real thing, through the live server and the model router: tests/integration/
test_cli_models.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kiln.sdk import Client, KilnSDKError
from kiln.sdk.model_serving import ModelCallError

API_KEY = "kiln_own-api-key"
SITE = "https://kiln.test:8443/"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


def client(seen: list[httpx.Request], answer: Handler) -> Client:
    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answer(request)

    return Client(SITE, API_KEY, transport=httpx.MockTransport(handle))


def test_a_call_sends_cmls_body_with_the_model_api_key_only(seen: list[httpx.Request]) -> None:
    answer = {"success": True, "response": {"sum": 3}, "ReplicaID": "r1"}
    with client(seen, lambda _: httpx.Response(200, json=answer)) as kiln:
        assert kiln.call_model("k" * 32, {"a": 1, "b": 2}, "kilnm_secret") == answer
        kiln.call_model("k" * 32, [1, 2], None, url="https://modelservice.kiln.test/model")
    first, second = seen
    assert str(first.url) == f"{SITE}modelservice/model"
    assert json.loads(first.content) == {"accessKey": "k" * 32, "request": {"a": 1, "b": 2}}
    assert first.headers["authorization"] == "Bearer kilnm_secret"
    # Without a model API key no Authorization goes out at all: never the client's own key.
    assert str(second.url) == "https://modelservice.kiln.test/model"
    assert "authorization" not in second.headers
    assert API_KEY not in str(first.headers) + str(second.headers)


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (401, {"detail": "the access key names no model", "success": False}, "names no model"),
        (503, {"detail": "no replica is ready", "success": False}, "no replica is ready"),
        (
            500,
            {"success": False, "response": {"message": "'b'", "type": "KeyError"}},
            "KeyError: 'b'",
        ),
        (502, "<html>bad gateway</html>", "<html>bad gateway</html>"),
        (200, "not json", "not a model's answer: not json"),
    ],
)
def test_refusals_and_failed_functions(
    seen: list[httpx.Request], status: int, body: Any, detail: str
) -> None:
    def answer(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    with client(seen, answer) as kiln, pytest.raises(ModelCallError) as info:
        kiln.call_model("k" * 32, {}, "kilnm_x")
    assert info.value.status == status and detail in info.value.detail
    assert info.value.body == (body if isinstance(body, dict) else None)


def deployment(number: int, build: int, served: bool, **extra: Any) -> dict[str, Any]:
    return {
        "number": number,
        "model": "adder",
        "build": build,
        "state": extra.pop("state", "stopped"),
        "replicas": 1,
        "profile": None,
        "cpu_millis": 1000,
        "memory_bytes": 2**30,
        "env": {},
        "created_at": "2026-12-01T09:00:00Z",
        "serving_at": "2026-12-01T09:01:00Z" if served else None,
        **extra,
    }


def deploys_of(history: list[dict[str, Any]], seen: list[httpx.Request]) -> Handler:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"items": history, "next_cursor": None})
        body = json.loads(request.content)
        return httpx.Response(201, json=deployment(len(history) + 1, body["build"], False))

    return answer


def posted(seen: list[httpx.Request]) -> dict[str, Any]:
    [post] = [r for r in seen if r.method == "POST"]
    assert post.url.path == "/api/v1/projects/alice/demo/models/adder/deployments"
    body: dict[str, Any] = json.loads(post.content)
    return body


def test_rollback_deploys_the_build_that_served_before(seen: list[httpx.Request]) -> None:
    history = [  # newest first
        deployment(5, 4, True, state="serving", replicas=3, profile="small", env={"A": "1"}),
        deployment(4, 3, False, state="failed"),  # never served: not a rollback target
        deployment(3, 4, True),  # the same build as now: skipped
        deployment(2, 2, True),
        deployment(1, 1, True),
    ]
    with client(seen, deploys_of(history, seen)) as kiln:
        made = kiln.rollback_model("alice", "demo", "adder")
    assert made.build == 2
    assert posted(seen) == {"build": 2, "replicas": 3, "profile": "small", "env": {"A": "1"}}


def test_rollback_to_a_named_build_and_when_there_is_none(seen: list[httpx.Request]) -> None:
    history = [deployment(2, 2, True, state="serving", replicas=2), deployment(1, 2, True)]
    with client(seen, deploys_of(history, seen)) as kiln:
        with pytest.raises(KilnSDKError, match="served no build before build 2: name one"):
            kiln.rollback_model("alice", "demo", "adder")
        kiln.rollback_model("alice", "demo", "adder", build=1)
    assert posted(seen) == {"build": 1, "replicas": 2, "env": {}}
    seen.clear()
    never = pytest.raises(KilnSDKError, match="has never served: nothing to roll back to")
    with client(seen, deploys_of([], seen)) as kiln, never:
        kiln.rollback_model("alice", "demo", "adder")


def test_pages_are_followed_and_names_checked_before_sending(seen: list[httpx.Request]) -> None:
    def model(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "project": "alice/demo",
            "file": "model.py",
            "function": "predict",
            "serving_mode": "threads",
            "concurrency": 4,
            "access_key_prefix": "abcdef",
            "created_at": "2026-12-01T09:00:00Z",
            "updated_at": "2026-12-01T09:00:00Z",
        }

    pages: Iterator[dict[str, Any]] = iter(
        [
            {"items": [model("a"), model("b")], "next_cursor": "c1"},
            {"items": [model("c")], "next_cursor": None},
        ]
    )
    with client(seen, lambda _: httpx.Response(200, json=next(pages))) as kiln:
        assert [m.name for m in kiln.list_models("alice", "demo")] == ["a", "b", "c"]
        assert seen[1].url.params["cursor"] == "c1"
        for bad in ("", "a/b", "../x", "n" * 65, "ünï"):
            with pytest.raises(KilnSDKError, match="is not a model's name"):
                kiln.get_model("alice", "demo", bad)
        with pytest.raises(KilnSDKError, match="is not a replica's id"):
            kiln.get_replica("alice", "demo", "adder", "../../keys")
    assert len(seen) == 2


def test_waiting_for_a_deployment(seen: list[httpx.Request]) -> None:
    states = iter(["deploying", "deploying", "serving"])

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/deployments"):  # the newest, when none is named
            return httpx.Response(200, json={"items": [deployment(3, 1, False)]})
        return httpx.Response(200, json=deployment(3, 1, False, state=next(states, "deploying")))

    with client(seen, answer) as kiln:
        assert kiln.wait_for_deployment("alice", "demo", "adder", interval=0).state == "serving"
        assert [r.url.path.rsplit("/", 1)[1] for r in seen] == ["deployments", "3", "3", "3"]
        with pytest.raises(KilnSDKError, match="deployment 3 of model adder is still deploying"):
            kiln.wait_for_deployment("alice", "demo", "adder", 3, timeout=0.05, interval=0.01)


def test_an_example_input_is_sent_and_read_back(seen: list[httpx.Request]) -> None:
    example = {"a": 1, "b": [2, None]}
    answer = {
        "name": "adder",
        "project": "alice/demo",
        "file": "model.py",
        "function": "predict",
        "serving_mode": "threads",
        "concurrency": 4,
        "access_key_prefix": "abcdef",
        "created_at": "2026-12-01T09:00:00Z",
        "updated_at": "2026-12-01T09:00:00Z",
    }

    def respond(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        body = {**answer, "example_input": sent.get("example_input")}
        return httpx.Response(
            201 if request.method == "POST" else 200, json=body | {"access_key": "k" * 32}
        )

    with client(seen, respond) as kiln:
        made = kiln.create_model(
            "alice", "demo", "adder", file="model.py", function="predict", example_input=example
        )
        assert made.example_input == example
        assert kiln.update_model("alice", "demo", "adder", example_input=[1]).example_input == [1]
        assert kiln.update_model("alice", "demo", "adder", example_input=None).example_input is None
    created, changed, removed = (json.loads(r.content) for r in seen)
    assert created == {
        "name": "adder",
        "file": "model.py",
        "function": "predict",
        "example_input": example,
    }
    assert changed == {"example_input": [1]}
    assert removed == {"example_input": None}  # null removes it; leaving it out keeps it
    assert seen[1].method == seen[2].method == "PATCH"
