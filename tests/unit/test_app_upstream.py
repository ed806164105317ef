"""The proxy's HTTP/1.1 client towards apps (kiln.apps.upstream) against a real socket
server: keep-alive connections are reused, a request on a connection the app closed while it
sat in the pool is retried on a new one, and such a close leaves no failed future behind
(asyncio would log "Future exception was never retrieved" for each)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from kiln.apps.upstream import UpstreamPool


class _App:
    """A tiny keep-alive HTTP server that can drop every open connection."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_all(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()


async def _get(pool: UpstreamPool, endpoint: str) -> bytes:
    answer = await pool.request(endpoint, "GET", "/", [(b"host", b"app")], None, None)
    body = b"".join([chunk async for chunk in answer.body()])
    answer.release()
    assert answer.status == 200
    return body


def test_idle_connections_are_reused_and_their_close_is_quiet() -> None:
    app = _App()
    unhandled: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        endpoint = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = UpstreamPool()
        try:
            assert await _get(pool, endpoint) == b"ok"
            assert await _get(pool, endpoint) == b"ok"
            assert app.connections == 1  # kept alive and reused
            app.drop_all()  # the app closes the idle connection (a restart, its own timeout)
            await asyncio.sleep(0.2)
            assert await _get(pool, endpoint) == b"ok"  # on a new connection
            assert app.connections == 2
            app.drop_all()
            await asyncio.sleep(0.2)
        finally:
            await pool.close()
            server.close()
            await server.wait_closed()
        gc.collect()  # a failed future nobody awaited is reported when it is collected
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert [c.get("message") for c in unhandled] == []
