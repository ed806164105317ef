"""Models in the SDK: ``Client`` inherits these methods from ``ModelsAPI``.

    with Client.from_config() as kiln:
        model = kiln.create_model("alice", "demo", "adder", file="model.py", function="predict")
        access_key = model.access_key                     # shown once: keep it
        build = kiln.create_model_build("alice", "demo", "adder")
        build = kiln.wait_for_model_build("alice", "demo", "adder", build.number)
        kiln.deploy_model("alice", "demo", "adder", replicas=2)
        kiln.wait_for_deployment("alice", "demo", "adder")
        key = kiln.create_model_api_key("calls")           # a key for calling models
        answer = kiln.call_model(access_key, {"a": 1, "b": 2}, key.key)
        print(answer["response"])

A model is a function of a project's file served as an endpoint. Its *builds* are images
(immutable versions); a *deployment* runs one build as replicas; deploying an older build is
a rollback (``rollback_model``). Calls use CML's contract: the model's access key in the body
and a *model API key* (``kilnm_...``, not the API key this client signs in with) as Bearer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from kiln.sdk.builds import Build
from kiln.sdk.errors import KilnAPIError, KilnSDKError
from kiln.sdk.models import _Model
from kiln.sdk.part import ClientPart
from kiln.sdk.streaming import stream_bytes

DEPLOYMENT_ENDED = frozenset({"failed", "stopped"})
MODEL_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")  # the server says what exactly is allowed
REPLICA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Model(_Model):
    name: str
    project: str
    """``owner/slug``"""
    description: str = ""
    file: str
    function: str
    base: str | None = None
    profile: str | None = None
    serving_mode: str
    concurrency: int
    allow_unauthenticated: bool = False
    example_input: Any = None
    """A sample request (any JSON value; None: none): the page's test widget starts with it."""
    access_key_prefix: str
    endpoint_url: str = ""
    """CML's endpoint: ``POST {"accessKey": ..., "request": {...}}`` with a model API key."""
    protocols_url: str = ""
    """The prefix of the model's other protocols: ``.../{owner}/{project}/{model}/``."""
    serving_deployment: int | None = None
    """The deployment that answers calls (None: the model does not serve)."""
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime


class ModelCreated(Model):
    access_key: str
    """The model's access key: shown once (the server keeps its hash)."""


class ModelBuild(_Model):
    number: int
    model: str
    file: str
    function: str
    comment: str = ""
    created_by: str | None = None
    created_at: datetime
    build: Build
    """The source-to-image build: state, steps, image; its log is the project build's."""


class Deployment(_Model):
    number: int
    model: str
    build: int
    state: str
    """``deploying``, ``serving``, ``draining``, ``stopped`` or ``failed``."""
    reason: str = ""
    replicas: int
    profile: str | None = None
    cpu_millis: int
    memory_bytes: int
    env: dict[str, str] = {}
    created_by: str | None = None
    created_at: datetime
    serving_at: datetime | None = None
    ended_at: datetime | None = None


class Replica(_Model):
    id: str
    deployment: int
    build: int
    slot: int
    state: str
    reason: str = ""
    ready: bool
    ready_since: datetime | None = None
    restarts: int = 0
    exit_code: int | None = None
    last_exit_reason: str | None = None
    last_exit_at: datetime | None = None
    previous: str | None = None
    """The replica this one replaced in its slot (read its log to see why it ended)."""
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None


class ModelApiKey(_Model):
    id: int
    name: str = ""
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ModelApiKeyCreated(ModelApiKey):
    key: str
    """The key itself (``kilnm_...``): shown once."""


class ModelCallError(KilnAPIError):
    """A model call was refused (no key, wrong key, no serving deployment, busy) or the
    function failed; ``body`` is the answer (CML's ``{"success": false, "response": ...}``)."""

    def __init__(self, status: int, title: str, detail: str, body: Any) -> None:
        super().__init__(status, title, detail)
        self.body = body


