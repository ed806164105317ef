"""Limits every request meets before any route runs.

- A body larger than ``max_body`` is refused with 413, counted while it streams in, so a
  request without ``Content-Length`` (chunked) cannot slip past. File uploads, git pushes
  and the registry (``/v2/``) are exempt: they enforce their own, larger limits while
  streaming to disk.
- A NUL byte in the path or query is refused with 400: no Kiln name or value holds one, and
  PostgreSQL cannot even compare a string containing it.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.api.errors import problem


def streams_own_body(path: str) -> bool:
    """File uploads, git pushes and registry uploads enforce their own, larger, limits
    while streaming."""
    return path.startswith(("/git/", "/v2/")) or "/files/" in path


class RequestLimits:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        query: bytes = scope.get("query_string", b"")
        if "\x00" in path or b"\x00" in query or b"%00" in query:
            await problem(400, "Invalid path", "the URL contains a NUL character")(
                scope, receive, send
            )
            return
        if streams_own_body(path):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            await problem(400, "Bad request", "Content-Length is not a number")(
                scope, receive, send
            )
            return
        if length is not None and int(length) > self.max_body:
            await self._too_large()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> JSONResponse:
        detail = f"request body is larger than {self.max_body} bytes"
        return problem(413, "Content too large", detail)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # HTTPException passes through FastAPI's body reading untouched and
                    # leaves as problem+json through the error handlers.
                    raise HTTPException(413, f"request body is larger than {self.max_body} bytes")
            return message

        return counted
