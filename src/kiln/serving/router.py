"""The model router: model calls from the outside world to a model's replicas.

It runs in the web tier beside the content proxy and answers
``https://modelservice.{content domain}/...`` and, for set-ups without wildcard DNS,
``https://{domain}/modelservice/...`` (``kiln.app.KilnApp`` hands both over ahead of the
middleware meant for Kiln's own routes). It serves CML's contract, ``POST /model``
(``kiln.serving.cml``), and KServe V1, Open Inference V2 and MLflow's scoring server under
``/{owner}/{project}/{model}/`` (``kiln.serving.model_paths``; the replica speaks them,
``kiln.serving.model_protocols``). Both go through the same decision cache, balancer, queue,
retry and timeout (``_dispatch``).

One call: the body is read (at most ``KILN_MODELS_MAX_BODY_BYTES``) and checked; the access
key names the model and the Bearer model API key the caller (``kiln.domain.model_keys``;
decisions cached for ``DECISION_SECONDS``); the balancer (``kiln.serving.balancer``) picks a
ready replica of the serving deployment (``kiln.domain.model_routing``; read again every
``ROUTE_SECONDS``) or queues the call up to ``KILN_MODELS_QUEUE_SECONDS``; the call goes over
the content proxy's keep-alive client (``kiln.apps.upstream``) with ``{"request": ...}`` only,
and the replica's answer (CML's shape, made by ``kiln.serving.model_server``) goes back as it
came. A replica that refused the connection or closed it before answering is set aside and
the call tried once more on another; a replica that takes longer than
``KILN_MODELS_CALL_TIMEOUT_SECONDS`` gets the caller a 504. ``call_model`` (the call once
authorized; the model page's test widget calls it too) counts each call in the model's
request statistics (``kiln.serving.request_stats``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from anyio import to_thread
from sqlalchemy.orm import Session
from starlette.types import Message, Receive, Scope, Send

from kiln.api.deps import KilnContext
from kiln.apps.headers import header
from kiln.apps.upstream import UpstreamError, UpstreamPool
from kiln.domain import model_keys
from kiln.domain.errors import Forbidden, KilnError, NotAuthenticated
from kiln.domain.model_routing import Route, route
from kiln.domain.model_stats import outcome
from kiln.domain.passwords import hash_token
from kiln.pki.ca import content_domain
from kiln.serving import call_metrics, model_paths
from kiln.serving.balancer import Balancer, Busy, Replica
from kiln.serving.cml import parse_call, problem
from kiln.serving.model_protocols import MODEL_NAME_HEADER
from kiln.serving.model_server import CallFailed
from kiln.serving.request_stats import RequestStats

log = logging.getLogger("kiln.serving.router")

HOST_LABEL = "modelservice"
PATH_PREFIX = "/modelservice"
DECISION_SECONDS = 2.0  # a revoked key or a removed collaborator is refused after this
ROUTE_SECONDS = 1.0  # a new ready replica or a switched deployment is used after this
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_JSON = (b"content-type", b"application/json")


@dataclass(frozen=True)
class Answer:
    """A replica's answer to a call, passed on as it came."""

    status: int
    content_type: bytes
    body: bytes
    replica_id: str


@dataclass
class _Decision:
    grant: model_keys.CallGrant
    until: float


