"""The session proxy: ``https://<session id>.<content domain>/...`` → the session's editor.

An ASGI middleware in front of the whole app. A request whose Host is a session's own origin
never reaches Kiln's routes: it is either answered here (the hand-off at ``/_kiln/auth``, a
refusal page) or forwarded to the session's endpoint (the runner's port forward to the
editor inside the sandbox, stored on the workload row) — HTTP with streamed bodies through
httpx, WebSocket (kernels, terminals) through the ``websockets`` client. Every other Host
passes through untouched.

Who gets through is decided by ``kiln.domain.session_access`` (signed cookie naming user and
session, and the ``USE_SESSION`` rule, checked again every few seconds); nothing is forwarded
before that. Forwarded requests lose Kiln's cookies and any ``Authorization`` header: the
editor runs the user's code and must never see a credential. State-changing requests and
WebSockets must come from the session's own origin (``Origin``), so a page on another
origin — even a sibling session on the same site, which a SameSite=Lax cookie does not stop
— cannot act with the user's cookie. Traffic counts as activity for the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
from anyio import to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kiln.api.deps import SESSION_COOKIE, KilnContext
from kiln.domain import session_access as access
from kiln.domain import sessions
from kiln.domain.errors import Conflict, KilnError, NotFound
from kiln.pki.ca import content_domain
from kiln.web.rendering import templates

log = logging.getLogger("kiln.web.proxy")

ADMISSION_SECONDS = 5.0  # how long a yes is trusted before the DB is asked again
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Hop-by-hop headers (RFC 9110 §7.6.1) are between two hops, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CLOSE_REFUSED = 4403
CLOSE_UPSTREAM_FAILED = 1011


@dataclass(frozen=True)
class Target:
    """A request on a session's origin."""

    session_id: str
    host: str  # as the browser sent it, with the port
    origin: str  # scheme://host


@dataclass
class _Admitted:
    endpoint: str
    until: float


