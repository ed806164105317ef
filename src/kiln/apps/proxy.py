"""The content-domain proxy: ``https://<label>.<content domain>/...`` → a workload's port.

One handler serves every origin of user content: a session's editor (``<session id>``),
the web UIs inside a session (``app-<session id>``, ``read-only-<session id>``) and
applications (``<subdomain>``); ``kiln.domain.app_access`` says which label is what and who
may use it. ``kiln.app.KilnApp`` hands it every request for such a host, ahead of Kiln's own
middleware and routes. It answers itself (the hand-off at ``/_kiln/auth``, a page saying why
not) or forwards to the workload's port (the runner's port forward, stored on the workload):
HTTP/1.1 over keep-alive connections with bodies streamed both ways (uploads, downloads of
any size, server-sent events) through ``kiln.apps.upstream``, and WebSocket through the
``websockets`` client.

Nothing is forwarded before ``admit`` said yes; a yes is trusted for ``ADMISSION_SECONDS``.
Who the browser is comes from the host-only access cookie the hand-off set on *this* origin
(``kiln.domain.session_access``). A browser that has none is sent to Kiln to sign in and
back (``/open/<label>`` on the UI), unless the application is public. Requests that change
state, and WebSockets, from another origin (``Origin``) never act as the user: on a session
they are refused, on an application they arrive anonymous (a public app serves them; a
private one refuses them), so a page on a sibling origin cannot ride the user's cookie.
What the app sees and may set in headers is ``kiln.apps.headers``'s business.

Limits: an upload that stalls for ``BODY_IDLE_SECONDS`` and a browser that reads nothing for
``WRITE_STALL_SECONDS`` are cut off; a browser that goes away ends its request upstream at
once. Connections that never finish their headers are the listener's (``kiln.apps.listener``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio
from anyio import to_thread
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kiln.api.deps import KilnContext
from kiln.apps.headers import (
    Target,
    cookies,
    forwarded_headers,
    header,
    raw_path,
    response_headers,
)
from kiln.apps.pages import page, site_of
from kiln.apps.upstream import Answer, UpstreamError, UpstreamPool
from kiln.domain import app_access, sessions
from kiln.domain import session_access as access
from kiln.domain.app_access import Grant, Kind, Unavailable, kind_of
from kiln.domain.errors import Conflict, KilnError, NotAuthenticated, NotFound
from kiln.pki.ca import content_domain

log = logging.getLogger("kiln.apps.proxy")

ADMISSION_SECONDS = 5.0  # how long a yes is trusted before the database is asked again
BODY_IDLE_SECONDS = 60.0
WRITE_STALL_SECONDS = 120.0
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CLOSE_REFUSED = 4403
CLOSE_UPSTREAM_FAILED = 1011
OPEN_PATH = "/open"  # on the UI's origin: sign in, then the hand-off back to <label>


# Who a request comes from: (user id, the sign-in the access came from), or None: nobody.
Caller = tuple[int, str] | None


@dataclass
class _Admitted:
    grant: Grant
    until: float


class ContentProxy:
    """Serves the content domain's hosts (``target`` says which requests are for it);
    ``kiln.app.KilnApp`` hands them over ahead of the middleware meant for Kiln's routes."""

    def __init__(self, ctx: KilnContext, domain: str) -> None:
        self.ctx = ctx
        self.suffix = f".{content_domain(domain).lower()}"
        self._admitted: dict[tuple[str, int, str], _Admitted] = {}
        # A verified cookie -> its label, until when it is trusted, and whom it names.
        self._cookies: dict[str, tuple[str, float, Caller]] = {}
        self._upstream = UpstreamPool()

    # ---- routing ---------------------------------------------------------------------------

    def target(self, scope: Scope) -> Target | None:
        """The origin a request is for, by its Host header; None for every other host."""
        host = header(scope, b"host") or ""
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower().rstrip(".")
        if not name.endswith(self.suffix):
            return None
        label = name[: -len(self.suffix)]
        if not _LABEL.fullmatch(label):
            return None  # not one label under the content domain: not a content origin
        secure = scope.get("scheme") in ("https", "wss")
        return Target(label, host, f"{'https' if secure else 'http'}://{host}")

    async def serve(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request (HTTP or WebSocket) for ``target``."""
        if scope["type"] == "http":
            await self._http_request(self.ctx, target, scope, receive, send)
        else:
            await self._websocket(self.ctx, target, scope, receive, send)

    # ---- who gets through ------------------------------------------------------------------

    def _user(self, ctx: KilnContext, target: Target, scope: Scope, trusted: bool) -> Caller:
        """Who the access cookie names, and the sign-in it came from (None: no usable
        cookie). A session's editor needs one; elsewhere a browser without one is sent to
        sign in, or is anonymous on a public application."""
        kind = kind_of(target.label)[0]
        value = cookies(scope).get(access.ACCESS_COOKIE) if trusted else None
        now = time.time()
        if value:
            known = self._cookies.get(value)
            if known is not None and known[0] == target.label and known[1] > now:
                return known[2]
            try:
                claims = access.read_access_claims(ctx.settings.secret, value, target.label, now)
            except access.AccessRefused:
                if kind is Kind.EDITOR:
                    raise
                return None  # expired or foreign: sign in again
            if len(self._cookies) > 10_000:
                self._cookies.clear()
            caller = (claims.user_id, claims.grant)
            self._cookies[value] = (target.label, min(now + 60, claims.expires), caller)
            return caller
        if kind is Kind.EDITOR:
            raise access.AccessRefused(
                "open this session from Kiln: this browser has no access to it yet"
            )
        return None

    async def _admit(self, ctx: KilnContext, target: Target, caller: Caller) -> Grant:
        """Where to forward, once the rules say yes (cached briefly); else raises."""
        user_id, grant_from = caller if caller is not None else (None, "")
        key = (target.label, user_id or 0, grant_from)
        cached = self._admitted.get(key)
        if cached is not None and cached.until > time.monotonic():
            return cached.grant

        def decide() -> Grant:
            with ctx.sessions() as db:
                return app_access.admit(db, target.label, user_id, grant=grant_from)

        grant = await to_thread.run_sync(decide)
        if len(self._admitted) > 10_000:
            self._admitted.clear()  # bounded; a miss only costs one query
        self._admitted[key] = _Admitted(grant, time.monotonic() + ADMISSION_SECONDS)
        return grant

    def _forget(self, label: str) -> None:
        for key in [k for k in self._admitted if k[0] == label]:
            self._admitted.pop(key, None)

    async def _redeem(self, ctx: KilnContext, target: Target, scope: Scope, send: Send) -> None:
        """``/_kiln/auth?token=&next=``: spend the hand-off token, set this origin's cookie."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        kind = kind_of(target.label)[0]
        default = "/lab" if kind is Kind.EDITOR else "/"
        after = _same_origin_path((query.get("next") or [default])[0], default)
        now = time.time()
        lifetime = ctx.settings.web.session_hours * 3600

        def redeem() -> str:
            with ctx.sessions() as db:
                claims = access.redeem_handoff_claims(
                    db, ctx.settings.secret, token, target.label, now
                )
                # Allowed in but not serving yet (Unavailable): its page says so.
                with contextlib.suppress(Unavailable):
                    app_access.admit(db, target.label, claims.user_id, grant=claims.grant)
                return access.access_cookie(
                    ctx.settings.secret, target.label, claims.user_id, now, lifetime, claims.grant
                )

        cookie = await to_thread.run_sync(redeem)
        headers = [
            (
                b"set-cookie",
                f"{access.ACCESS_COOKIE}={cookie}; Path=/; Max-Age={lifetime}; Secure; "
                "HttpOnly; SameSite=Lax".encode(),
            ),
            (b"location", after.encode("latin-1")),
            (b"referrer-policy", b"no-referrer"),  # the token is in this URL
        ]
        site = site_of(ctx.settings, target)
        await page(send, 303, "Opening", "Redirecting.", site, None, headers)

    async def _refuse(
        self, ctx: KilnContext, target: Target, scope: Scope, send: Send, exc: KilnError
    ) -> None:
        """A page, never the workload: sign in (no cookie), 404 (no such thing, or one the
        user cannot see), 409 (not running), 503 (not serving yet: looks again), else 403."""
        site = site_of(ctx.settings, target)
        if isinstance(exc, NotAuthenticated):
            there = f"{site}{OPEN_PATH}/{target.label}?" + urlencode({"next": raw_path(scope)})
            if scope["method"] in ("GET", "HEAD"):
                await page(
                    send, 303, "Sign in", exc.detail, site, None, [(b"location", there.encode())]
                )
                return
            await page(send, 401, "Sign in first", f"{exc.detail}.", site, (there, "Sign in"))
            return
        if isinstance(exc, Unavailable):
            refresh = 3 if exc.coming else None
            title = f"Application {exc.state}"
            await page(send, 503, title, f"{exc.detail}.", site, None, None, refresh)
            return
        status = exc.status if isinstance(exc, NotFound | Conflict) else 403
        title = {404: "Nothing here", 409: "Not available"}.get(status, "No access")
        await page(send, status, title, f"{exc.detail}.", site, (f"{site}/projects", "Open Kiln"))

    # ---- HTTP ------------------------------------------------------------------------------

    async def _http_request(
        self, ctx: KilnContext, target: Target, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            if scope["path"] == access.AUTH_PATH:
                await self._redeem(ctx, target, scope, send)
                return
            trusted = True
            if scope["method"] in UNSAFE_METHODS:
                origin = header(scope, b"origin")
                if origin is not None and origin != target.origin:
                    if kind_of(target.label)[0] is not Kind.APPLICATION:
                        raise access.AccessRefused(f"a request from {origin[:100]} was refused")
                    trusted = False  # never as the user: anonymous, for public apps only
            caller = self._user(ctx, target, scope, trusted)
            grant = await self._admit(ctx, target, caller)
            answered = await self._forward(target, grant, scope, receive, send)
            if not answered:
                # Nothing answered: the instance it was admitted to may have just been
                # replaced (a restart) or stopped. Ask again: forward once more to a new
                # endpoint (a request without a body is safe to repeat), else say why.
                self._forget(target.label)
                fresh = await self._admit(ctx, target, caller)
                if fresh.endpoint != grant.endpoint and not _has_body(scope):
                    grant = fresh
                    answered = await self._forward(target, grant, scope, receive, send)
            if not answered:
                await page(
                    send,
                    502,
                    "Not answering",
                    "It runs, but nothing answered on its port. It may be restarting; try "
                    "again in a moment.",
                    site_of(ctx.settings, target),
                    refresh=5,
                )
                return
        except KilnError as exc:
            await self._refuse(ctx, target, scope, send, exc)
            return
        if grant.session_id:
            self._touch(ctx, grant.session_id)

    async def _forward(
        self, target: Target, grant: Grant, scope: Scope, receive: Receive, send: Send
    ) -> bool:
        """Forward one request and stream the answer back; False when nothing answered
        (nothing was sent to the browser then)."""
        headers = forwarded_headers(scope, target, grant.identity)
        length = _content_length(scope)
        has_body = length is not None or _header_value(scope, b"transfer-encoding") is not None
        task = asyncio.current_task()
        finishing: list[bool] = []  # set once the answer's last part goes out
        watch = _until_disconnect(receive, task, finishing)
        watcher = None if has_body else asyncio.ensure_future(watch)
        try:
            try:
                answer = await self._upstream.request(
                    grant.endpoint,
                    scope["method"],
                    raw_path(scope),
                    headers,
                    _body(receive) if has_body else None,
                    length,
                )
            except UpstreamError as exc:
                log.info("%s: not answering: %s", target.label, exc)
                return False
            except TimeoutError:  # the upload stalled
                raise access.AccessRefused("the upload stalled and was cut off") from None
            if watcher is None:
                watcher = asyncio.ensure_future(watch)
            try:
                await _stream(answer, send, finishing, self.ctx.settings.web.tls)
            except UpstreamError as exc:  # the app went away mid-answer: cut it off
                log.info("%s: answer cut short: %s", target.label, exc)
            except TimeoutError:
                log.info("%s: the browser stopped reading; cut off", target.label)
            finally:
                answer.release()
        except asyncio.CancelledError:
            if watcher is None or not watcher.done() or watcher.cancelled():
                raise
            # The browser went away: nobody to answer; the app's answer was dropped above.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            if watcher is not None:
                watcher.cancel()
            else:
                watch.close()  # never started
        return True

    def _touch(self, ctx: KilnContext, session_id: str) -> None:
        """Traffic counts against a session's idle timeout (written at most every 30 s)."""
        if sessions.activity.due(session_id):
            task = asyncio.get_running_loop().run_in_executor(
                None, sessions.activity.write, ctx.sessions, session_id
            )
            task.add_done_callback(_log_failure)

    # ---- WebSocket -------------------------------------------------------------------------

    async def _websocket(
        self, ctx: KilnContext, target: Target, scope: Scope, receive: Receive, send: Send
    ) -> None:
        await receive()  # websocket.connect
        try:
            # Browsers always name the page in Origin on a WebSocket, and cookies go with the
            # handshake even from a sibling origin: the Origin check is the CSRF check.
            trusted = header(scope, b"origin") == target.origin
            if not trusted and kind_of(target.label)[0] is not Kind.APPLICATION:
                raise access.AccessRefused("a WebSocket from another origin was refused")
            caller = self._user(ctx, target, scope, trusted)
            grant = await self._admit(ctx, target, caller)
        except KilnError as exc:
            await send(
                {"type": "websocket.close", "code": CLOSE_REFUSED, "reason": exc.detail[:120]}
            )
            return
        wanted = {b"cookie", b"user-agent", b"accept-language", b"remote-user", b"remote-name"}
        headers = [
            (k.decode(), v.decode("latin-1"))
            for k, v in forwarded_headers(scope, target, grant.identity)
            if k in wanted or k.startswith((b"x-forwarded-", b"remote-"))
        ]
        try:
            upstream = await connect(
                f"ws://{grant.endpoint}{raw_path(scope)}",
                subprotocols=scope.get("subprotocols") or None,
                additional_headers=headers,
                max_size=None,  # the app sets its own limits
                open_timeout=10,
                ping_interval=None,  # the browser and the app ping each other through us
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            log.info("%s: the app refused a WebSocket: %s", target.label, exc)
            await send({"type": "websocket.close", "code": CLOSE_UPSTREAM_FAILED})
            return
        session_id = grant.session_id
        touch = (lambda: self._touch(ctx, session_id)) if session_id else (lambda: None)
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await _relay(upstream, receive, send, touch)


async def _relay(
    upstream: ClientConnection, receive: Receive, send: Send, touch: Callable[[], None]
) -> None:
    """Browser ⇄ app until either side closes; each message counts as activity."""
    async with anyio.create_task_group() as group:

        async def until_done(direction: Callable[[], Awaitable[None]]) -> None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await direction()
            group.cancel_scope.cancel()

        async def from_browser() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.close(code=_closing_code(message.get("code", 1000)))
                    return
                touch()
                if message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
                elif message.get("text") is not None:
                    await upstream.send(message["text"])

        async def from_app() -> None:
            try:
                async for data in upstream:
                    touch()
                    key = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", key: data})
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            with contextlib.suppress(Exception):  # the browser may be gone already
                await send({"type": "websocket.close", "code": _closing_code(code)})

        group.start_soon(until_done, from_browser)
        group.start_soon(until_done, from_app)


def _closing_code(code: int) -> int:
    """A code one may send in a close frame (1005/1006/1015 only describe what happened)."""
    return 1000 if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code


def _has_body(scope: Scope) -> bool:
    return any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])


def _header_value(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header_value(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


async def _stream(answer: Answer, send: Send, finishing: list[bool], hsts: bool) -> None:
    """The app's answer to the browser, chunk by chunk as it arrives (never buffered)."""
    start = {
        "type": "http.response.start",
        "status": answer.status,
        "headers": response_headers(answer.headers, hsts),
    }
    await _timed_send(send, start)
    async for chunk in answer.body():
        await _timed_send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
    finishing.append(True)  # from here on a disconnect is the end of a complete answer
    await _timed_send(send, {"type": "http.response.body", "body": b""})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """The browser's request body as it arrives; ``TimeoutError`` when it stalls."""
    while True:
        async with asyncio.timeout(BODY_IDLE_SECONDS):
            message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _until_disconnect(
    receive: Receive, task: asyncio.Task[Any] | None, finishing: list[bool]
) -> None:
    """Cancel ``task`` (the request's forwarding) when the browser goes away before the
    answer is complete (after it, uvicorn reports a disconnect too)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if task is not None and not finishing:
                task.cancel()
            return


async def _timed_send(send: Send, message: Message) -> None:
    """Send, but give up on a browser that reads nothing for ``WRITE_STALL_SECONDS``."""
    async with asyncio.timeout(WRITE_STALL_SECONDS):
        await send(message)


def _same_origin_path(value: str, default: str) -> str:
    """Where the hand-off leads: a path on this origin only (no scheme, host or '//')."""
    if not value.startswith("/") or value.startswith(("//", "/\\")) or len(value) > 2000:
        return default
    if any(ord(c) < 0x20 or c == "\\" for c in value):
        return default
    return value


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("recording session activity failed: %s", exc)
