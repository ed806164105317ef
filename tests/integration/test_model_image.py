"""A model's image serves alone: the builder builds a model (its dependency installed, the
model server's layer with its protocols and the CML library, the server as the command), podman
pulls it from the registry and runs it, and a plain HTTP client calls it with CML's body and
KServe V1's."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln.builder.process import RunningBuilder
from kiln.testing import docker_registry as peer
from kiln.testing.live import free_port
from tests.conftest import Account
from tests.integration.build_support import wait_build, write_files
from tests.integration.test_build_podman import podman
from tests.integration.test_models_api import create
from tests.integration.test_sessions_support import make_project

pytestmark = [pytest.mark.slow, pytest.mark.one_database]

MODEL = """\
import cml.models_v1 as models  # beside the server in the image: no Kiln there
import humanize

LOADED = humanize.naturalsize(1_000_000)


@models.cml_model
def predict(args):
    return {"sum": args["a"] + args["b"], "loaded": LOADED}
"""


def test_a_model_image_serves_alone_under_podman(
    client: TestClient,
    alice: Account,
    builder: RunningBuilder,
    build_registry: peer.RunningRegistry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("NOTICE: podman and runc are not installed (make test installs them)")
    project = make_project(client, alice)
    write_files(
        client, project, alice, {"requirements.txt": "humanize==4.9.0\n", "model.py": MODEL}
    )
    create(client, project, alice)
    response = client.post(f"{project}/models/adder/builds", json={}, headers=alice.headers)
    assert response.status_code == 201, response.text
    number = response.json()["build"]["number"]
    built = wait_build(client, project, alice, number)
    assert built["state"] == "succeeded", built
    assert "model server layer" in next(s for s in built["steps"] if s["name"] == "code")["detail"]
    assert set(built["layers"]) == {"dependencies", "code", "serving"}

    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(build_registry.ca_file, certs / "ca.crt")
    storage = Path(tempfile.mkdtemp(prefix="kiln-podman-"))
    request.addfinalizer(lambda: shutil.rmtree(storage, ignore_errors=True))
    reference = built["image"]["reference"]
    pulled = podman(
        storage, "pull", "--cert-dir", str(certs),
        "--creds", f"{build_registry.username}:{build_registry.password}", reference,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    port = free_port()
    name = f"kiln-model-{port}"
    started = podman(
        storage, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", reference,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    request.addfinalizer(lambda: podman(storage, "rm", "-f", name))
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/_kiln/ready")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, podman(storage, "logs", name).stderr
        time.sleep(0.3)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/model", json.dumps({"accessKey": "-", "request": {"a": 2, "b": 5}}))
    answer = conn.getresponse()
    body = json.loads(answer.read())
    assert answer.status == 200, body
    assert body["success"] is True and body["response"] == {"sum": 7, "loaded": "1.0 MB"}
    # The other protocols too (model_protocols.py lies beside the server in the image); alone,
    # the model answers to the name "model".
    predict = {"instances": [{"a": 1, "b": 2}]}
    conn.request("POST", "/v1/models/model:predict", json.dumps(predict))
    answer = conn.getresponse()
    assert json.loads(answer.read()) == {"predictions": [{"sum": 3, "loaded": "1.0 MB"}]}
    conn.request("GET", "/v2/health/ready")
    assert conn.getresponse().status == 200
    stopped = podman(storage, "stop", "-t", "10", name)
    assert stopped.returncode == 0, stopped.stderr
    logs = podman(storage, "logs", name)
    assert "model.py: predict ready" in logs.stderr + logs.stdout
