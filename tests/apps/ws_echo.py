"""A WebSocket echo server (the benchmark's round trip), on 127.0.0.1:$CDSW_APP_PORT; plain
HTTP GETs get a short answer (Kiln's readiness probe)."""

import asyncio
import http
import os

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response


async def echo(connection: ServerConnection) -> None:
    """Echo every message; ``whoami`` is answered with the Remote-User of the handshake."""
    async for message in connection:
        if message == "whoami":
            assert connection.request is not None
            await connection.send(connection.request.headers.get("Remote-User", "(nobody)"))
            continue
        await connection.send(message)


def plain_http(connection: ServerConnection, request: Request) -> Response | None:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return connection.respond(http.HTTPStatus.OK, "echo server\n")
    return None


async def main() -> None:
    port = int(os.environ["CDSW_APP_PORT"])
    async with serve(echo, "127.0.0.1", port, process_request=plain_http, max_size=None):
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