class ModelsAPI(ClientPart):
    """The models endpoints; mixed into ``kiln.sdk.Client``, which supplies the transport."""

    url: str

    def _models(self, owner: str, slug: str) -> str:
        return f"{self._project(owner, slug)}/models"

    def _model(self, owner: str, slug: str, name: str) -> str:
        if not MODEL_NAME.fullmatch(name):
            raise KilnSDKError(f"{name[:80]!r} is not a model's name")
        return f"{self._models(owner, slug)}/{name}"

    def _pages(self, url: str, page_size: int) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"limit": page_size}
        while True:
            body = self._request("GET", url, params=params).json()
            yield from body["items"]
            if not body.get("next_cursor"):
                return
            params["cursor"] = body["next_cursor"]

    # ---- models ------------------------------------------------------------------------------

    def iter_models(self, owner: str, slug: str, page_size: int = 50) -> Iterator[Model]:
        """The project's models, oldest first, fetching pages as the iteration goes."""
        for item in self._pages(self._models(owner, slug), page_size):
            yield Model.model_validate(item)

    def list_models(self, owner: str, slug: str) -> list[Model]:
        return list(self.iter_models(owner, slug))

    def get_model(self, owner: str, slug: str, name: str) -> Model:
        return Model.model_validate(self._request("GET", self._model(owner, slug, name)).json())

    def create_model(
        self, owner: str, slug: str, name: str, *, file: str, function: str, **fields: Any
    ) -> ModelCreated:
        """Create a model (contributors and up). ``fields``: ``description``, ``base``,
        ``profile``, ``serving_mode`` (threads or processes), ``concurrency``,
        ``allow_unauthenticated``, ``example_input`` (a sample request: any JSON value, at
        most 64 KiB). The answer's ``access_key`` is shown this once."""
        body = {"name": name, "file": file, "function": function, **fields}
        response = self._request("POST", self._models(owner, slug), json=body)
        return ModelCreated.model_validate(response.json())

    def update_model(self, owner: str, slug: str, name: str, **fields: Any) -> Model:
        """Change fields (those of ``create_model``; ``example_input=None`` removes the
        example); a new file or function takes effect with the next build."""
        response = self._request("PATCH", self._model(owner, slug, name), json=fields)
        return Model.model_validate(response.json())

    def delete_model(self, owner: str, slug: str, name: str) -> None:
        """Delete the model with its builds, deployments and replicas."""
        self._request("DELETE", self._model(owner, slug, name))

    def rotate_model_access_key(self, owner: str, slug: str, name: str) -> str:
        """A new access key (shown this once); the old one stops working within seconds."""
        url = f"{self._model(owner, slug, name)}/access-key"
        return str(self._request("POST", url).json()["access_key"])

    # ---- builds ------------------------------------------------------------------------------

    def create_model_build(
        self, owner: str, slug: str, name: str, *, commit: str | None = None, comment: str = ""
    ) -> ModelBuild:
        """Build the model into an image (contributors and up): the project's files as they
        are now, or ``commit`` (a commit, branch or tag)."""
        body: dict[str, Any] = {"comment": comment}
        if commit:
            body["commit"] = commit
        url = f"{self._model(owner, slug, name)}/builds"
        return ModelBuild.model_validate(self._request("POST", url, json=body).json())

    def iter_model_builds(
        self, owner: str, slug: str, name: str, page_size: int = 50
    ) -> Iterator[ModelBuild]:
        """The model's builds, newest first."""
        for item in self._pages(f"{self._model(owner, slug, name)}/builds", page_size):
            yield ModelBuild.model_validate(item)

    def get_model_build(self, owner: str, slug: str, name: str, number: int) -> ModelBuild:
        url = f"{self._model(owner, slug, name)}/builds/{int(number)}"
        return ModelBuild.model_validate(self._request("GET", url).json())

    def wait_for_model_build(
        self,
        owner: str,
        slug: str,
        name: str,
        number: int,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> ModelBuild:
        """Poll until the build has ended; ``KilnSDKError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            version = self.get_model_build(owner, slug, name, number)
            if version.build.ended:
                return version
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(
                    f"build {number} of model {name} is still {version.build.state} "
                    f"after {timeout:g} s"
                )
            time.sleep(interval)

    def iter_model_build_logs(
        self,
        owner: str,
        slug: str,
        name: str,
        number: int,
        offset: int = 0,
        follow: bool = False,
    ) -> Iterator[bytes]:
        """A model build's log (its project build's), from byte ``offset``; ``follow``
        streams it until the build ends."""
        version = self.get_model_build(owner, slug, name, number)
        url = f"{self._project(owner, slug)}/builds/{version.build.number}/logs"
        params = {"offset": offset, "follow": "true" if follow else "false"}
        yield from stream_bytes(self._http, url, params, follow)

    # ---- deployments -------------------------------------------------------------------------

    def deploy_model(
        self,
        owner: str,
        slug: str,
        name: str,
        *,
        build: int | None = None,
        replicas: int = 1,
        profile: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Deployment:
        """Deploy a build (default: the newest successful one) as ``replicas`` replicas
        (operators and up). The serving deployment answers until the new one is ready."""
        body: dict[str, Any] = {"replicas": replicas, "env": env or {}}
        if build is not None:
            body["build"] = build
        if profile is not None:
            body["profile"] = profile
        url = f"{self._model(owner, slug, name)}/deployments"
        return Deployment.model_validate(self._request("POST", url, json=body).json())

    def iter_deployments(
        self, owner: str, slug: str, name: str, page_size: int = 50
    ) -> Iterator[Deployment]:
        """The model's deployment history, newest first."""
        for item in self._pages(f"{self._model(owner, slug, name)}/deployments", page_size):
            yield Deployment.model_validate(item)

    def get_deployment(self, owner: str, slug: str, name: str, number: int) -> Deployment:
        url = f"{self._model(owner, slug, name)}/deployments/{int(number)}"
        return Deployment.model_validate(self._request("GET", url).json())

    def wait_for_deployment(
        self,
        owner: str,
        slug: str,
        name: str,
        number: int | None = None,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> Deployment:
        """Poll a deployment (default: the newest) until it serves or has ended (failed,
        stopped: ``reason`` says why); ``KilnSDKError`` after ``timeout`` seconds."""
        if number is None:
            newest = next(self.iter_deployments(owner, slug, name, page_size=1), None)
            if newest is None:
                raise KilnSDKError(f"model {name} has no deployment yet")
            number = newest.number
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            deployment = self.get_deployment(owner, slug, name, number)
            if deployment.state == "serving" or deployment.state in DEPLOYMENT_ENDED:
                return deployment
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(
                    f"deployment {number} of model {name} is still {deployment.state} "
                    f"after {timeout:g} s" + (f": {deployment.reason}" if deployment.reason else "")
                )
            time.sleep(interval)

    def scale_model(self, owner: str, slug: str, name: str, replicas: int) -> Deployment:
        """Change the number of replicas while the model serves (operators and up)."""
        url = f"{self._model(owner, slug, name)}/scale"
        body = {"replicas": replicas}
        return Deployment.model_validate(self._request("POST", url, json=body).json())

    def stop_model(self, owner: str, slug: str, name: str) -> list[Deployment]:
        """Stop serving (operators and up): calls in flight finish, then replicas stop."""
        answer = self._request("POST", f"{self._model(owner, slug, name)}/stop").json()
        return [Deployment.model_validate(d) for d in answer]

    def rollback_model(
        self, owner: str, slug: str, name: str, build: int | None = None
    ) -> Deployment:
        """Deploy an earlier build with the current deployment's replicas, profile and
        environment: ``build``, or by default the build that served before the one that
        serves now (or served last). ``KilnSDKError`` when there is none."""
        history = list(self.iter_deployments(owner, slug, name, page_size=200))
        served = [d for d in history if d.serving_at is not None]  # newest first
        current = served[0] if served else None
        if build is None:
            if current is None:
                raise KilnSDKError(f"model {name} has never served: nothing to roll back to")
            earlier = next((d for d in served[1:] if d.build != current.build), None)
            if earlier is None:
                raise KilnSDKError(
                    f"model {name} served no build before build {current.build}: "
                    "name one to deploy (build=N)"
                )
            build = earlier.build
        template = current or (history[0] if history else None)
        if template is None:
            return self.deploy_model(owner, slug, name, build=build)
        return self.deploy_model(
            owner,
            slug,
            name,
            build=build,
            replicas=template.replicas,
            profile=template.profile,
            env=template.env,
        )

    # ---- replicas ----------------------------------------------------------------------------

    def list_replicas(
        self, owner: str, slug: str, name: str, deployment: int | None = None
    ) -> list[Replica]:
        """The model's replicas now (of its deploying, serving and draining deployments), or
        those of one ``deployment``: one per slot, with readiness and restarts."""
        base = self._model(owner, slug, name)
        url = f"{base}/deployments/{int(deployment)}/replicas" if deployment else f"{base}/replicas"
        return [Replica.model_validate(r) for r in self._request("GET", url).json()]

    def get_replica(self, owner: str, slug: str, name: str, replica_id: str) -> Replica:
        url = f"{self._model(owner, slug, name)}/replicas/{_replica(replica_id)}"
        return Replica.model_validate(self._request("GET", url).json())

    def iter_replica_logs(
        self,
        owner: str,
        slug: str,
        name: str,
        replica_id: str,
        offset: int = 0,
        follow: bool = False,
    ) -> Iterator[bytes]:
        """A replica's console (the model server's and the function's output) from byte
        ``offset``; ``follow`` streams it until the replica ends."""
        url = f"{self._model(owner, slug, name)}/replicas/{_replica(replica_id)}/logs"
        params = {"offset": offset, "follow": "true" if follow else "false"}
        yield from stream_bytes(self._http, url, params, follow)

    # ---- model API keys and calls ------------------------------------------------------------

    def create_model_api_key(
        self, name: str = "", expires_in_days: int | None = None, never_expires: bool = False
    ) -> ModelApiKeyCreated:
        """A key for calling models as yourself (default expiry: the site's, one year)."""
        body: dict[str, Any] = {"name": name, "never_expires": never_expires}
        if expires_in_days is not None:
            body["expires_in_days"] = expires_in_days
        response = self._request("POST", "auth/model-api-keys", json=body)
        return ModelApiKeyCreated.model_validate(response.json())

    def list_model_api_keys(self) -> list[ModelApiKey]:
        """The caller's model API keys that are not revoked (expired ones too)."""
        answer = self._request("GET", "auth/model-api-keys").json()
        return [ModelApiKey.model_validate(k) for k in answer]

    def revoke_model_api_key(self, key_id: int) -> None:
        self._request("DELETE", f"auth/model-api-keys/{int(key_id)}")

    def call_model(
        self,
        access_key: str,
        request: Any,
        model_api_key: str | None,
        *,
        url: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Call a model with CML's contract: ``{"accessKey": ..., "request": request}`` with
        ``Authorization: Bearer <model API key>`` (None: a model that allows calls without
        one). ``url`` defaults to ``/modelservice/model`` on this site (the same endpoint as
        the model's ``endpoint_url``, reachable without wildcard DNS). Returns CML's answer
        (``success``, ``response``, ``ReplicaID``); ``ModelCallError`` for a refusal or a
        function that failed."""
        from kiln.sdk.client import _connection_error  # imports this module's class

        target = url or f"{self.url}modelservice/model"
        body = {"accessKey": access_key, "request": request}
        sent = self._http.build_request(
            "POST", target, json=body, timeout=httpx.Timeout(timeout, connect=10.0)
        )
        # The client's own API key never goes to a model: the model API key or nothing.
        del sent.headers["Authorization"]
        if model_api_key:
            sent.headers["Authorization"] = f"Bearer {model_api_key}"
        try:
            response = self._http.send(sent)
        except httpx.HTTPError as exc:
            raise _connection_error(target, exc) from exc
        return _call_answer(response)


def _replica(replica_id: str) -> str:
    if not REPLICA_ID.fullmatch(replica_id):
        raise KilnSDKError(f"{replica_id[:80]!r} is not a replica's id")
    return replica_id


def _call_answer(response: httpx.Response) -> dict[str, Any]:
    """CML's answer as a dict; a refusal or a failed function as ``ModelCallError`` with the
    router's ``detail`` or the function's ``response.message``."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body
    detail = ""
    if isinstance(body, dict):
        detail = str(body.get("detail") or "")
        inner = body.get("response")
        if not detail and isinstance(inner, dict):
            kind = inner.get("type")
            detail = f"{kind}: {inner.get('message')}" if kind else str(inner.get("message", ""))
    if not detail:
        detail = response.text.strip()[:300] or f"HTTP {response.status_code}"
    title = response.reason_phrase or "Error"
    if response.is_success:  # 2xx but not CML's JSON: not a model endpoint
        raise ModelCallError(response.status_code, title, f"not a model's answer: {detail}", body)
    raise ModelCallError(response.status_code, title, detail, body)
