"""The model server as a replica runs it: a real process started with the same Python and
the module's file alone (as the image does), real HTTP/1.1 with keep-alive, real signals."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.serving import model_server
from kiln.testing.live import free_port
from tests.integration.model_support import Server


def test_calls_with_cmls_contract_on_a_kept_alive_connection(start_replica: Any) -> None:
    server = start_replica()
    server.wait_ready()
    conn = server.connection()
    for a in range(3):
        status, body = server.call({"accessKey": "ignored", "request": {"a": a, "b": 2}}, conn)
        assert status == 200, body
        assert body["success"] is True and body["response"]["sum"] == a + 2
        assert body["ReplicaID"] == "replica-7"
    conn.close()
    assert server.ready() == (200, {"ready": True, "state": "ready", "inflight": 0})


def test_not_ready_until_the_import_succeeded(start_replica: Any) -> None:
    server = start_replica(env={"IMPORT_SLEEP": "1.5"})
    deadline = time.monotonic() + 10
    while True:  # it listens before it imports
        try:
            status, body = server.ready()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert (status, body["state"]) == (503, "loading")
    status, body = server.call({"request": {"a": 1, "b": 1}})
    assert status == 503 and body["success"] is False and "loading" in body["response"]["message"]
    server.wait_ready()
    assert server.call({"request": {"a": 1, "b": 1}})[0] == 200


@pytest.mark.parametrize(
    ("file", "function", "words"),
    [
        ("model.py", "nope", "has no function 'nope'"),
        ("model.py", "NOT_CALLABLE", "is a int, not a function"),
        ("missing.py", "predict", "model file 'missing.py' does not exist"),
        ("broken.py", "predict", "ZeroDivisionError"),
    ],
)
def test_an_import_error_exits_1_with_the_reason_in_the_log(
    start_replica: Any, model_project: Path, file: str, function: str, words: str
) -> None:
    (model_project / "broken.py").write_text("import os\n\nVALUE = 1 / 0\n")
    port = free_port()
    argv = [sys.executable, "-I", model_server.__file__, "--file", file, "--function", function]
    process = subprocess.run(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=model_project,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert process.returncode == 1
    log = process.stderr.decode()
    assert words in log, log
    if file == "broken.py":
        assert "Traceback" in log and "VALUE = 1 / 0" in log


@pytest.mark.parametrize(
    ("function", "status", "response"),
    [
        ("fail", 500, {"message": "the model broke", "type": "RuntimeError"}),
        ("refuse", 422, {"message": "a must be positive", "type": "BadInput"}),
        ("not_json", 500, {"message": "the function's result is not JSON: a object is not JSON"}),
        ("nan", 500, {"message": "the function's result is not JSON: NaN or infinity"}),
    ],
)
def test_function_errors_answer_cmls_failure_shape(
    start_replica: Any, function: str, status: int, response: dict[str, Any]
) -> None:
    server = start_replica(function=function)
    server.wait_ready()
    conn = server.connection()
    got = server.call({"request": {}}, conn)
    assert got == (status, {"success": False, "response": response, "ReplicaID": "replica-7"})
    # The connection and the process are still fine.
    assert server.call({"request": {}}, conn)[0] == status
    assert server.process.poll() is None
    if function == "fail":
        assert "RuntimeError: the model broke" in server.output()  # the traceback is logged


def test_numpy_like_results_are_json(start_replica: Any) -> None:
    server = start_replica(function="vector")
    server.wait_ready()
    assert server.call({"request": None})[1]["response"] == [0, 1, 2]


def test_bad_requests_are_refused_before_the_function(start_replica: Any) -> None:
    server = start_replica("--max-body-bytes", "1000")
    server.wait_ready()
    cases = [
        (b"nope", 400, "not JSON"),
        (b"[1]", 400, "not an array"),
        (b'{"req": 1}', 400, 'no "request"'),
        (b'{"request": ' + b"[" * 400 + b"]" * 400 + b"}", 400, "nested too deeply"),
        (b'{"request": "' + b"x" * 1000 + b'"}', 413, "the limit is 1000"),
    ]
    for raw, status, words in cases:
        got_status, body = server.call(None, raw=raw)
        assert got_status == status and words in body["response"]["message"], (raw[:20], body)
    conn = server.connection()
    conn.putrequest("POST", "/model")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"2\r\n{}\r\n0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 411 and b"Content-Length" in response.read()
    conn.close()
    conn = server.connection()
    conn.request("POST", "/elsewhere", b"{}")
    response = conn.getresponse()
    assert response.status == 404 and b"no such path" in response.read()
    conn.request("GET", "/model")  # the same connection still works
    assert conn.getresponse().status == 404
    conn.close()
    assert server.process.poll() is None


def _concurrent(server: Server, n: int, seconds: float) -> tuple[float, list[int]]:
    statuses: list[int] = []

    def one() -> None:
        statuses.append(server.call({"request": {"seconds": seconds}})[0])

    threads = [threading.Thread(target=one) for _ in range(n)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - began, statuses


def test_threads_serve_several_calls_at_once(start_replica: Any) -> None:
    server = start_replica("--threads", "4", function="slow")
    server.wait_ready()
    took, statuses = _concurrent(server, 4, 0.6)
    assert statuses == [200] * 4
    assert took < 1.5, took  # together, not one after another (2.4 s)
    single = start_replica("--threads", "1", function="slow")
    single.wait_ready()
    took, statuses = _concurrent(single, 3, 0.4)
    assert statuses == [200] * 3 and took >= 1.2, took  # CML's one-at-a-time, on request


def test_processes_share_the_port_and_a_dead_worker_is_replaced(start_replica: Any) -> None:
    server = start_replica("--processes", "2", "--threads", "1")
    server.wait_ready()
    pids = {server.call({"request": {"a": 1, "b": 1}})[1]["response"]["pid"] for _ in range(40)}
    assert server.process.pid not in pids and 1 <= len(pids) <= 2
    dying = start_replica("--processes", "2", "--threads", "1", function="die")
    dying.wait_ready()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        dying.call({"request": {}})
    deadline = time.monotonic() + 10
    while "worker" not in (log := _peek_log(dying)):
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    assert dying.process.poll() is None
    dying.wait_ready()  # a new worker answers
    dying.process.send_signal(signal.SIGTERM)
    assert dying.process.wait(timeout=20) == 0
    assert "worker 0 exited with status 3; starting another" in _peek_log(dying) or (
        "worker 1 exited with status 3; starting another" in _peek_log(dying)
    )


def _peek_log(server: Server) -> str:
    """What the server logged so far, without waiting for it to end."""
    assert server.process.stderr is not None
    os.set_blocking(server.process.stderr.fileno(), False)
    chunk = server.process.stderr.read() or b""
    server.__dict__.setdefault("_log", bytearray()).extend(chunk)
    return bytes(server.__dict__["_log"]).decode(errors="replace")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigterm_drains_calls_in_flight(start_replica: Any, processes: str) -> None:
    server = start_replica("--processes", processes, "--threads", "2", function="slow")
    server.wait_ready()
    results: list[tuple[int, dict[str, Any]]] = []
    caller = threading.Thread(
        target=lambda: results.append(server.call({"request": {"seconds": 1.0}}))
    )
    caller.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    caller.join(timeout=10)
    assert results and results[0][0] == 200 and results[0][1]["response"] == {"slept": 1.0}
    assert server.process.wait(timeout=20) == 0
    with pytest.raises(OSError):
        server.ready()  # no longer accepting


def test_the_other_protocols_alone(start_replica: Any, model_project: Path) -> None:
    """As in a model image run alone: KServe V1, Open Inference V2 and MLflow on the server's
    own paths, the name from $KILN_MODEL, the body limit in the protocol's shape, pre-forked
    workers; a user's own module named like the server's sibling stays the user's."""
    (model_project / "model_protocols.py").write_text("MINE = 'the user module'\n")
    (model_project / "mine.py").write_text(
        "import model_protocols\n\n\ndef predict(args):\n    return model_protocols.MINE\n"
    )
    server = start_replica(
        "--processes", "2", "--max-body-bytes", "200", env={"KILN_MODEL": "churn"}
    )
    server.wait_ready()
    conn = server.connection()

    def ask(method: str, path: str, body: bytes = b"") -> tuple[int, Any, Any]:
        conn.request(method, path, body or None, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.headers

    assert ask("GET", "/v1/models/churn")[:2] == (200, {"name": "churn", "ready": True})
    predict = json.dumps({"instances": [{"a": 1, "b": 2}, {"a": 2, "b": 2}]}).encode()
    status, body, _ = ask("POST", "/v1/models/churn:predict", predict)
    assert status == 200 and [p["sum"] for p in body["predictions"]] == [3, 4]
    status, body, _ = ask("POST", "/v1/models/model:predict", predict)
    assert status == 404 and "serves 'churn'" in body["error"]
    assert ask("GET", "/v2/health/ready")[0] == 200
    status, body, headers = ask("GET", "/invocations")
    assert status == 405 and headers["Allow"] == "POST" and body["error_code"] == "BAD_REQUEST"
    status, body, headers = ask("POST", "/invocations", b'{"instances": ["' + b"x" * 300 + b'"]}')
    assert status == 413 and body["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert headers["Connection"] == "close"  # the rest of the body was not read
    conn.close()

    mine = start_replica("--file", "mine.py")
    mine.wait_ready()
    conn = mine.connection()
    conn.request(
        "POST", "/invocations", b'{"instances": [1]}', {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert json.loads(response.read()) == {"predictions": ["the user module"]}
    conn.close()
