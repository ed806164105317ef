"""Helpers for the model keeper's tests (no tests here): a live Kiln (HTTPS) with a real
builder and a real runner, models built from a project, deployed through the API and called
through the model router the way a CML client calls them."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import Engine, select

from kiln.build.registry.service import Registry
from kiln.build.registry_client import Reference
from kiln.db.engine import make_sessionmaker
from kiln.db.model_models import ModelDeployment, ModelReplica
from kiln.db.workload_models import Workload
from kiln.settings import Settings
from kiln.testing import docker_registry as peer
from tests.integration.apps_support import Site, wait_for
from tests.integration.build_support import registry_target

MODEL = """\
import os
import time

CODE = "{code}"
if os.environ.get("BREAK_IMPORT"):
    raise RuntimeError("cannot load the weights: " + os.environ["BREAK_IMPORT"])


def predict(args):
    if args.get("die"):
        os._exit(3)
    time.sleep(args.get("sleep", 0))
    return {{
        "sum": args["a"] + args["b"],
        "code": CODE,
        "version": os.environ.get("VERSION", ""),
        "cwd": os.getcwd(),
    }}
"""
M = "/models/adder"


def model_file(code: str) -> str:
    return MODEL.format(code=code)


@dataclass
class Model:
    """alice's model ``adder`` in ``project``: its access key and alice's model API key."""

    site: Site
    http: httpx.Client
    project: str
    access_key: str
    api_key: str

    def call(self, request: dict[str, Any], timeout: float = 60) -> httpx.Response:
        return self.site.on(
            "modelservice",
            "POST",
            "/model",
            headers={"Authorization": f"Bearer {self.api_key}"},
            json={"accessKey": self.access_key, "request": request},
            timeout=timeout,
        )

    def build(self, files: dict[str, str], timeout: float = 300) -> dict[str, Any]:
        """Write ``files``, build the model, wait for the build to succeed."""
        for path, text in files.items():
            written = self.http.put(f"{self.project}/files/{path}", content=text.encode())
            assert written.status_code in (200, 201), written.text
        made = self.http.post(f"{self.project}{M}/builds", json={})
        assert made.status_code == 201, made.text
        number = made.json()["number"]

        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = self.http.get(f"{self.project}{M}/builds/{number}").json()
            ended = body["build"]["state"] in ("succeeded", "failed", "timed_out", "stopped")
            return body if ended else None

        built: dict[str, Any] = wait_for(done, timeout, f"build {number}", every=0.5)
        assert built["build"]["state"] == "succeeded", built
        return built

    def deploy(self, **body: Any) -> int:
        made = self.http.post(f"{self.project}{M}/deployments", json=body)
        assert made.status_code == 201, made.text
        return int(made.json()["number"])

    def deployment(self, number: int) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"{self.project}{M}/deployments/{number}").json()
        return body

    def wait_state(self, number: int, state: str, timeout: float = 180) -> dict[str, Any]:
        def look() -> dict[str, Any] | None:
            body = self.deployment(number)
            return body if body["state"] == state else None

        found: dict[str, Any] = wait_for(look, timeout, f"deployment {number} to be {state}")
        return found


def new_model(site: Site, http: httpx.Client, project: str) -> Model:
    made = http.post(
        f"{project}/models", json={"name": "adder", "file": "model.py", "function": "predict"}
    )
    assert made.status_code == 201, made.text
    key = http.post("/api/v1/auth/model-api-keys", json={"name": "calls"})
    assert key.status_code == 201, key.text
    return Model(site, http, project, made.json()["access_key"], key.json()["key"])


@dataclass
class Caller:
    """Calls the model in a loop on a thread of its own, recording every answer."""

    model: Model
    seen: list[tuple[int, str]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Caller:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _loop(self) -> None:
        while not self._done.is_set():
            try:
                answer = self.model.call({"a": 1, "b": 2}, timeout=30)
                body = answer.json()
                what = f"{body['response']['code']}" if answer.status_code == 200 else answer.text
                self.seen.append((answer.status_code, what))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.seen.append((0, repr(exc)))
            time.sleep(0.02)

    def wait_for_code(self, code: str, timeout: float = 60) -> None:
        wait_for(lambda: self.seen and self.seen[-1] == (200, code), timeout, f"code {code}")


def replica_rows(engine: Engine, number: int) -> list[tuple[ModelReplica, Workload]]:
    """The replicas of deployment ``number`` (of the only model), oldest first."""
    with make_sessionmaker(engine)() as db:
        deployment = db.scalar(select(ModelDeployment).where(ModelDeployment.number == number))
        assert deployment is not None
        rows = db.execute(
            select(ModelReplica, Workload)
            .join(Workload, Workload.id == ModelReplica.workload_id)
            .where(ModelReplica.deployment_id == deployment.id)
            .order_by(Workload.created_at)
        ).all()
        db.expunge_all()
        return [(r, w) for r, w in rows]


def copy_into_own_registry(
    settings: Settings, engine: Engine, running: peer.RunningRegistry, image: dict[str, Any]
) -> None:
    """Copy a built image (a build's ``image``) from the peer registry into Kiln's own, as
    if the build had pushed it there (a site without KILN_BUILDER_REGISTRY_URL)."""
    reference = Reference(image["repository"], digest=image["digest"])
    assert reference.digest is not None
    work = settings.data_dir / "copy"
    work.mkdir(exist_ok=True)
    target = registry_target(running)
    registry = Registry.for_settings(settings)
    try:
        manifest = target.get_manifest(reference)
        document = json.loads(manifest.data)
        with make_sessionmaker(engine)() as db:
            for desc in [document["config"], *document["layers"]]:
                path = work / desc["digest"].split(":")[1]
                target.fetch_blob(reference.repository, desc["digest"], path)
                registry.put_blob_file(db, reference.repository, path)
            registry.put_manifest(
                db, reference.repository, reference.digest, manifest.data, manifest.media_type
            )
    finally:
        target.close()
