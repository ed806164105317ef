"""The proxy's HTTP/1.1 client towards workloads: keep-alive connections per endpoint, the
answer parsed by httptools (llhttp, C) and streamed chunk by chunk with flow control both
ways, request bodies streamed in (``Content-Length`` as given, else chunked).

Why not httpx: through the content proxy every request of every application pays the
client's cost, and a general-purpose client spends about a millisecond per request on this
path (request and response objects, header normalisation, its pool's bookkeeping); this one
does what a reverse proxy needs and nothing else, in a tenth of that. WebSockets go through
the ``websockets`` client (``proxy.py``).

A connection is reused only after a complete answer that allows it, with the whole request
sent; an idle one is dropped after ``IDLE_SECONDS`` or when the app closed it. A request
without a body that fails on a reused connection before any answer arrives is sent once more
on a new one (the app may have closed it just as it was picked up).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools

CONNECT_SECONDS = 10.0
IDLE_SECONDS = 15.0  # below common keep-alive timeouts of app servers (gunicorn: 2 s+)
MAX_IDLE_PER_ENDPOINT = 64
HIGH_WATER = 1 << 20  # pause reading from the app beyond this many unsent bytes
CHUNK = 64 * 1024


class UpstreamError(Exception):
    """Nothing usable came back: no connection, or the app closed it before answering."""


class _Connection(asyncio.Protocol):
    """One TCP connection to an app; parses one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # False while it waits in the pool: nobody awaits its head then, so an app closing it
        # must not leave a failed future behind (asyncio would log it as never retrieved).
        self.in_use = True
        self._write_paused: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.readable = asyncio.Event()
        self.got_bytes = False
        self.until_close = False
        self.head_only = False
        self.keep_alive = False  # read with the head: llhttp forgets it once the answer ends

    # ---- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the app's answer is not valid HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        if self.head.done() and (self.until_close or self.complete):
            self.complete = True  # an answer delimited by the end of the connection
            self.readable.set()
            return
        self._fail(UpstreamError("the app closed the connection before it answered"))

    def pause_writing(self) -> None:
        self._write_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    # ---- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            return  # an interim answer (103 Early Hints): the real one follows
        framed = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers
        )
        self.until_close = not framed and self.status not in (204, 304)
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)
        if self.head_only:  # an answer to HEAD has no body, whatever its headers say
            self.complete = True
            self.readable.set()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self.readable.set()
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self.headers = []
            return
        self.complete = True
        self.readable.set()

    # ---- use -----------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self.in_use and not self.head.done():
            self.head.set_exception(exc)
        self.readable.set()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        if self._write_paused is not None:
            await self._write_paused

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamError("the app closed the connection")
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Answer:
    """An app's answer: status and headers now, the body as it arrives."""

    def __init__(self, pool: UpstreamPool, endpoint: str, conn: _Connection, sent: bool) -> None:
        self._pool, self._endpoint, self._conn = pool, endpoint, conn
        self._sent = sent  # the whole request went out (the connection may be reused)
        self.status = conn.status
        self.headers = conn.headers

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            while conn.chunks:
                data = conn.chunks.popleft()
                conn.buffered -= len(data)
                if conn.buffered <= HIGH_WATER // 2 and conn.transport is not None:
                    conn.transport.resume_reading()
                yield data
            if conn.complete:
                return
            if conn.closed:
                raise UpstreamError("the app closed the connection mid-answer")
            conn.readable.clear()
            await conn.readable.wait()

    def release(self) -> None:
        """Done with the answer: keep the connection for the next request when it can be."""
        conn = self._conn
        reusable = (
            self._sent
            and conn.complete
            and not conn.closed
            and not conn.until_close
            and not conn.chunks
            and conn.keep_alive
        )
        if reusable:
            self._pool.put(self._endpoint, conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections to apps, by endpoint (``host:port``)."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Connection]] = {}

    def put(self, endpoint: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(endpoint, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn._reset()
        conn.in_use = False
        idle.append(conn)

    def _take(self, endpoint: str) -> _Connection | None:
        idle = self._idle.get(endpoint)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                conn.in_use = True
                return conn
            conn.close()
        return None

    async def _connect(self, endpoint: str) -> _Connection:
        host, _, port = endpoint.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                _, conn = await loop.create_connection(_Connection, host, int(port))
        except (OSError, TimeoutError, ValueError) as exc:
            raise UpstreamError(f"cannot connect to the app: {exc}") from None
        return conn

    async def request(
        self,
        endpoint: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
        length: int | None,
    ) -> Answer:
        """Send a request and return once the answer's head arrived. ``body`` with
        ``length`` None is sent chunked."""
        head = _head(method, target, headers, body is not None and length is None)
        reused = self._take(endpoint)
        conn = reused or await self._connect(endpoint)
        try:
            return await self._exchange(endpoint, conn, method, head, body)
        except UpstreamError:
            conn.close()
            if reused is None or body is not None or conn.got_bytes:
                raise
        # The reused connection had been closed by the app: once more on a new one.
        conn = await self._connect(endpoint)
        try:
            return await self._exchange(endpoint, conn, method, head, None)
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self,
        endpoint: str,
        conn: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
    ) -> Answer:
        conn.head_only = method == "HEAD"
        try:
            conn.write(head)
            sent = True
            if body is not None:
                sent = await _send_body(conn, body, chunked=b"transfer-encoding" in head.lower())
            await conn.head
        except BaseException:
            conn.close()
            raise
        return Answer(self, endpoint, conn, sent)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _head(method: str, target: str, headers: list[tuple[bytes, bytes]], chunked: bool) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    lines += [name + b": " + value for name, value in headers]
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> bool:
    """Stream the request body; False when the app answered before it was all sent (the
    connection cannot be reused then)."""
    async for data in body:
        if conn.head.done():  # the app answered early (a refusal): send no more of it
            return False
        conn.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")
    return True
