"""The runner's model keeper with everything real: the builder builds the model's image, the
runner unpacks it and starts replicas in sandboxes on it, and a CML client calls the model
through Kiln's router over HTTPS. Deploy, redeploy and rollback with a caller in a loop that
sees no failed call; an import error that fails a deployment while the old one serves; a
crashed replica restarted in its slot; scaling; deleting a served model; replicas waiting
for quota; stopping a model. SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.builder.process import RunningBuilder
from kiln.db.engine import make_sessionmaker
from kiln.db.model_models import Model as ModelRow
from kiln.db.workload_models import Workload
from kiln.settings import Settings
from kiln.testing import docker_registry as peer
from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration import test_sessions_support as sessions_support
from tests.integration.apps_support import Site, make_project, site_for, wait_for
from tests.integration.model_keeper_support import (
    Caller,
    Model,
    copy_into_own_registry,
    model_file,
    new_model,
    replica_rows,
)
from tests.integration.test_model_deploys_api import built
from tests.integration.test_models_api import create
from tests.integration.test_sessions_support import RunnerHandle, runner  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

if os.geteuid() != 0:  # pragma: no cover - the builder's and the runner's sandboxes
    pytest.skip("NOTICE: models need root (sandboxes)", allow_module_level=True)


@pytest.fixture
def site(builder: RunningBuilder, runner: RunnerHandle, live: LiveServer) -> Site:  # noqa: F811
    """In this order: the builder's settings (registry, runtime cache) before the runner
    reads them, the runner before the web tier needs it."""
    return site_for(live)


@pytest.fixture
def model(site: Site, alice: Account) -> Iterator[Model]:
    with site.api(alice) as http:
        project = make_project(http, "churn", {"model.py": model_file("v1")})
        yield new_model(site, http, project)


def ok(answer: object) -> dict[str, object]:
    status = getattr(answer, "status_code", None)
    assert status == 200, getattr(answer, "text", answer)
    body: dict[str, object] = answer.json()  # type: ignore[attr-defined]
    assert body["success"] is True, body
    response = body["response"]
    assert isinstance(response, dict)
    return {**response, "ReplicaID": body["ReplicaID"]}


def test_deploy_redeploy_and_rollback_without_a_failed_call(model: Model, engine: Engine) -> None:
    model.build({})
    model.build({"model.py": model_file("v2")})  # the project now holds v2

    first = model.deploy(build=1, replicas=2, env={"VERSION": "one"})
    model.wait_state(first, "serving")
    answers = [ok(model.call({"a": 2, "b": 5})) for _ in range(6)]
    # Build 1's code, from the image's own home, although the project's file says v2.
    assert {(a["sum"], a["code"], a["version"], a["cwd"]) for a in answers} == {
        (7, "v1", "one", "/home/cdsw")
    }
    ids = {w.id for _, w in replica_rows(engine, first)}
    assert {a["ReplicaID"] for a in answers} == ids and len(ids) == 2  # both take calls

    slow: list[object] = []  # a call in flight when its replica is told to stop
    in_flight = threading.Thread(
        target=lambda: slow.append(model.call({"a": 0, "b": 0, "sleep": 15}))
    )
    with Caller(model) as caller:
        caller.wait_for_code("v1")
        in_flight.start()
        second = model.deploy(build=2, replicas=2)
        model.wait_state(second, "serving")
        caller.wait_for_code("v2")
        model.wait_state(first, "stopped", timeout=60)
        in_flight.join(timeout=60)
        assert ok(slow[0])["code"] == "v1"  # it finished on its draining replica
        rollback = model.deploy(build=1, replicas=1)
        model.wait_state(rollback, "serving")
        caller.wait_for_code("v1")
        model.wait_state(second, "stopped")
        time.sleep(1)

    failed = [s for s in caller.seen if s[0] != 200]
    assert failed == [], failed[:5]
    codes = [code for _, code in caller.seen]
    switches = [b for a, b in itertools.pairwise(codes) if a != b]
    assert switches == ["v2", "v1"], switches  # once switched, never back
    assert len(caller.seen) > 20
    for number in (first, second):
        rows = replica_rows(engine, number)
        assert [w.state for _, w in rows] == ["stopped", "stopped"], [w.reason for _, w in rows]
        assert not any(r.ready for r, _ in rows)
    assert model.deployment(first)["reason"] == "replaced by deployment 2"
    assert {w.exit_code for _, w in replica_rows(engine, first)} == {0}  # drained, not killed


def test_failures_restarts_scaling_and_deletion_from_kilns_own_registry(
    model: Model,
    engine: Engine,
    settings: Settings,
    build_registry: peer.RunningRegistry,
) -> None:
    built = model.build({})
    # A site whose builds go to Kiln's own registry: the runner reads the image from there.
    copy_into_own_registry(settings, engine, build_registry, built["build"]["image"])
    settings.builder.registry_url = None

    serving = model.deploy(replicas=1, env={"VERSION": "a"})
    model.wait_state(serving, "serving")
    assert ok(model.call({"a": 1, "b": 1}))["version"] == "a"

    broken = model.deploy(env={"BREAK_IMPORT": "weights.bin is missing"})
    failed = model.wait_state(broken, "failed")
    assert "a replica ended before it was ready" in failed["reason"]
    assert "RuntimeError: cannot load the weights: weights.bin is missing" in failed["reason"]
    assert model.deployment(serving)["state"] == "serving"
    assert ok(model.call({"a": 1, "b": 1}))["version"] == "a"  # the old one never stopped
    assert [w.state for _, w in replica_rows(engine, broken)] == ["failed"]
    # The API lists the failed replica, and its log holds the traceback.
    replicas = f"{model.project}/models/adder/replicas"
    listed = model.http.get(f"{model.project}/models/adder/deployments/{broken}/replicas")
    [gone] = listed.json()
    assert (gone["state"], gone["ready"], gone["ready_since"]) == ("failed", False, None)
    log = model.http.get(f"{replicas}/{gone['id']}/logs")
    assert log.status_code == 200, log.text
    assert "RuntimeError: cannot load the weights: weights.bin is missing" in log.text
    followed = model.http.get(f"{replicas}/{gone['id']}/logs", params={"follow": "true"})
    assert followed.text == log.text  # an ended replica's log, to its end

    # A replica whose process dies is restarted in its slot (restarts + 1).
    crashed = model.call({"die": True})
    assert crashed.status_code == 502, crashed.text

    def restarted() -> bool:
        rows = replica_rows(engine, serving)
        return len(rows) == 2 and rows[1][0].restarts == 1 and rows[1][0].ready

    wait_for(restarted, 60, "the crashed replica's slot to serve again")
    (old, old_workload), (new, _) = replica_rows(engine, serving)
    assert (old.slot, new.slot, old_workload.state) == (0, 0, "failed")

    def serving_again() -> dict[str, object] | None:
        [now] = model.http.get(replicas).json()  # one per slot
        return now if now["ready"] else None

    # The API: the slot's newest replica, the one it replaced and why that one ended. (The
    # router's retry of the killing call may kill the first restart too: see the README.)
    now = wait_for(serving_again, 60, "a ready replica in the API")
    rows = {w.id: w for _, w in replica_rows(engine, serving)}
    ids = list(rows)
    assert (now["slot"], now["restarts"]) == (0, ids.index(str(now["id"])))
    previous = rows[str(now["previous"])]
    assert ids.index(previous.id) == ids.index(str(now["id"])) - 1
    assert now["last_exit_reason"] == (previous.reason or previous.state)
    assert now["ready_since"] is not None
    assert ok(model.call({"a": 1, "b": 1}))["version"] == "a"

    scaled = model.http.post(f"{model.project}/models/adder/scale", json={"replicas": 2})
    assert scaled.status_code == 200, scaled.text

    def ready_replicas() -> set[str]:
        return {w.id for r, w in replica_rows(engine, serving) if r.ready and w.state == "running"}

    wait_for(lambda: len(ready_replicas()) == 2, 90, "two ready replicas")
    wait_for(
        lambda: (
            {ok(model.call({"a": 0, "b": 0}))["ReplicaID"] for _ in range(4)} == ready_replicas()
        ),
        20,
        "calls on both replicas",
    )
    model.http.post(f"{model.project}/models/adder/scale", json={"replicas": 1})
    wait_for(lambda: len(ready_replicas()) == 1, 30, "one replica left")
    drained = [w for r, w in replica_rows(engine, serving) if r.slot == 1]
    wait_for(lambda: replica_rows(engine, serving)[-1][1].state == "stopped", 30, "slot 1 stopped")
    assert len(drained) == 1

    deleted = model.http.delete(f"{model.project}/models/adder")
    assert deleted.status_code == 202, deleted.text
    assert model.call({"a": 1, "b": 1}).status_code in (401, 404)  # at once, or within 2 s

    def gone() -> bool:
        with make_sessionmaker(engine)() as db:
            return db.scalar(select(ModelRow)) is None

    wait_for(gone, 60, "the model's row to go once its replicas stopped")
    with make_sessionmaker(engine)() as db:
        states = set(db.scalars(select(Workload.state).where(Workload.kind == "replica")))
    assert states <= {"stopped", "failed"}, states


def test_quota_waits_a_redeploy_beside_the_serving_replicas_and_a_stop(
    model: Model, engine: Engine, site: Site, admin: Account
) -> None:
    with site.api(admin) as http:
        quota = {"cpu": 1.5, "memory_mib": 8192}
        assert http.put("/api/v1/quotas/users/alice", json=quota).status_code == 200
    model.build({})
    first = model.deploy(replicas=2)

    def waiting() -> dict[str, object] | None:
        body = model.deployment(first)
        return body if str(body["reason"]).startswith("waiting for quota") else None

    found = wait_for(waiting, 90, "the second replica to wait for quota")
    assert found["state"] == "deploying"
    assert "waiting for quota: alice uses 1 of 1.5 vCPU" in str(found["reason"]), found

    def states() -> list[str]:
        return sorted(w.state for _, w in replica_rows(engine, first))

    wait_for(lambda: states() == ["running", "waiting"], 60, "one running, one waiting")
    assert model.deployment(first)["state"] == "deploying"  # not all ready: no switch

    with site.api(admin) as http:
        quota = {"cpu": 2, "memory_mib": 8192}
        assert http.put("/api/v1/quotas/users/alice", json=quota).status_code == 200
    assert model.wait_state(first, "serving")["reason"] == ""
    assert ok(model.call({"a": 1, "b": 1}))["sum"] == 2

    # Two more beside the two serving (4 of 2 vCPU for a moment): the new ones replace them.
    second = model.deploy(replicas=2)
    model.wait_state(second, "serving")
    model.wait_state(first, "stopped")
    assert ok(model.call({"a": 1, "b": 1}))["sum"] == 2

    stopped = model.http.post(f"{model.project}/models/adder/stop")
    assert stopped.status_code == 200, stopped.text
    assert model.wait_state(second, "stopped")["reason"] == "stopped by alice"
    assert {w.state for _, w in replica_rows(engine, second)} == {"stopped"}


def test_replicas_outlive_a_runner_restart(
    model: Model,
    engine: Engine,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    model.build({})
    number = model.deploy(replicas=2)
    model.wait_state(number, "serving")
    before = {w.id for _, w in replica_rows(engine, number)}

    runner.stop()
    answered = {ok(model.call({"a": 1, "b": 1}))["ReplicaID"] for _ in range(4)}
    assert answered == before  # the router needs no runner; the sandboxes run on
    runner.start_again()
    time.sleep(3)  # a few reconciler passes over the re-attached replicas
    assert model.deployment(number)["state"] == "serving"
    rows = replica_rows(engine, number)
    assert {w.id for _, w in rows} == before and all(r.ready for r, _ in rows)

    # The router retries a call whose replica closed without answering once, on the other
    # replica: this call kills both. The new runner restarts both slots.
    assert model.call({"die": True}).status_code == 502

    def restarted() -> bool:
        rows = replica_rows(engine, number)
        latest = rows[2:]
        return len(rows) == 4 and all(r.restarts == 1 and r.ready for r, _ in latest)

    wait_for(restarted, 60, "both slots to serve again")
    assert sorted(r.slot for r, _ in replica_rows(engine, number)[2:]) == [0, 1]
    assert {ok(model.call({"a": 1, "b": 1}))["sum"] for _ in range(4)} == {2}


def test_a_deployment_whose_image_is_gone_fails_saying_so(
    client: TestClient,
    alice: Account,
    engine: Engine,
    runner: RunnerHandle,  # noqa: F811
) -> None:
    """The build recorded an image Kiln's registry does not hold (collected, or never
    pushed): the replica cannot start and the deployment fails with the registry's word."""
    project = sessions_support.make_project(client, alice)
    create(client, project, alice)
    built(client, project, alice, engine)  # a succeeded build with an image digest only
    made = client.post(f"{project}/models/adder/deployments", json={}, headers=alice.headers)
    assert made.status_code == 201, made.text

    def ended() -> dict[str, object] | None:
        body = client.get(f"{project}/models/adder/deployments/1", headers=alice.headers).json()
        return body if body["state"] != "deploying" else None

    found = wait_for(ended, 60, "the deployment to end")
    assert found["state"] == "failed", found
    reason = str(found["reason"])
    assert "its image cannot be used" in reason and "sha256:eeeeeeeeeeee" in reason, reason
    [(replica, workload)] = replica_rows(engine, 1)
    assert workload.state == "failed" and workload.started_at is None
    assert not replica.ready
