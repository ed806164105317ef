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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.serving import model_server
from kiln.testing.live import free_port

MODEL = """
import json, math, os, time

STARTED = time.time()
time.sleep(float(os.environ.get("IMPORT_SLEEP", "0")))


class BadInput(ValueError):
    status_code = 422


class Vector:  # what NumPy arrays look like to the encoder
    def __init__(self, values):
        self.values = values

    def tolist(self):
        return list(self.values)


def predict(args):
    return {"sum": args["a"] + args["b"], "pid": os.getpid()}


def slow(args):
    time.sleep(args["seconds"])
    return {"slept": args["seconds"]}


def fail(args):
    raise RuntimeError("the model broke")


def refuse(args):
    raise BadInput("a must be positive")


def not_json(args):
    return {"when": object()}


def nan(args):
    return math.nan


def vector(args):
    return Vector(range(3))


def die(args):
    os._exit(3)


NOT_CALLABLE = 5
"""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def call(
        self, body: Any, conn: http.client.HTTPConnection | None = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        own = conn is None
        conn = conn or self.connection()
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", "/model", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        if own:
            conn.close()
        return response.status, payload

    def ready(self) -> tuple[int, dict[str, Any]]:
        conn = self.connection()
        try:
            conn.request("GET", "/_kiln/ready")
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def wait_ready(self, seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if self.ready()[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("the model server never became ready")

    def output(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        _, err = self.process.communicate(timeout=10)
        return err.decode()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path


@pytest.fixture
def start(project: Path) -> Iterator[Any]:
    started: list[Server] = []

    def run(*args: str, env: dict[str, str] | None = None, function: str = "predict") -> Server:
        port = free_port()
        argv = [
            sys.executable,
            "-I",  # isolated, as in the image: no user site, no PYTHON* variables
            model_server.__file__,
            "--file",
            "model.py",
            "--function",
            function,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--replica-id",
            "replica-7",
            *args,
        ]
        process = subprocess.Popen(
            argv,
            cwd=project,
            env={"PATH": os.environ["PATH"], **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        server = Server(process, port)
        started.append(server)
        return server

    yield run
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=10)
        if server.process.stderr:
            server.process.stderr.close()


def test_calls_with_cmls_contract_on_a_kept_alive_connection(start: Any) -> None:
    server = start()
    server.wait_ready()
    conn = server.connection()
    for a in range(3):
        status, body = server.call({"accessKey": "ignored", "request": {"a": a, "b": 2}}, conn)
        assert status == 200, body
        assert body["success"] is True and body["response"]["sum"] == a + 2
        assert body["ReplicaID"] == "replica-7"
    conn.close()
    assert server.ready() == (200, {"ready": True, "state": "ready", "inflight": 0})


def test_not_ready_until_the_import_succeeded(start: Any) -> None:
    server = start(env={"IMPORT_SLEEP": "1.5"})
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
    start: Any, project: Path, file: str, function: str, words: str
) -> None:
    (project / "broken.py").write_text("import os\n\nVALUE = 1 / 0\n")
    port = free_port()
    argv = [sys.executable, "-I", model_server.__file__, "--file", file, "--function", function]
    process = subprocess.run(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=project,
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
    start: Any, function: str, status: int, response: dict[str, Any]
) -> None:
    server = start(function=function)
    server.wait_ready()
    conn = server.connection()
    got = server.call({"request": {}}, conn)
    assert got == (status, {"success": False, "response": response, "ReplicaID": "replica-7"})
    # The connection and the process are still fine.
    assert server.call({"request": {}}, conn)[0] == status
    assert server.process.poll() is None
    if function == "fail":
        assert "RuntimeError: the model broke" in server.output()  # the traceback is logged


def test_numpy_like_results_are_json(start: Any) -> None:
    server = start(function="vector")
    server.wait_ready()
    assert server.call({"request": None})[1]["response"] == [0, 1, 2]


def test_bad_requests_are_refused_before_the_function(start: Any) -> None:
    server = start("--max-body-bytes", "1000")
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


def test_threads_serve_several_calls_at_once(start: Any) -> None:
    server = start("--threads", "4", function="slow")
    server.wait_ready()
    took, statuses = _concurrent(server, 4, 0.6)
    assert statuses == [200] * 4
    assert took < 1.5, took  # together, not one after another (2.4 s)
    single = start("--threads", "1", function="slow")
    single.wait_ready()
    took, statuses = _concurrent(single, 3, 0.4)
    assert statuses == [200] * 3 and took >= 1.2, took  # CML's one-at-a-time, on request


def test_processes_share_the_port_and_a_dead_worker_is_replaced(start: Any) -> None:
    server = start("--processes", "2", "--threads", "1")
    server.wait_ready()
    pids = {server.call({"request": {"a": 1, "b": 1}})[1]["response"]["pid"] for _ in range(40)}
    assert server.process.pid not in pids and 1 <= len(pids) <= 2
    dying = start("--processes", "2", "--threads", "1", function="die")
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
def test_sigterm_drains_calls_in_flight(start: Any, processes: str) -> None:
    server = start("--processes", processes, "--threads", "2", function="slow")
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
