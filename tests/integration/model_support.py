"""Model servers started as a replica starts them: the model server's own file run by an
isolated Python in the project's directory (shared by the model server's and the router's
tests)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
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
def model_project(tmp_path: Path) -> Path:
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path


@pytest.fixture
def start_replica(model_project: Path) -> Iterator[Any]:
    started: list[Server] = []

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        function: str = "predict",
        replica_id: str = "replica-7",
    ) -> Server:
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
            replica_id,
            *args,
        ]
        process = subprocess.Popen(
            argv,
            cwd=model_project,
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
