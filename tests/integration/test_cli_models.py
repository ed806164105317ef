"""`kiln models ...` and `kiln models keys ...` end to end: the real CLI against the live
HTTPS server, calls through Kiln's model router to a real model server. The builder's and
the runner's parts are recorded by the test (a build that succeeded; a small stand-in for
the model keeper that serves each new deployment from the model server the test started),
so the test stays quick; both are tested for real in test_model_keeper.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from kiln.db.build_models import Build
from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.model_models import Model, ModelDeployment
from kiln.db.workload_models import Workload
from kiln.domain.model_replicas import queue_replica, replicas_of
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.cli_support import Cli

pytestmark = [pytest.mark.one_database, pytest.mark.timeout(180)]
P = "alice/demo"


class StandInKeeper:
    """What the runner's model keeper records, done on a thread: every deployment that is
    deploying gets its replicas (at the model server's address), ready, and serves."""

    def __init__(self, engine: Engine, endpoint: str) -> None:
        self.factory = make_sessionmaker(engine)
        self.endpoint = endpoint
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.done.wait(0.1):
            with transaction(self.factory) as db:
                for deployment in db.scalars(
                    select(ModelDeployment).where(ModelDeployment.state == "deploying")
                ):
                    self._serve(db, deployment)

    def _serve(self, db: Any, deployment: ModelDeployment) -> None:
        model = db.get(Model, deployment.model_id)
        for slot in range(deployment.replicas):
            workload, replica = queue_replica(db, deployment, model.project_id, slot, restarts=0)
            workload.state, workload.endpoint = "running", self.endpoint
            replica.ready, replica.ready_at = True, deployment.created_at
        old = db.get(ModelDeployment, model.serving_deployment_id or 0)
        if old is not None:  # replaced: drained and stopped
            old.state = "stopped"
            for replica, workload in replicas_of(db, old.id):
                replica.ready, workload.state, workload.reason = False, "stopped", "drained"
        deployment.state = "serving"
        deployment.serving_at = deployment.created_at
        model.serving_deployment_id = deployment.id


@pytest.fixture
def keeper(engine: Engine, start_replica: Any) -> Iterator[StandInKeeper]:
    server = start_replica()
    server.wait_ready()
    stand_in = StandInKeeper(engine, f"127.0.0.1:{server.port}")
    stand_in.thread.start()
    yield stand_in
    stand_in.done.set()
    stand_in.thread.join(timeout=10)


@pytest.fixture
def cli(live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alice: Account) -> Cli:
    """alice is logged in and owns alice/demo."""
    monkeypatch.delenv("KILN_MODEL_ACCESS_KEY", raising=False)
    monkeypatch.delenv("KILN_MODEL_API_KEY", raising=False)
    cli = Cli.isolated(live, tmp_path, monkeypatch)
    cli.login(alice)
    cli.ok("projects", "create", "demo", "--template", "python-starter")
    return cli


def builds_succeed(engine: Engine) -> None:
    """What the builder records when the model's builds finished."""
    with transaction(make_sessionmaker(engine)) as db:
        for build in db.scalars(select(Build)):
            build.image_digest = "sha256:" + "e" * 64
            workload = db.get(Workload, build.workload_id)
            assert workload is not None
            workload.state = "succeeded"


def field(output: str, name: str) -> str:
    line = next(line for line in output.splitlines() if line.strip().startswith(f"{name}:"))
    return line.split(":", 1)[1].split()[0]


def test_create_build_deploy_call_scale_rollback_stop_delete(
    cli: Cli, engine: Engine, keeper: StandInKeeper, tmp_path: Path
) -> None:
    assert "No models in alice/demo" in cli.ok("models", "list", P).stdout
    created = cli.ok("models", "create", P, "adder", "-f", "model.py", "-F", "predict").stdout
    assert "Created model adder of alice/demo" in created
    access_key = field(created, "access key")
    assert len(access_key) == 32
    assert "https://modelservice.kiln.localhost:" in field(created, "endpoint")

    queued = cli.ok("models", "build", P, "adder", "--no-wait", "-m", "first").stdout
    assert "Build #1 of model adder is queued" in queued and "--build 1 -f" in queued
    made = json.loads(cli.ok("models", "build", P, "adder", "--no-wait", "--json").stdout)
    assert made["number"] == 2 and made["build"]["state"] == "queued"
    assert cli.ok("models", "logs", P, "adder", "--build", "1").stdout == ""  # never ran
    # Nothing built yet: deploying says what to do.
    assert "has no successful build yet" in cli.fails("models", "deploy", P, "adder")
    builds_succeed(engine)

    deployed = cli.ok("models", "deploy", P, "adder", "--build", "1").stdout
    assert "Deploying: deployment #1 of build #1" in deployed
    assert "Deployment #1 (build #1) is serving, 1/1 replicas ready" in deployed
    listed = cli.ok("models", "list", P).stdout
    assert "adder" in listed and "model.py:predict" in listed and "deployment #1" in listed

    # A call, with the request as an argument, from a file and from stdin.
    no_key = cli.fails("models", "call", P, "adder", '{"a": 1, "b": 2}', "--access-key", access_key)
    assert "takes a model API key" in no_key and "kiln models keys create" in no_key
    key = cli.ok("models", "keys", "create", "--name", "cli").stdout.strip()
    assert key.startswith("kilnm_")
    answer = cli.ok(
        "models", "call", P, "adder", '{"a": 1, "b": 2}', "--access-key", access_key, "--key", key
    ).stdout
    body = json.loads(answer)
    assert body["success"] is True and body["response"]["sum"] == 3
    request = tmp_path / "request.json"
    request.write_text('{"a": 20, "b": 22}')
    with_env = ["--access-key", access_key, "--key", key]
    from_file = cli.ok("models", "call", P, "adder", f"@{request}", *with_env).stdout
    assert json.loads(from_file)["response"]["sum"] == 42
    from_stdin = cli.ok("models", "call", P, "adder", *with_env, input='{"a": 5, "b": 5}').stdout
    assert json.loads(from_stdin)["response"]["sum"] == 10
    failed = cli.run("models", "call", P, "adder", '{"a": 1}', *with_env)  # KeyError: 'b'
    assert failed.exit_code == 1 and "the call failed (500)" in failed.stderr
    assert json.loads(failed.stdout)["success"] is False
    wrong = cli.fails("models", "call", P, "adder", "{}", "--access-key", "x" * 32, "--key", key)
    assert "the call failed (401): the access key names no model" in wrong
    assert "not JSON" in cli.fails("models", "call", P, "adder", "{nope", *with_env, code=2)

    shown = cli.ok("models", "show", P, "adder").stdout
    assert "serving deployment #1" in shown and "protocols:  https://modelservice." in shown
    assert "running  2026-" in shown  # ready since
    assert "/alice/demo/adder/" in shown and "running" in shown and "Builds" in shown
    as_json = json.loads(cli.ok("models", "show", P, "adder", "--json").stdout)
    assert [r["ready"] for r in as_json["replicas"]] == [True]
    replica = as_json["replicas"][0]["id"]
    assert cli.ok("models", "logs", P, "adder").stdout == ""  # the stand-in never started one
    assert cli.ok("models", "logs", P, "adder", "--replica", replica).stdout == ""
    assert "has no replica 'nope'" in cli.fails("models", "logs", P, "adder", "--replica", "nope")

    scaled = cli.ok("models", "scale", P, "adder", "2").stdout
    assert "Deployment #1 of model adder now wants 2 replicas" in scaled

    # Build 2 is deployed, then rolled back to build 1 with the replicas it had.
    redeployed = cli.ok("models", "deploy", P, "adder", "--env", "A=1").stdout  # keeps 2
    assert "Deployment #2 (build #2) is serving, 2/2 replicas ready" in redeployed
    rolled = cli.ok("models", "rollback", P, "adder").stdout
    assert "Rolling back: deployment #3 of build #1" in rolled
    assert "Deployment #3 (build #1) is serving, 2/2 replicas ready" in rolled
    with make_sessionmaker(engine)() as db:
        third = db.scalar(select(ModelDeployment).where(ModelDeployment.number == 3))
        assert third is not None and (third.replicas, third.env) == (2, {"A": "1"})
    back = json.loads(cli.ok("models", "rollback", P, "adder", "--build", "2", "--json").stdout)
    assert (back["number"], back["build"], back["state"]) == (4, 2, "serving")

    # A build followed to its end (the builder's part done by a timer).
    finish = threading.Timer(1.0, builds_succeed, [engine])
    finish.start()
    third = cli.ok("models", "build", P, "adder", "-m", "third").stdout
    finish.join()
    assert "Build #3 of model adder queued (image build #3 of alice/demo)" in third
    assert "Build #3 succeeded" in third
    assert "next: kiln models deploy alice/demo adder --build 3" in third

    assert "stops serving (deployment #4)" in cli.ok("models", "stop", P, "adder").stdout
    stopped = cli.fails("models", "call", P, "adder", "{}", *with_env)
    assert "model adder of alice/demo has no serving deployment: deploy it first" in stopped
    assert "is not deployed" in cli.fails("models", "stop", P, "adder")

    assert "Deleted model adder." in cli.ok("models", "delete", P, "adder", "--yes").stdout
    assert "has no model 'adder'" in cli.fails("models", "show", P, "adder")


def test_keys_rotation_roles_and_mistakes(
    cli: Cli, live: LiveServer, bob: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.ok("models", "create", P, "adder", "-f", "model.py", "-F", "predict")
    rotated = cli.ok("models", "rotate-key", P, "adder")
    assert len(rotated.stdout.strip()) == 32 and "shown only once" in rotated.stderr

    # An example input: JSON text or @FILE (read as `kiln models call` reads its request).
    example = tmp_path / "example.json"
    example.write_text('{"a": 1, "b": 2}', encoding="utf-8")
    model = ("models", "create", P, "ex", "-f", "model.py", "-F", "predict", "--example")
    cli.ok(*model, f"@{example}")
    assert 'example:    {"a": 1, "b": 2}' in cli.ok("models", "show", P, "ex").stdout
    inline = json.loads(cli.ok(*model[:3], "ex2", *model[4:], "[1, [2]]", "--json").stdout)
    assert inline["example_input"] == [1, [2]]
    assert "--example is not JSON" in cli.fails(*model[:3], "ex3", *model[4:], "{bad", code=2)
    assert "no model 'ex3'" in cli.fails("models", "show", P, "ex3")

    assert "No model API keys" in cli.ok("models", "keys", "list").stdout
    made = json.loads(cli.ok("models", "keys", "create", "--never-expires", "--json").stdout)
    assert made["expires_at"] is None and made["key"].startswith("kilnm_")
    listed = cli.ok("models", "keys", "list").stdout
    assert made["prefix"] in listed and "never" in listed
    assert (
        f"Revoked model API key {made['id']}"
        in cli.ok("models", "keys", "revoke", str(made["id"])).stdout
    )
    assert "not found" in cli.fails("models", "keys", "revoke", str(made["id"]))
    both = cli.fails(
        "models", "keys", "create", "--never-expires", "--expires-in-days", "3", code=2
    )
    assert "not both" in both

    # Mistakes are one line and a non-zero exit, never a traceback.
    assert "not OWNER/SLUG" in cli.fails("models", "list", "nope", code=2)
    assert "has no model 'nope'" in cli.fails("models", "show", P, "nope")
    assert "'Bad Name' is not a model's name" in cli.fails("models", "show", P, "Bad Name")
    assert "must be a Python file" in cli.fails(
        "models", "create", P, "other", "-f", "model.txt", "-F", "predict"
    )
    assert "access key is needed" in cli.fails("models", "call", P, "adder", "{}", code=2)
    missing = cli.fails("models", "call", P, "adder", f"@{tmp_path / 'missing.json'}", code=2)
    assert "cannot read" in missing
    assert "is not deployed" in cli.fails("models", "scale", P, "adder", "2")
    assert "'A' is not NAME=VALUE" in cli.fails("models", "deploy", P, "adder", "-e", "A", code=2)
    assert "no successful build yet" in cli.fails("models", "deploy", P, "adder", "-e", "A=1")
    assert "never served" in cli.fails("models", "rollback", P, "adder")
    assert "has no replicas now" in cli.fails("models", "logs", P, "adder")
    assert "not both" in cli.fails(
        "models", "logs", P, "adder", "-b", "1", "--replica", "x", code=2
    )

    # Another user: alice's project does not exist for a stranger.
    (tmp_path / "bob").mkdir()
    other = Cli.isolated(live, tmp_path / "bob", monkeypatch)
    other.login(bob)
    assert "not found" in other.fails("models", "list", P)
    assert "not found" in other.fails("models", "deploy", P, "adder")
