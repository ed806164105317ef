"""The public listener's header limit counts header bytes only: uvicorn's own protocol with
Kiln's guard, fed as asyncio feeds it (one ``data_received`` per read), with an in-memory
transport."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from kiln.apps.listener import MAX_HEADER_BYTES, GuardedHttpToolsProtocol


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8443)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _status_after(*reads: bytes) -> bytes:
    """The status line the listener answers after these reads of one fresh connection."""
    received: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        received.append(size)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app=app, lifespan="off", log_level="warning")
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = MemoryTransport()
    protocol.connection_made(transport)
    for data in reads:
        protocol.data_received(data)
        await asyncio.sleep(0)
    for _ in range(100):
        if transport.written:
            break
        await asyncio.sleep(0.01)
    protocol.connection_lost(None)
    return bytes(transport.written).split(b"\r\n", 1)[0]


def test_a_large_body_in_the_same_read_as_the_headers_is_served() -> None:
    body = b"x" * (4 * MAX_HEADER_BYTES)
    head = b"PATCH /v2/a/b/blobs/uploads/1 HTTP/1.1\r\nHost: localhost\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    assert asyncio.run(_status_after(head + body)) == b"HTTP/1.1 201 Created"


def test_headers_past_the_limit_are_refused_with_431() -> None:
    flood = [b"GET / HTTP/1.1\r\nHost: localhost\r\n"]
    flood += [b"X-Flood: " + b"a" * 4000 + b"\r\n"] * (MAX_HEADER_BYTES // 4000 + 2)
    assert asyncio.run(_status_after(*flood)) == b"HTTP/1.1 431 Request Header Fields Too Large"