class SessionProxy:
    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self.suffix = f".{content_domain(domain).lower()}"
        self._admitted: dict[tuple[str, int], _Admitted] = {}
        self._http: httpx.AsyncClient | None = None

    # ---- routing ---------------------------------------------------------------------------

    def target(self, scope: Scope) -> Target | None:
        """The session a request is for, by its Host header; None for every other host."""
        host = ""
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
                break
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower().rstrip(".")
        if not name.endswith(self.suffix):
            return None
        label = name[: -len(self.suffix)]
        if not _LABEL.fullmatch(label):
            return None  # not one label under the content domain: not a session's origin
        secure = scope.get("scheme") in ("https", "wss")
        return Target(label, host, f"{'https' if secure else 'http'}://{host}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        target = self.target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        ctx: KilnContext = scope["app"].state.kiln
        if scope["type"] == "http":
            await self._http_request(ctx, target, scope, receive, send)
        else:
            await self._websocket(ctx, target, scope, receive, send)

    # ---- who gets through ------------------------------------------------------------------

    async def _admit(self, ctx: KilnContext, target: Target, scope: Scope) -> str:
        """The endpoint to forward to, once the cookie and the rule say yes; else raises."""
        now = time.time()
        cookie = _cookies(scope).get(access.ACCESS_COOKIE)
        user_id = access.read_access_cookie(ctx.settings.secret, cookie, target.session_id, now)
        key = (target.session_id, user_id)
        cached = self._admitted.get(key)
        if cached is not None and cached.until > time.monotonic():
            return cached.endpoint

        def decide() -> str:
            with ctx.sessions() as db:
                return access.admit(db, target.session_id, user_id).workload.endpoint

        endpoint = await to_thread.run_sync(decide)
        if len(self._admitted) > 10_000:
            self._admitted.clear()  # bounded; a miss only costs one query
        self._admitted[key] = _Admitted(endpoint, time.monotonic() + ADMISSION_SECONDS)
        return endpoint

    def _forget(self, session_id: str) -> None:
        for key in [k for k in self._admitted if k[0] == session_id]:
            self._admitted.pop(key, None)

    async def _redeem(self, ctx: KilnContext, target: Target, scope: Scope, send: Send) -> None:
        """``/_kiln/auth?token=``: spend the hand-off token, set the session's cookie."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        now = time.time()

        def redeem() -> None:
            with ctx.sessions() as db:
                user_id = access.redeem_handoff(
                    db, ctx.settings.secret, token, target.session_id, now
                )
                access.admit(db, target.session_id, user_id)
                cookie = access.access_cookie(
                    ctx.settings.secret,
                    target.session_id,
                    user_id,
                    now,
                    ctx.settings.web.session_hours * 3600,
                )
                redeemed.append(cookie)

        redeemed: list[str] = []
        await to_thread.run_sync(redeem)
        max_age = ctx.settings.web.session_hours * 3600
        headers = [
            (
                b"set-cookie",
                f"{access.ACCESS_COOKIE}={redeemed[0]}; Path=/; Max-Age={max_age}; Secure; "
                "HttpOnly; SameSite=Lax".encode(),
            ),
            (b"location", b"/lab"),
            (b"cache-control", b"no-store"),
            (b"referrer-policy", b"no-referrer"),  # the token is in this URL
        ]
        site = _site(ctx, target)
        await _page(
            send, 303, "Opening the session", "Redirecting to JupyterLab.", site, None, headers
        )

    async def _refuse(self, ctx: KilnContext, target: Target, send: Send, exc: KilnError) -> None:
        """A page, never the editor: 404 (no such session, or one the user cannot see), 409
        (not running), 403 (everything else: no cookie, bad token, role too low)."""
        status = exc.status if isinstance(exc, NotFound | Conflict) else 403
        title = {404: "No such session", 409: "Session not available"}.get(status, "No access")
        site = _site(ctx, target)
        link = (f"{site}/projects", "Open it from Kiln")
        headers = [(b"cache-control", b"no-store")]
        await _page(send, status, title, f"{exc.detail}.", site, link, headers)

    # ---- HTTP ------------------------------------------------------------------------------

    async def _http_request(
        self, ctx: KilnContext, target: Target, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            if scope["path"] == access.AUTH_PATH:
                await self._redeem(ctx, target, scope, send)
                return
            if scope["method"] in UNSAFE_METHODS:
                origin = _header(scope, b"origin")
                if origin is not None and origin != target.origin:
                    raise access.AccessRefused(f"a request from {origin[:100]} was refused")
            endpoint = await self._admit(ctx, target, scope)
            if not await self._forward(target, endpoint, scope, receive, send):
                # No answer: if the session has just ended, say that rather than "502".
                self._forget(target.session_id)
                await self._admit(ctx, target, scope)
                await _page(
                    send,
                    502,
                    "The editor is not answering",
                    "The session runs, but its editor did not answer. It may be restarting; "
                    "try again in a moment.",
                    _site(ctx, target),
                )
                return
        except KilnError as exc:
            await self._refuse(ctx, target, send, exc)
            return
        self._touch(ctx, target.session_id)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # No read timeout: a long-running request (a big download, a slow kernel restart)
            # is the editor's business; the browser going away ends it.
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=10.0),
                follow_redirects=False,
                trust_env=False,  # never through an HTTP(S)_PROXY of the web tier's env
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            )
        return self._http

    async def _forward(
        self, target: Target, endpoint: str, scope: Scope, receive: Receive, send: Send
    ) -> bool:
        """Forward one request and stream the answer back; False when the editor could not
        be reached (nothing was sent to the browser then)."""
        headers = forwarded_headers(scope, target)
        has_body = any(k in ("content-length", "transfer-encoding") for k, _ in headers) or (
            _header(scope, b"transfer-encoding") is not None
        )
        headers = [(k, v) for k, v in headers if k != "transfer-encoding"]
        url = f"http://{endpoint}{_raw_path(scope)}"
        client = self._client()
        request = client.build_request(
            scope["method"],
            url,
            headers=headers,
            content=_body(receive) if has_body else None,
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.info("session %s: editor not answering: %s", target.session_id, exc)
            return False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_headers(response.headers.raw),
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:  # the editor went away mid-answer: cut it off
            log.info("session %s: answer cut short: %s", target.session_id, exc)
        finally:
            await response.aclose()
        return True

    def _touch(self, ctx: KilnContext, session_id: str) -> None:
        """Traffic counts against the idle timeout (written at most every 30 s)."""
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
            # Browsers always name the page in Origin on a WebSocket; cookies go with the
            # handshake even from a sibling origin, so the Origin check is the CSRF check.
            if _header(scope, b"origin") != target.origin:
                raise access.AccessRefused("a WebSocket from another origin was refused")
            endpoint = await self._admit(ctx, target, scope)
        except KilnError as exc:
            await send(
                {"type": "websocket.close", "code": CLOSE_REFUSED, "reason": exc.detail[:120]}
            )
            return
        headers = [
            (k, v)
            for k, v in forwarded_headers(scope, target)
            if k in ("cookie", "user-agent", "accept-language", "x-forwarded-for")
        ]
        try:
            upstream = await connect(
                f"ws://{endpoint}{_raw_path(scope)}",
                subprotocols=scope.get("subprotocols") or None,
                additional_headers=headers,
                max_size=None,  # the editor sets its own limits
                open_timeout=10,
                ping_interval=None,  # the browser and the editor ping each other through us
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            log.info("session %s: editor refused a WebSocket: %s", target.session_id, exc)
            await send({"type": "websocket.close", "code": CLOSE_UPSTREAM_FAILED})
            return
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await _relay(upstream, receive, send, lambda: self._touch(ctx, target.session_id))


async def _relay(
    upstream: ClientConnection, receive: Receive, send: Send, touch: Callable[[], None]
) -> None:
    """Browser ⇄ editor until either side closes; each message counts as activity."""
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

        async def from_editor() -> None:
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
        group.start_soon(until_done, from_editor)


def _closing_code(code: int) -> int:
    """A code one may send in a close frame (1005/1006/1015 only describe what happened)."""
    return 1000 if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code


# ---- headers and bodies ----------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookies(scope: Scope) -> dict[str, str]:
    jar: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            for name, item in _parse_cookie(value.decode("latin-1")).items():
                jar.setdefault(name, item)
    return jar


def _parse_cookie(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            jar.setdefault(name, value)
    return jar


def is_kiln_cookie(name: str) -> bool:
    return name in (SESSION_COOKIE, access.ACCESS_COOKIE) or name.lower().startswith(
        ("__host-kiln", "kiln")
    )


def forwarded_headers(scope: Scope, target: Target) -> list[tuple[str, str]]:
    """The browser's headers as the editor may see them: no hop-by-hop headers, no
    ``Authorization``, no Kiln cookie (the editor's own cookies, such as ``_xsrf``, stay)."""
    out: list[tuple[str, str]] = []
    for raw_key, raw_value in scope.get("headers", ()):
        key, value = raw_key.decode("latin-1").lower(), raw_value.decode("latin-1")
        if key in HOP_BY_HOP or key in ("authorization", "x-forwarded-for", "forwarded"):
            continue
        if key.startswith(("x-forwarded-", "sec-websocket-")):
            continue
        if key == "cookie":
            kept = [
                f"{name}={item}"
                for name, item in _parse_cookie(value).items()
                if not is_kiln_cookie(name)
            ]
            if not kept:
                continue
            value = "; ".join(kept)
        out.append((key, value))
    client = scope.get("client")
    if client:
        out.append(("x-forwarded-for", str(client[0])))
    out.append(("x-forwarded-proto", target.origin.split(":", 1)[0]))
    out.append(("x-forwarded-host", target.host))
    return out


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The editor's answer headers, less hop-by-hop ones and any attempt to set Kiln's
    cookies. Framing by its own origin stays allowed (JupyterLab frames its own pages)."""
    out: list[tuple[bytes, bytes]] = []
    framing = False
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name in HOP_BY_HOP:
            continue
        if name == "set-cookie" and _sets_kiln_cookie(value.decode("latin-1")):
            continue
        framing = framing or name == "x-frame-options"
        out.append((name.encode("latin-1"), value))
    if not framing:
        out.append((b"x-frame-options", b"SAMEORIGIN"))
    return out


def _sets_kiln_cookie(header: str) -> bool:
    try:
        parsed = SimpleCookie()
        parsed.load(header)
    except CookieError:
        return True  # a cookie we cannot read is not forwarded either
    return any(is_kiln_cookie(name) for name in parsed)


def _raw_path(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return raw.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _site(ctx: KilnContext, target: Target) -> str:
    """The UI's own origin, seen from a session's origin: same scheme and port, Kiln's
    domain (sessions live on ``<id>.<domain>``)."""
    port = target.host.rsplit(":", 1)[1] if ":" in target.host else ""
    scheme = target.origin.split(":", 1)[0]
    return f"{scheme}://{ctx.settings.domain}{':' if port else ''}{port}"


async def _page(
    send: Send,
    status: int,
    title: str,
    detail: str,
    site: str,
    link: tuple[str, str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A page in Kiln's layout (a refusal, a redirect), answered on the session's origin: no
    scripts at all; its styles, icon and links come from the UI's origin ``site``."""
    body = (
        templates.env.get_template("session_page.html")
        .render(
            status=status,
            title=title,
            detail=detail,
            link={"url": link[0], "text": link[1]} if link else None,
            site=site,
            user=None,
            csrf_token=None,
            path="",
            style_nonce=None,
        )
        .encode()
    )
    csp = (
        f"default-src 'none'; style-src {site}/static/; img-src {site}/static/ data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"content-security-policy", csp.encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("recording session activity failed: %s", exc)
