"""``kiln.sdk.workers`` against a stand-in HTTP server: what it sends, how it waits, how it
reports errors. (The real thing, inside a session over HTTPS: tests/integration/
test_workers_live.py.)"""

from __future__ import annotations

import json
import pydoc
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from kiln.sdk import workers


class FakeKiln:
    """Answers like the Workers API; ``states`` says what each GET shows next."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, list[str]], Any, str]] = []
        self.states: dict[str, list[str]] = {}
        self.fail: tuple[int, str] | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                query = parse_qs(url.query)
                auth = self.headers.get("authorization", "")
                fake.requests.append((self.command, url.path, query, body, auth))
                if fake.fail:
                    status, detail = fake.fail
                    payload: dict[str, Any] = {"title": "No", "status": status, "detail": detail}
                elif self.command == "POST":
                    status = 201
                    ids = [f"w{i}" for i in range(body["n"])]
                    payload = {"workers": [fake.worker(i, "running") for i in ids]}
                else:
                    status = 200
                    ids = query.get("id", list(fake.states))
                    payload = {"workers": [fake.worker(i, fake.next_state(i)) for i in ids]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_state(self, worker_id: str) -> str:
        states = self.states.setdefault(worker_id, ["running"])
        return states.pop(0) if len(states) > 1 else states[0]

    @staticmethod
    def worker(worker_id: str, state: str) -> dict[str, Any]:
        code = {"succeeded": 0, "failed": 1}.get(state)
        return {"id": worker_id, "state": state, "exit_code": code, "reason": ""}


@pytest.fixture
def kiln(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKiln]:
    fake = FakeKiln()
    monkeypatch.setenv("KILN_API_URL", f"http://127.0.0.1:{fake.server.server_port}/")
    monkeypatch.setenv("KILN_WORKERS_TOKEN", "kwt_test")
    monkeypatch.setattr(workers, "POLL_SECONDS", 0.02)
    yield fake
    fake.server.shutdown()


def test_outside_a_session_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_URL", raising=False)
    monkeypatch.delenv("KILN_WORKERS_TOKEN", raising=False)
    with pytest.raises(workers.WorkersError, match="only inside a Kiln session"):
        workers.list_workers()


def test_help_explains_the_api() -> None:
    text = pydoc.render_doc(workers, renderer=pydoc.plaintext)
    for words in ("launch_workers", "await_workers", "stop_workers", "KILN_WORKERS_TOKEN"):
        assert words in text


def test_launch_sends_cmls_arguments_with_the_token(kiln: FakeKiln) -> None:
    launched = workers.launch_workers(2, cpu=0.5, memory=1, code="print(1)", env={"A": "b"})
    assert [w["id"] for w in launched] == ["w0", "w1"]
    method, path, _, body, auth = kiln.requests[-1]
    assert (method, path, auth) == ("POST", "/api/v1/workers", "Bearer kwt_test")
    assert body == {
        "n": 2,
        "cpu": 0.5,
        "memory": 1,
        "nvidia_gpu": 0,
        "kernel": "python3",
        "script": None,
        "code": "print(1)",
        "args": [],
        "env": {"A": "b"},
    }


def test_await_until_the_end_sorts_successes_from_failures(kiln: FakeKiln) -> None:
    kiln.states = {"a": ["running", "running", "succeeded"], "b": ["starting", "failed"]}
    result = workers.await_workers([{"id": "a"}, "b"])
    assert [w["id"] for w in result["workers"]] == ["a"]
    assert [(w["id"], w["state"]) for w in result["failures"]] == [("b", "failed")]
    assert kiln.requests[-1][2] == {"id": ["a", "b"]}


def test_await_gives_up_at_the_timeout_and_can_wait_for_running(kiln: FakeKiln) -> None:
    kiln.states = {"slow": ["running"], "new": ["starting", "running"]}
    result = workers.await_workers("slow", timeout_seconds=0.2)
    assert result["workers"] == [] and result["failures"][0]["state"] == "running"
    up = workers.await_workers(["new"], wait_for_completion=False, timeout_seconds=5)
    assert [w["state"] for w in up["workers"]] == ["running"]
    assert workers.await_workers([]) == {"workers": [], "failures": []}


def test_stop_names_every_worker_given_or_none_for_all(kiln: FakeKiln) -> None:
    kiln.states = {"a": ["stopped"], "b": ["stopped"], "c": ["stopped"]}
    workers.stop_workers("a", ["b", {"id": "c"}])
    assert kiln.requests[-1][:3] == ("DELETE", "/api/v1/workers", {"id": ["a", "b", "c"]})
    workers.stop_workers()
    assert kiln.requests[-1][:3] == ("DELETE", "/api/v1/workers", {})
    with pytest.raises(workers.WorkersError, match="not a worker"):
        workers.stop_workers({"name": "x"})


def test_a_refusal_carries_the_servers_explanation(kiln: FakeKiln) -> None:
    kiln.fail = (422, "n must be between 1 and 32")
    with pytest.raises(workers.WorkersError) as caught:
        workers.launch_workers(0, cpu=1, memory=1, code="pass")
    assert caught.value.status == 422
    assert str(caught.value) == "422: n must be between 1 and 32"


def test_an_unreachable_kiln_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_API_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("KILN_WORKERS_TOKEN", "kwt_test")
    with pytest.raises(workers.WorkersError, match="cannot reach Kiln") as caught:
        workers.list_workers()
    assert caught.value.status == 0
