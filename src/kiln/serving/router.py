"""The model router: model calls from the outside world to a model's replicas.

It runs in the web tier beside the content proxy and answers
``https://modelservice.{content domain}/...`` and, for set-ups without wildcard DNS,
``https://{domain}/modelservice/...`` (``kiln.app.KilnApp`` hands both over ahead of the
middleware meant for Kiln's own routes). Today it serves CML's contract, ``POST /model``
(``kiln.serving.cml``); the other protocols come under ``/{owner}/{project}/{model}/``.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass

from anyio import to_thread
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
from kiln.serving.balancer import Balancer, Busy, Replica
from kiln.serving.cml import parse_call, problem
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
        try:
            if path != "/model":
                raise CallFailed(404, "no such endpoint: the model service answers POST /model")
            if scope["method"] != "POST":
                raise CallFailed(405, 'call a model with POST /model {"accessKey", "request"}')
            await self._call(scope, receive, send)
        except CallFailed as failed:
            await _refuse(send, failed.status, failed.message)
        except Busy as busy:
            await _refuse(
                send, 503, busy.detail, [(b"retry-after", str(busy.retry_after).encode())]
            )
        except (NotAuthenticated, Forbidden) as exc:
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            await _refuse(send, exc.status, exc.detail, extra)
        except KilnError as exc:
            await _refuse(send, exc.status, exc.detail)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.ctx.settings.models
        body = await _read_body(scope, receive, settings.max_body_bytes)
        call = parse_call(body, scope.get("query_string", b""))
        grant = await self._decide(call.access_key, header(scope, b"authorization"))
        answer = await self.call_model(grant.model_id, call.forward)
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

    async def call_model(self, model_id: int, body: bytes) -> Answer:
        """One authorized call of ``model_id`` with ``body`` (``{"request": ...}``): the
        replica's answer, or ``CallFailed``/``Busy`` when the router answers itself. Counted
        in the model's request statistics (``kiln.serving.request_stats``)."""
        started = time.perf_counter()
        try:
            answer = await self._attempts(model_id, body)
        except (CallFailed, Busy) as refused:
            status = refused.status if isinstance(refused, CallFailed) else 503
            self._count(model_id, "", status, started)
            raise
        self._count(model_id, answer.replica_id, answer.status, started)
        return answer

    def _count(self, model_id: int, replica_id: str, status: int, started: float) -> None:
        result = outcome(status, answered_by_replica=bool(replica_id))
        self.stats.record(model_id, replica_id, result, time.perf_counter() - started)

    async def _attempts(self, model_id: int, body: bytes) -> Answer:
        settings = self.ctx.settings.models
        routes = self._routes.setdefault(model_id, _Routes(Balancer()))
        deadline = time.monotonic() + settings.queue_seconds
        failed: Replica | None = None
        for attempt in (1, 2):
            replica = await self._acquire(model_id, routes, deadline, failed)
            try:
                async with asyncio.timeout(settings.call_timeout_seconds):
                    status, content_type, answer = await self._forward(replica, body)
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
            return Answer(status, content_type, answer, replica.replica_id)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _forward(self, replica: Replica, body: bytes) -> tuple[int, bytes, bytes]:
        headers = [
            (b"host", replica.endpoint.encode()),
            _JSON,
            (b"content-length", str(len(body)).encode()),
        ]

        async def once() -> AsyncIterator[bytes]:
            yield body

        answer = await self.upstream.request(
            replica.endpoint, "POST", "/model", headers, once(), len(body)
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
        return answer.status, content_type, b"".join(chunks)

    async def _decide(self, access_key: str, authorization: str | None) -> model_keys.CallGrant:
        bearer = model_keys.bearer_of(authorization)
        cache_key = (hash_token(access_key), hash_token(bearer) if bearer else "")
        known = self._decisions.get(cache_key)
        now = time.monotonic()
        if known is not None and known.until > now:
            return known.grant

        def decide() -> model_keys.CallGrant:
            with self.ctx.sessions() as db:
                model = model_keys.model_by_access_key(db, access_key)
                return model_keys.authorize_call(db, self.ctx.settings, model, bearer)

        grant = await to_thread.run_sync(decide)
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
    send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = problem(status, detail)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        *(extra or []),
    ]
    if status == 405:
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
