"""Model servers started as a replica starts them: the model server's own file run by an
isolated Python in the project's directory (shared by the model server's and the router's
tests)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model, ModelBuild, ModelDeployment, ModelReplica
from kiln.db.workload_models import Workload
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


def add(args):
    # Numbers (CML, a KServe instance, an MLflow row) or equally long lists (V2 tensors).
    a, b = args["a"], args["b"]
    if isinstance(a, list):
        return {"sum": [x + y for x, y in zip(a, b)]}
    return {"sum": a + b}


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
            start_new_session=True,  # its pre-forked workers go with it at the end
        )
        server = Server(process, port)
        started.append(server)
        return server

    yield run
    for server in started:
        # The whole group: in processes mode a SIGKILLed parent leaves its workers running
        # (in a replica the sandbox's end takes them; here nothing else would).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        if server.process.stderr:
            server.process.stderr.close()


@pytest.fixture
def replicas(start_replica: Any) -> Any:
    """``replicas(n, function, *args)``: n ready model servers; their endpoints by replica id
    (``replica0``...), for ``serve_from``."""

    def start(n: int, function: str = "predict", *args: str) -> dict[str, str]:
        found = {}
        for i in range(n):
            server = start_replica(*args, function=function, replica_id=f"replica{i}")
            found[f"replica{i}"] = server
        for server in found.values():
            server.wait_ready()
        return {rid: f"127.0.0.1:{server.port}" for rid, server in found.items()}

    return start


def serve_from(engine: Engine, model_name: str, endpoints: dict[str, str]) -> int:
    """Rows of a serving deployment of ``model_name`` whose replicas (by workload id) run at
    ``endpoints`` (host:port): what the runner records once replicas it started are ready.
    The replicas themselves are real model servers the test started. Returns its id."""
    with transaction(make_sessionmaker(engine)) as db:
        model = db.scalar(select(Model).where(Model.name == model_name))
        assert model is not None
        build_workload = Workload(
            id=secrets.token_hex(8),
            kind="build",
            project_id=model.project_id,
            cpu_millis=1000,
            memory_bytes=1024**3,
            state="succeeded",
        )
        db.add(build_workload)
        db.flush()
        db.add(
            Build(
                workload_id=build_workload.id,
                project_id=model.project_id,
                number=1 + (db.scalar(select(func.count()).select_from(Build)) or 0),
                base_image="runtimes/python:3.11",
                repository="alice/demo/build",
            )
        )
        number = 1 + (db.scalar(select(func.count()).select_from(ModelBuild)) or 0)
        version = ModelBuild(
            model_id=model.id,
            number=number,
            build_id=build_workload.id,
            file=model.file,
            function=model.function,
        )
        db.add(version)
        db.flush()
        deployment = ModelDeployment(
            model_id=model.id,
            number=number,
            model_build_id=version.id,
            replicas=len(endpoints),
            cpu_millis=500,
            memory_bytes=1024**3,
            state="serving",
        )
        db.add(deployment)
        db.flush()
        for slot, (workload_id, endpoint) in enumerate(endpoints.items()):
            db.add(
                Workload(
                    id=workload_id,
                    kind="replica",
                    project_id=model.project_id,
                    cpu_millis=500,
                    memory_bytes=1024**3,
                    state="running",
                    endpoint=endpoint,
                )
            )
            db.flush()
            db.add(
                ModelReplica(
                    workload_id=workload_id, deployment_id=deployment.id, slot=slot, ready=True
                )
            )
        model.serving_deployment_id = deployment.id
        return deployment.id
