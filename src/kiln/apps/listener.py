"""Limits of the public HTTPS listener, so slow or idle clients cannot exhaust it.

uvicorn closes a keep-alive connection that stays idle between requests
(``KEEP_ALIVE_SECONDS``), but nothing bounds a connection that never sends a request or sends
its headers a byte at a time (slow-loris), nor how many header bytes it may send. The web
tier is the one public listener, and through the content proxy every application shares it,
so ``GuardedHttpToolsProtocol`` adds both: a request's headers must be complete within
``HEADER_SECONDS`` of its first byte (or of the connection's opening) and within
``MAX_HEADER_BYTES``; otherwise the connection is closed (408) or refused (431). Bodies and
answers are bounded by the proxy itself (``kiln.apps.proxy``): a stalled upload or a browser
that stops reading is cut off there. WebSockets are pinged by uvicorn (a dead peer is
dropped) and their messages capped at uvicorn's 16 MiB.

``uvicorn_options`` is what every server of the web tier runs with (``kiln web`` and the
tests' live server), including a ceiling on concurrent connections derived from the open
files the process may hold (each proxied connection needs two).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("kiln.apps.listener")

HEADER_SECONDS = 15.0
MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_SECONDS = 20
MAX_CONNECTIONS = 10_000
_CLOSE = b"connection: close\r\ncontent-length: 0\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline and a size cap on request headers."""

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        # Parse first, then count: one read can hold the headers and the start of a large
        # body (a registry upload's first chunk), and only a read after which the headers are
        # still incomplete was all header bytes. (A read that ends one request and begins the
        # next counts whole towards the next: an over-count only pipelining clients see.)
        super().data_received(data)
        if self._header_timer is not None and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                self._close_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._header_timer = None
        self._close_with(b"HTTP/1.1 408 Request Timeout\r\n")

    def _close_with(self, status_line: bytes) -> None:
        if self.transport.is_closing():
            return
        # Nothing of a response went out yet on this connection's current request: a
        # status line is all the client gets before the close.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(status_line + _CLOSE)
        self.transport.close()


def connection_ceiling() -> int:
    """Concurrent connections the listener accepts (the rest get 503 at once): each proxied
    request holds two descriptors; the soft limit is raised to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(100, min(MAX_CONNECTIONS, soft // 2 - 200))


def uvicorn_options() -> dict[str, Any]:
    return {
        "http": GuardedHttpToolsProtocol,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "limit_concurrency": connection_ceiling(),
        # Kiln is the edge: a client's X-Forwarded-For never names the caller.
        "proxy_headers": False,
    }