@dataclass(frozen=True)
class _Forward:
    """What goes to the replica: method, path, request headers (without host and length)
    and body."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class _Routes:
    balancer: Balancer
    fresh_until: float = 0.0
    refreshing: asyncio.Task[Route | None] | None = None


class ModelRouter:
    def __init__(self, ctx: KilnContext, domain: str, upstream: UpstreamPool) -> None:
        self.ctx = ctx
        self.host = f"{HOST_LABEL}.{content_domain(domain).lower()}"
        self.upstream = upstream
        self._decisions: dict[tuple[str, str], _Decision] = {}
        self._routes: dict[int, _Routes] = {}
        self.stats = RequestStats(ctx.sessions, ctx.settings.models.stats_flush_seconds)

    def target(self, scope: Scope) -> str | None:
        """The path within the model service, or None when the request is not for it."""
        path: str = scope.get("path", "")
        host = (header(scope, b"host") or "").rsplit(":", 1)[0].lower().rstrip(".")
        if host == self.host:
            return path
        if path == PATH_PREFIX or path.startswith(PATH_PREFIX + "/"):
            return path[len(PATH_PREFIX) :] or "/"
        return None

    async def serve(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        shape: Callable[[int, str], bytes] = problem  # CML's refusals, or the protocol's
        try:
            if path == "/model":
                if scope["method"] != "POST":
                    raise CallFailed(405, 'call a model with POST /model {"accessKey", "request"}')
                await self._call(scope, receive, send)
            else:
                target = model_paths.parse(path)
                shape = partial(model_paths.problem, target.rest)
                await self._call_path(target, scope, receive, send)
        except CallFailed as failed:
            await _refuse(send, failed.status, failed.message, shape=shape)
        except Busy as busy:
            retry = [(b"retry-after", str(busy.retry_after).encode())]
            await _refuse(send, 503, busy.detail, retry, shape=shape)
        except (NotAuthenticated, Forbidden) as exc:
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await _refuse(send, exc.status, exc.detail, extra, shape=shape)
        except KilnError as exc:
            await _refuse(send, exc.status, exc.detail, shape=shape)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """CML's ``POST /model``: the access key names the model."""
        body = await _read_body(scope, receive, self.ctx.settings.models.max_body_bytes)
        call = parse_call(body, scope.get("query_string", b""))
        grant = await self._decide(call.access_key, header(scope, b"authorization"))
        await _send(send, await self.call_model(grant.model_id, call.forward))

    async def _call_path(
        self, target: model_paths.ModelPath, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The other protocols: the path names the model; the body goes as it came."""
        if scope["method"] not in ("GET", "POST"):
            raise CallFailed(405, f"the model's protocols take GET and POST, not {scope['method']}")
        body = await _read_body(scope, receive, self.ctx.settings.models.max_body_bytes)
        grant = await self._decide_path(target, header(scope, b"authorization"))
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() in model_paths.FORWARDED_HEADERS
        ]
        headers.append((MODEL_NAME_HEADER.lower().encode(), target.model.encode()))
        forward = _Forward(scope["method"], target.target(), headers, body)
        await _send(send, await self._counted(grant.model_id, forward))

    async def call_model(self, model_id: int, body: bytes) -> Answer:
        """One authorized CML call of ``model_id`` with ``body`` (``{"request": ...}``): the
        replica's answer, or ``CallFailed``/``Busy`` when the router answers itself. The
        model page's test widget calls through here too."""
        return await self._counted(model_id, _Forward("POST", "/model", [_JSON], body))

    async def _counted(self, model_id: int, call: _Forward) -> Answer:
        """``_attempts``, counted in the model's request statistics
        (``kiln.serving.request_stats``), whatever the protocol."""
        started = time.perf_counter()
        try:
            answer = await self._attempts(model_id, call)
        except (CallFailed, Busy) as refused:
            status = refused.status if isinstance(refused, CallFailed) else 503
            self._count(model_id, "", status, started)
            raise
        self._count(model_id, answer.replica_id, answer.status, started)
        return answer

    def _count(self, model_id: int, replica_id: str, status: int, started: float) -> None:
        result = outcome(status, answered_by_replica=bool(replica_id))
        self.stats.record(model_id, replica_id, result, time.perf_counter() - started)

    async def _attempts(self, model_id: int, call: _Forward) -> Answer:
        """Balance, queue, forward, retry once elsewhere, time out."""
        settings = self.ctx.settings.models
        routes = self._routes.setdefault(model_id, _Routes(Balancer()))
        deadline = time.monotonic() + settings.queue_seconds
        failed: Replica | None = None
        for attempt in (1, 2):
            replica = await self._acquire(model_id, routes, deadline, failed)
            try:
                async with asyncio.timeout(settings.call_timeout_seconds):
                    status, content_type, answer, metrics = await self._forward(replica, call)
            except UpstreamError as exc:
                log.info("model %s: replica %s failed: %s", model_id, replica.endpoint, exc)
                routes.balancer.set_aside(replica)
                routes.fresh_until = 0.0  # ask the database again
                failed = replica
                if attempt == 1:
                    continue
                raise CallFailed(502, "the model's replica failed while answering") from None
            except TimeoutError:
                raise CallFailed(
                    504,
                    f"the model took longer than {settings.call_timeout_seconds:g} s to answer",
                ) from None
            finally:
                routes.balancer.release(replica)
            if metrics:
                await call_metrics.store(self.ctx, model_id, replica.replica_id, metrics)
            return Answer(status, content_type, answer, replica.replica_id)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _forward(self, replica: Replica, call: _Forward) -> tuple[int, bytes, bytes, bytes]:
        """The replica's status, content type, answer and the call's metrics (if any)."""
        body = call.body
        headers = [(b"host", replica.endpoint.encode()), *call.headers, call_metrics.REQUEST_HEADER]

        async def once() -> AsyncIterator[bytes]:
            yield body

        if call.method in ("GET", "HEAD") and not body:
            answer = await self.upstream.request(
                replica.endpoint, call.method, call.target, headers, None, None
            )
        else:
            headers.append((b"content-length", str(len(body)).encode()))
            answer = await self.upstream.request(
                replica.endpoint, call.method, call.target, headers, once(), len(body)
            )
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in answer.body():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise CallFailed(502, "the model's answer is larger than 64 MiB")
                chunks.append(chunk)
        finally:
            answer.release()
        content_type = next(
            (v for k, v in answer.headers if k.lower() == b"content-type"), b"application/json"
        )
        answered, metrics = call_metrics.split(answer.headers, b"".join(chunks))
        return answer.status, content_type, answered, metrics

    async def _decide(self, access_key: str, authorization: str | None) -> model_keys.CallGrant:
        def decide(db: Session, bearer: str | None) -> model_keys.CallGrant:
            model = model_keys.model_by_access_key(db, access_key)
            return model_keys.authorize_call(db, self.ctx.settings, model, bearer)

        return await self._decision(hash_token(access_key), authorization, decide)

    async def _decide_path(
        self, target: model_paths.ModelPath, authorization: str | None
    ) -> model_keys.CallGrant:
        def decide(db: Session, bearer: str | None) -> model_keys.CallGrant:
            return model_keys.authorize_path_call(
                db, self.ctx.settings, target.owner, target.project, target.model, bearer
            )

        # A prefix has "/" in it, an access key's hash never: the two kinds cannot collide.
        return await self._decision(target.prefix, authorization, decide)

    async def _decision(
        self,
        names: str,
        authorization: str | None,
        decide: Callable[[Session, str | None], model_keys.CallGrant],
    ) -> model_keys.CallGrant:
        """A grant for the model that ``names`` stands for, cached ``DECISION_SECONDS``
        per (model, key); refusals are never cached."""
        bearer = model_keys.bearer_of(authorization)
        cache_key = (names, hash_token(bearer) if bearer else "")
        known = self._decisions.get(cache_key)
        now = time.monotonic()
        if known is not None and known.until > now:
            return known.grant

        def read() -> model_keys.CallGrant:
            with self.ctx.sessions() as db:
                return decide(db, bearer)

        grant = await to_thread.run_sync(read)
        if len(self._decisions) > 10_000:
            self._decisions.clear()  # bounded; a miss costs one query
        self._decisions[cache_key] = _Decision(grant, now + DECISION_SECONDS)
        return grant

    async def _acquire(
        self, model_id: int, routes: _Routes, deadline: float, avoid: Replica | None
    ) -> Replica:
        """A replica for the call: the routing table is read again while the call waits,
        so a replica that becomes ready meanwhile takes it."""
        while True:
            await self._refresh(model_id, routes)
            step = min(deadline, time.monotonic() + ROUTE_SECONDS)
            try:
                return await routes.balancer.acquire(step, avoid)
            except Busy:
                if time.monotonic() >= deadline:
                    raise

    async def _refresh(self, model_id: int, routes: _Routes) -> None:
        if routes.fresh_until > time.monotonic():
            return
        if routes.refreshing is None or routes.refreshing.done():

            def read() -> Route | None:
                with self.ctx.sessions() as db:
                    return route(db, model_id)

            routes.refreshing = asyncio.ensure_future(to_thread.run_sync(read))
        found = await asyncio.shield(routes.refreshing)
        if found is None:
            self._routes.pop(model_id, None)
            raise CallFailed(404, "the model was deleted")
        routes.balancer.update(list(found.replicas), found.capacity)
        routes.fresh_until = time.monotonic() + ROUTE_SECONDS


async def _send(send: Send, answer: Answer) -> None:
    """A replica's answer to the caller, as it came (never cached)."""
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [
                (b"content-type", answer.content_type),
                (b"content-length", str(len(answer.body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer.body})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    length = header(scope, b"content-length")
    if length is not None:
        if not length.isdigit():
            raise CallFailed(400, "Content-Length is not a number")
        if int(length) > limit:
            raise CallFailed(413, f"the body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise CallFailed(400, "the caller went away before the body ended")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise CallFailed(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _refuse(
    send: Send,
    status: int,
    detail: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    shape: Callable[[int, str], bytes] = problem,
) -> None:
    body = shape(status, detail)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        *(extra or []),
    ]
    if status == 405:  # CML's /model takes POST; the other protocols' paths GET or POST
        headers.append((b"allow", b"POST" if shape is problem else b"GET, POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
